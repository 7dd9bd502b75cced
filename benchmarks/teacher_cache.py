"""The teacher cache's speed, in one run: the cached step against the online step and against the
transformers + PyTorch reference step, the cache reader against the step, and the disk per token.

  step      DistilBERT's triple loss at bert-base -> 6 layers (8 x 128, fp32 on CPU): jaxdistil online
            (teacher forward in the step), jaxdistil from a top-k cache (``StepConfig.cached_teacher``:
            the batch carries the teacher's top-k logits and last hidden states, no teacher runs), and
            the eager PyTorch reference step of benchmarks/step.py (teacher forward included). Timed
            in rounds, each implementation once per round, so a slow phase of the machine touches all.
            The cached arrays are the teacher's outputs on the batch (their values do not change the
            step's cost).
  reader    ``TeacherCache`` + ``CachedBatches`` over a real cache of the step's shape on disk
            (written with the writer's own chunk code): batches per second, against the cached
            step's updates per second (the loader must keep up: >= 3x).
  disk      bytes per real token of caches with K = 8 / 32 / 128, with and without hidden states
            (bfloat16 values, uint16 ids: bert-base's 30522 and GPT-2's 50257 both fit), measured on
            the files.

  python benchmarks/teacher_cache.py                       # the figures of docs/teacher-cache.md
  python benchmarks/teacher_cache.py --shape tiny --rounds 2 --output cache-tiny.json   # seconds (tests)

Figures go to ``benchmarks/results/teacher_cache_cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as step_bench  # noqa: E402  (benchmarks/step.py: the online and PyTorch steps)

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_cache_cpu.json"
TOP_KS = (8, 32, 128)


def shapes(shape: str):
    """(teacher config, student config) at bert-base -> 6 layers, or a tiny pair for tests."""
    from jaxdistil.models import BertConfig, DistilBertConfig

    if shape == "tiny":
        return (BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128),
                DistilBertConfig(vocab_size=1000, dim=64, n_layers=1, n_heads=4, hidden_dim=128))
    return step_bench.recipe_configs("distilbert", 12, 6)


class CachedStep:
    """jaxdistil's step with the teacher read from the batch: ``build_jax_step``'s recipe with
    ``cached_teacher``; the batch's teacher arrays are the random teacher's top-k logits and hidden
    states on the batch."""

    def __init__(self, teacher_cfg, student_cfg, data: step_bench.BatchData, top_k: int):
        import jax
        import jax.numpy as jnp

        from jaxdistil.distill.builder import DistillStep, StepSpec
        from jaxdistil.models import build_model
        from jaxdistil.training import sharding as shd

        self.jax = jax
        cfg = step_bench.step_config(student_cfg, data.mask_id, "fp32")
        cfg = dataclasses.replace(cfg, cached_teacher=True)
        built = DistillStep(StepSpec(student_cfg, teacher_cfg, cfg, shd.MeshConfig(data=1)), devices=jax.devices()[:1])
        teacher = build_model(teacher_cfg)
        t_params = built.random_teacher(jax.random.PRNGKey(0))

        @jax.jit
        def outputs(p, ids, attn):
            enc = teacher.apply({"params": p}, ids, attention_mask=attn, deterministic=True, method="encode")
            logits = teacher.apply({"params": p}, enc.last_hidden_state, method="mlm_logits")
            values, idx = jax.lax.top_k(logits.astype(jnp.float32), top_k)
            return jnp.concatenate([idx.astype(jnp.float32), values], -1), enc.last_hidden_state

        top, hidden = outputs(t_params, data.batch["input_ids"], data.batch["attention_mask"])
        del t_params
        batch = dict(data.batch, teacher_top_k=np.asarray(top), teacher_hidden=np.asarray(hidden))
        self.tokens = int(data.batch["attention_mask"].sum())
        self.state = built.init_state(jax.random.PRNGKey(1))
        self.args = (built.shard_batch(batch), built.consts(None, jnp.asarray(data.token_weights)))
        t0 = time.perf_counter()
        self.step = built.train_step.lower(self.state, *self.args).compile()
        self.compile_s = time.perf_counter() - t0

    def run(self, n: int) -> dict:
        metrics = None
        for _ in range(n):
            self.state, metrics = self.step(self.state, *self.args)
        self.jax.block_until_ready((self.state, metrics))
        return {k: float(v) for k, v in metrics.items() if not isinstance(v, dict)}


def write_cache(root: Path, steps: int, rows: int, seq: int, vocab: int, hidden: int, top_k: int,
                with_hidden: bool) -> Path:
    """A cache of ``steps`` updates in the writer's format (its chunk code, its index), random values."""
    import ml_dtypes

    from jaxdistil.cache_teacher import _write_chunk
    from jaxdistil.distill.teacher_cache import FORMAT

    rng = np.random.default_rng(0)
    block = root / f"rows-0-{rows}"
    block.mkdir(parents=True)
    arrays = {}
    for s in range(steps):
        arrays[f"{s}/input_ids"] = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
        arrays[f"{s}/top_k_ids"] = rng.integers(0, vocab, (rows, seq, top_k)).astype(np.uint16)
        arrays[f"{s}/top_k_logits"] = rng.normal(size=(rows, seq, top_k)).astype(ml_dtypes.bfloat16)
        if with_hidden:
            arrays[f"{s}/hidden"] = rng.normal(size=(rows, seq, hidden)).astype(ml_dtypes.bfloat16)
    chunk = _write_chunk(block, arrays, 0, steps - 1)
    (block / "index.json").write_text(json.dumps({"rows": [0, rows], "chunks": [chunk]}))
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "identity": {}, "top_k": top_k,
                                                    "hidden": with_hidden}))
    return root


def reader_rate(root: Path, steps: int, rows: int) -> float:
    """Batches per second of ``CachedBatches`` over the cache at ``root`` (a cold open included)."""
    from jaxdistil.distill.teacher_cache import CachedBatches, TeacherCache

    cache = TeacherCache(root)
    host = [{"input_ids": cache.rows(s, 0, rows)["input_ids"]} for s in range(steps)]
    cache = TeacherCache(root)  # a fresh reader: sha256 checks and file opens are timed too
    t0 = time.perf_counter()
    for batch in CachedBatches(iter(host), cache, slice(0, rows), 0):
        assert batch["teacher_top_k"].dtype == np.float32
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("bert-base", "tiny"), default="bert-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=32, help="K of the cached step")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per implementation (after a warm-up)")
    parser.add_argument("--reader-steps", type=int, default=32)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference step")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    import jax

    load_before = os.getloadavg()[0]
    teacher_cfg, student_cfg = shapes(args.shape)
    data = step_bench.BatchData.random(args.batch, args.seq, student_cfg.vocab_size)
    bench_args = argparse.Namespace(no_dropout=False)
    impls = {"jax-online": lambda: step_bench.JaxStep(bench_args, teacher_cfg, student_cfg, args.batch, args.seq,
                                                      "fp32", data=data),
             "jax-cached": lambda: CachedStep(teacher_cfg, student_cfg, data, args.top_k)}
    if not args.no_torch:
        impls["torch-eager"] = lambda: step_bench.TorchStep(bench_args, teacher_cfg, student_cfg, args.batch,
                                                            args.seq, "fp32", gpu=False, compile=False, data=data)
    steps, rows = {}, {}
    for name, make in impls.items():
        print(f"building {name} ...", flush=True)
        steps[name] = make()
        steps[name].run(1)  # warm-up
        rows[name] = {"step_s": [], "cpu_s": []}
    for _ in range(args.rounds):
        for name, s in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(1)
            rows[name]["step_s"].append(time.perf_counter() - t0)
            rows[name]["cpu_s"].append(time.process_time() - c0)
    tokens = int(data.batch["attention_mask"].sum())
    for r in rows.values():
        r["median_step_s"] = float(np.median(r["step_s"]))
        r["tokens_per_s"] = tokens / r["median_step_s"]
        r["cpu_s_per_step"] = float(np.median(r["cpu_s"]))
    cached = rows["jax-cached"]["tokens_per_s"]
    ratios = {f"cached_vs_{n}": cached / rows[n]["tokens_per_s"] for n in rows if n != "jax-cached"}
    del steps

    hidden = teacher_cfg.hidden
    disk, reader = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in TOP_KS:
            for with_hidden in (False, True):
                root = write_cache(Path(tmp) / f"k{k}-{int(with_hidden)}", 4, args.batch, args.seq,
                                   student_cfg.vocab_size, hidden, k, with_hidden)
                size = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
                disk[f"k{k}" + ("+hidden" if with_hidden else "")] = size / (4 * tokens)
        root = write_cache(Path(tmp) / "reader", args.reader_steps, args.batch, args.seq, student_cfg.vocab_size,
                           hidden, args.top_k, True)
        reader["batches_per_s"] = reader_rate(root, args.reader_steps, args.batch)
    reader["cached_steps_per_s"] = 1.0 / rows["jax-cached"]["median_step_s"]
    reader["headroom"] = reader["batches_per_s"] / reader["cached_steps_per_s"]
    report = {"shape": args.shape, "batch": [args.batch, args.seq], "dtype": "float32", "top_k": args.top_k,
              "rounds": args.rounds, "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "processor": platform.processor(), "load_before": load_before, "load_after": os.getloadavg()[0],
              "steps": rows, "ratios": ratios, "reader": reader, "disk_bytes_per_token": disk}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in rows.items():
        print(f"{name:12s} {r['tokens_per_s']:9.1f} tok/s  {r['median_step_s']:.3f} s/step  {r['cpu_s_per_step']:.2f} CPU-s")
    print("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"reader {reader['batches_per_s']:.1f} batches/s vs {reader['cached_steps_per_s']:.2f} steps/s "
          f"({reader['headroom']:.0f}x); bytes/token " + ", ".join(f"{k} {v:.0f}" for k, v in disk.items()))
    print(f"load average {load_before:.2f} before, {report['load_after']:.2f} after; written {out}")
    return report


if __name__ == "__main__":
    main()
