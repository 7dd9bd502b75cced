"""The step benchmark (benchmarks/step.py) and its profile summary (benchmarks/trace_summary.py) on
CPU: argument handling of the GPU path, the one-run GPU script's dry run, importability without the
data stack, and a tiny end-to-end run whose JSON and per-op summary are checked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


step = _load("step")
trace_summary = _load("trace_summary")


@pytest.mark.slow
def test_gpu_arguments_without_a_gpu(capsys):
    # The GPU plan: bf16, the three shapes, both PyTorch peers.
    assert step.main(["--device", "gpu", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "device gpu, bf16" in plan and "64x128, 256x128, 64x512" in plan
    assert "jax, torch-eager, torch-compile" in plan
    assert step.main(["--device", "gpu", "--shapes", "8x64", "--impls", "jax", "--dry-run"]) == 0
    assert "shapes 8x64, implementations jax" in capsys.readouterr().out
    for argv, words in ((["--shapes", "64x12a"], "BATCHxSEQ"), (["--impls", "jax,tf"], "unknown implementation 'tf'")):
        with pytest.raises(SystemExit) as err:
            step.main(argv + ["--dry-run"])
        assert words in str(err.value) and "\n" not in str(err.value)
    # Asking for the GPU where JAX sees none: one line, not a traceback from deep inside.
    if not step.gpu_visible():
        code = subprocess.run([sys.executable, str(BENCH / "step.py"), "--device", "gpu", "--no-peak"],
                              capture_output=True, text=True, timeout=600)
        assert code.returncode != 0
        assert code.stderr.strip().splitlines()[-1].startswith("error: --device gpu but JAX sees no GPU")


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "plan: device gpu, bf16" in run.stdout and str(tmp_path / "step_gpu.json") in run.stdout
    assert (tmp_path / "step_gpu.log").exists()


BLOCK_DATA_STACK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('grain', 'tensorflow_datasets', 'tensorflow', 'array_record'):
            raise ImportError(f'{name} is not installed on this machine')
sys.meta_path.insert(0, Block())
"""


@pytest.mark.slow
def test_step_and_benchmark_import_without_the_data_stack():
    """The lent GPU machines have no grain / tensorflow-datasets: the benchmark must build and run
    the jaxdistil step without them."""
    code = BLOCK_DATA_STACK + f"""
sys.path.insert(0, {str(BENCH)!r})
import jax.numpy as jnp
import step, trace_summary
from jaxdistil.models import BertConfig, DistilBertConfig
ids, attn, w = step.make_batch(2, 16, 512)
fn, state, rest = step.build_jax_step(
    BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    DistilBertConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, hidden_dim=64),
    {{"input_ids": ids, "attention_mask": attn}}, jnp.asarray(w), "fp32", dropout=True)
state, metrics = fn(state, *rest)
assert float(metrics["loss"]) > 0
assert not any(m.split('.')[0] in ('grain', 'tensorflow_datasets') for m in sys.modules)
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


SYNTHETIC_HLO = """HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%fused_dot (p0: f32[8,16], p1: f32[16,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,16]{1,0} parameter(1)
  ROOT %d = f32[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_softmax (p0: f32[8,16]) -> f32[8] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %z = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%p0, %z), dimensions={1}, to_apply=%add
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,16]{1,0} constant({...})
  %fusion.1 = f32[8,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/jvp(DistilBertForMaskedLM.encode)/layers/lin1/dot_general"}
  %fusion.2 = f32[8]{0} fusion(%fusion.1), kind=kInput, calls=%fused_softmax, metadata={op_name="jit(step)/transpose(jvp(loss))/reduce_sum"}
  %cc = f32[8,16]{1,0} custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(BertForMaskedLM.encode)/layers/dot_product_attention"}
  %ar = f32[8,16]{1,0} all-reduce(%fusion.1), replica_groups={}, to_apply=%add, metadata={op_name="jit(step)/optimizer/add"}
  ROOT %m = f32[8,16]{1,0} multiply(%ar, %cc)
}
"""


def test_trace_summary_labels_and_shares():
    events = [{"module": "jit_step", "op": op, "dur_us": us}
              for op, us in (("fusion.1", 600.0), ("fusion.1", 600.0), ("fusion.2", 200.0), ("cc", 300.0),
                             ("ar", 100.0), ("m", 200.0), ("not_in_program", 999.0))]
    s = trace_summary.summarize(events, SYNTHETIC_HLO, steps=2)
    kinds = {r["name"]: r["ms_per_step"] for r in s["by_kind"]}
    assert kinds == {"matmul": 0.6, "attention": 0.15, "reduction": 0.1, "collective": 0.05, "elementwise": 0.1}
    where = {r["name"]: r["share"] for r in s["by_where"]}
    assert where["DistilBertForMaskedLM.encode forward"] == pytest.approx(1200 / 2000)
    assert where["loss backward"] == pytest.approx(200 / 2000)
    assert where["BertForMaskedLM.encode forward"] == pytest.approx(300 / 2000)
    assert where["optimizer"] == pytest.approx(100 / 2000) and where["unattributed"] == pytest.approx(200 / 2000)
    assert s["op_ms_per_step"] == 1.0 and s["top_ops"][0]["op"] == "fusion.1"
    assert s["top_ops"][0]["calls_per_step"] == 1.0
    assert "matmul 60.0%" in trace_summary.format_summary(s)


@pytest.mark.slow
def test_tiny_cpu_benchmark_run(tmp_path):
    """The CPU benchmark end to end at a tiny size: both implementations, ratios, and a profile
    whose op time fits in the measured step (2 cores) and is attributed to the models and scopes."""
    out = tmp_path / "step.json"
    code = step.main(["--device", "cpu", "--teacher-layers", "1", "--student-layers", "1", "--batch", "2",
                      "--seq", "32", "--steps", "2", "--rounds", "1", "--warmup", "0", "--no-peak",
                      "--impls", "jax,torch-eager,jax-restrict,torch-eager-restrict",
                      "--profile", str(tmp_path / "trace"), "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    shape = doc["shapes"][0]
    jax_r, torch_r = shape["impls"]["jax"], shape["impls"]["torch-eager"]
    assert shape["ratios"]["jax_vs_torch-eager"] == pytest.approx(jax_r["tokens_per_s"] / torch_r["tokens_per_s"],
                                                                  rel=1e-2)
    # Same losses on both sides at the first step (same recipe; random init and masking differ):
    # the KL between two random models is large, the MLM loss ~ log(vocab).
    for r in (jax_r, torch_r):
        assert 9.5 < r["first_metrics"]["loss_mlm"] < 11.5
    # restrict_ce_to_mask on both sides (L_ce over the masked rows), compared with each other.
    res = {i: shape["impls"][i] for i in ("jax-restrict", "torch-eager-restrict")}
    assert shape["ratios"]["jax_restrict_vs_torch-eager-restrict"] == pytest.approx(
        res["jax-restrict"]["tokens_per_s"] / res["torch-eager-restrict"]["tokens_per_s"], rel=1e-2)
    for r in res.values():
        assert 9.5 < r["first_metrics"]["loss_mlm"] < 11.5 and r["first_metrics"]["loss_ce"] > 0
    prof = jax_r["profile"]
    assert 0 < prof["op_ms_per_step"] / 1e3 <= 2 * jax_r["step_s"] * 1.5
    assert abs(sum(r["share"] for r in prof["by_kind"]) - 1) < 1e-3
    names = {r["name"] for r in prof["by_where"]}
    assert {"DistilBertForMaskedLM.encode forward", "DistilBertForMaskedLM.encode backward",
            "BertForMaskedLM.encode forward", "optimizer"} <= names
    # At this toy size the AdamW update over the 30522-row embedding weighs as much as the matmuls.
    assert dict((r["name"], r["share"]) for r in prof["by_kind"])["matmul"] > 0.2


predict_gpu = _load("predict_gpu")


def test_predict_gpu_arguments_without_a_gpu():
    with pytest.raises(SystemExit, match="not BxT"):
        predict_gpu.main(["--dry-run", "--shapes", "64by128"])
    with pytest.raises(SystemExit, match="JAX sees no GPU"):
        predict_gpu.main(["--shapes", "2x16"])


@pytest.mark.slow
def test_predict_gpu_dry_run_predicts_on_cpu(capsys):
    # The prepared GPU check (benchmarks/predict_gpu.py): its prediction half runs anywhere.
    assert predict_gpu.main(["--dry-run", "--target", "H200", "--shapes", "2x16,4x16", "--teacher-layers", "1",
                             "--student-layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "dry run (predictions only) on H200 SXM, bfloat16" in out
    assert "2x16: predicted" in out and "4x16: predicted" in out and "MFU" in out


cpu_flags = _load("cpu_flags")


def test_cpu_flags_dry_run_checks_every_variant_with_xla(capsys):
    """The prepared Intel investigation: its plan runs nothing, and XLA:CPU of this jaxlib accepts
    the flags of the variants it would try; an unknown variant is refused."""
    assert cpu_flags.main(["--dry-run", "--variants", "default,onednn,vector-512"]) == 0
    out = capsys.readouterr().out
    assert out.count("accepted") == 3 and "host CPU vendor" in out
    assert cpu_flags.flags_accepted("--xla_cpu_no_such_flag=true")[0] is False  # the check can fail
    assert cpu_flags.main(["--dry-run", "--variants", "turbo"]) == 2


packing = _load("packing")


def test_group_by_size_is_the_reference_sampler():
    """benchmarks/packing.py's copy of the reference's GroupedBatchSampler (drop_last False): every
    index once, ceil(n / b) batches, each full batch from one 4-token bin in the order the bins
    filled up, the leftovers merged in bin order at the end."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(12, 128, size=203)
    groups = packing.length_groups(lengths, 128)
    assert list(groups[:3]) == [int(x) // 4 + 1 for x in lengths[:3]]  # bins 0, 4, 8, ... < 128
    order = rng.permutation(len(lengths))
    batches = list(packing.group_by_size(order, groups, 5))
    assert len(batches) == -(-len(lengths) // 5)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # Walk the sampler by hand: the first batch completes when some bin first holds 5 indices.
    seen: dict[int, list[int]] = {}
    for i in order:
        seen.setdefault(int(groups[i]), []).append(int(i))
        if len(seen[int(groups[i])]) == 5:
            assert batches[0] == seen[int(groups[i])]
            break
    full = [b for b in batches if len({int(groups[i]) for i in b}) == 1 and len(b) == 5]
    assert len(full) >= len(batches) // 2
    tail = [b for b in batches if b not in full]
    merged = [i for b in tail for i in b]
    assert [int(groups[i]) for i in merged] == sorted(int(groups[i]) for i in merged)
    assert all(len(b) == 5 for b in tail[:-1]) and 1 <= len(tail[-1]) <= 5


def test_unpack_and_pad_restore_the_sequences():
    batch = {"input_ids": np.array([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]]),
             "segment_ids": np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])}
    seqs = packing.unpack(batch)
    assert [s.tolist() for s in seqs] == [[5, 6], [7, 8, 9], [1, 2, 3, 4]]
    ids, attn = packing.padded_batch(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 0], [1, 2, 3, 4]]
    assert attn.sum() == 9 and attn.shape == (3, 4)


@pytest.mark.slow
def test_tiny_packing_benchmark_run(tmp_path):
    """Packed rows vs the reference's grouped padded batches end to end at a tiny size: both sides
    see the same sequences (same real tokens), and the ratio is the two rates'."""
    rng = np.random.default_rng(1)
    words = ["return", "value", "list", "the", "object", "module", "of", "string", "raise", "error"]
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, int(rng.lognormal(3, 0.7)))) for _ in range(800)))
    out = tmp_path / "packing.json"
    assert packing.main(["--tiny", "--source", str(text), "--max-lens", "32", "--steps", "2", "--rounds", "1",
                         "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    (res,) = json.loads(out.read_text())["lengths"]
    jax_r, ref_r = res["sides"]["jax-packed"], res["sides"]["torch-eager-grouped"]
    packed, ref = res["packed"], res["reference"]
    # Each side counts the real tokens of the batches it ran; the reference's are an epoch's batches.
    assert jax_r["useful_tokens"] == packed["real_tokens"] and ref_r["useful_tokens"] == ref["real_tokens"]
    assert packed["sequences"] >= 2 * 8 and ref["updates"] == 2 and ref["micro_batch"] == 5
    assert ref["epoch_micro_batches"] == -(-res["train_sequences"] // 5)
    assert res["ratio"] == pytest.approx(jax_r["useful_tokens_per_s"] / ref_r["useful_tokens_per_s"], rel=1e-2)


objectives = _load("objectives")


@pytest.mark.slow
def test_tiny_objectives_benchmark_run(tmp_path):
    """The recipes' memory / time table at a tiny size: every recipe builds from its shipped config
    (two teachers, TinyBERT's projections, MiniLMv2's relations, no teacher), trains a step, and its
    row is what it measured (the compiled memory of its own step, its own step times)."""
    out = tmp_path / "objectives.json"
    names = ["distilbert", "two-teachers", "tinybert-general", "minilmv2", "mlm-only"]
    report = objectives.main(["--shape", "tiny", "--steps", "2", "--recipes", ",".join(names), "--output", str(out)])
    assert json.loads(out.read_text()) == report and list(report["recipes"]) == names
    rows = report["recipes"]
    for r in rows.values():
        assert len(r["step_s"]) == 2 and r["tokens_per_s"] == pytest.approx(8 * 128 / np.median(r["step_s"]))
        assert r["temp_mb"] > 0 and r["argument_mb"] > 0 and np.isfinite(r["loss"])
    # A second teacher's params are arguments of the step; no teacher at all, none.
    assert rows["two-teachers"]["argument_mb"] > rows["distilbert"]["argument_mb"] > rows["mlm-only"]["argument_mb"]
    with pytest.raises(SystemExit):
        objectives.main(["--recipes", "nope"])


@pytest.mark.slow
def test_tiny_teacher_cache_benchmark_run(tmp_path):
    """The teacher-cache benchmark at a tiny size: the online, cached and PyTorch steps each train,
    the reader reads a cache of the writer's format,
    and the disk figures are the files' sizes (K ids as uint16 + K bf16 values + int32 input id per
    token, + D bf16 hidden values: 4 + 4K (+ 2D) bytes, plus the header)."""
    bench = _load("teacher_cache")
    out = tmp_path / "cache.json"
    report = bench.main(["--shape", "tiny", "--rounds", "1", "--reader-steps", "4", "--output", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["steps"]) == {"jax-online", "jax-cached", "torch-eager"}
    assert all(len(r["step_s"]) == 1 and r["tokens_per_s"] > 0 for r in report["steps"].values())
    assert report["reader"]["batches_per_s"] > 0 and report["reader"]["headroom"] > 0
    for k in bench.TOP_KS:
        for key, extra in ((f"k{k}", 0), (f"k{k}+hidden", 2 * 64)):
            assert 4 + 4 * k + extra <= report["disk_bytes_per_token"][key] < 4 + 4 * k + extra + 8
