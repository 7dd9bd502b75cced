"""Shared by the tests that run ``train``: a prepared tiny data dir, a random BERT teacher for it,
the base run config, and the per-step losses of a run's metrics.jsonl."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import numpy as np

STEPS = 12


def make_data_dir(root: Path) -> Path:
    """A prepared data dir: 400 lines of synthetic text, a WordPiece vocab of ~230, max_len 32."""
    from jaxdistil.data.corpus import SourceOptions
    from jaxdistil.data.prepare import PrepareConfig, prepare

    rng = random.Random(0)
    words = (
        "the a of to and in is it that for on with as was by this be are from at or an have not "
        "which but all can one were their there has more will its also"
    ).split()
    words += [f"{c}{v}{d}" for c in "bcdfglmnprst" for v in "aeiou" for d in "nr"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(14, 40))) for _ in range(400))
    (root / "corpus.txt").write_text(text + "\n")
    prepare(PrepareConfig([str(root / "corpus.txt")], "train:300", root / "data", max_len=32, workers=1,
                          options=SourceOptions(holdout=0.1)), progress=False, log=lambda *a: None)
    return root / "data"


def make_teacher_dir(out: Path, data_dir: Path) -> Path:
    """A random 2-layer BERT teacher (Flax model dir) with the data's tokenizer."""
    from jaxdistil.data.manifest import load_manifest, tokenizer_dir
    from jaxdistil.hf import save_flax_model
    from jaxdistil.models import BertConfig, build_model, init_params

    manifest = load_manifest(data_dir)
    cfg = BertConfig(
        vocab_size=manifest["tokenizer"]["vocab_size"],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    save_flax_model(cfg, params, out, tokenizer_dir=tokenizer_dir(manifest))
    return out


def base_config(run_dir: Path, data_dir: Path, teacher_dir: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "teacher", "layers": [1]},
        "data": {"dir": str(data_dir)},
        "loader": {"batch_size": 8, "max_len": 32, "buckets": [32], "read_threads": 1, "prefetch": 1},
        "optim": {"learning_rate": 1e-3},
        "train": {"steps": STEPS, "eval_every": 4, "eval_batches": 2, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 10, "keep_best": 0},
        "logging": {"progress": False, "peak_tflops": 1.0},
    }


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from RUN/metrics.jsonl (each step must appear once)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out
