"""A fixed tiny distillation run whose outputs are committed beside this file (``golden/``).

The redesign of the package promised behaviour unchanged: ``tests/test_golden_run.py`` runs this
again and compares its per-step losses with ``golden/metrics.jsonl`` (bit for bit where the run is
made on the same CPU model and JAX version as the recording, within 1e-5 elsewhere), and restores
the checkpoint in ``golden/run/`` written by the code of the time.

Everything is built from fixed inputs: the corpus from Python's ``random`` (platform independent),
the committed tokenizer (``golden/tokenizer``; WordPiece training is not bit-reproducible), a
teacher drawn with numpy's ``default_rng``.

  python tests/data/golden_run.py     # re-records golden/ (only when the numbers are meant to change)
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
STEPS = 12
LOSS_KEYS = ("loss", "loss_ce", "loss_mlm", "loss_cos", "mlm_accuracy", "grad_norm", "lr", "param_norm",
             "student_loss", "student_accuracy", "teacher_loss", "teacher_accuracy")


def corpus_text() -> str:
    rng = random.Random(0)
    words = ("the a of to and in is it that for on with as was by this be are from at or an have not "
             "which but all can one were their there has more will its also").split()
    words += [f"{c}{v}{d}" for c in "bcdfglmnprst" for v in "aeiou" for d in "nr"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(14, 40))) for _ in range(300)) + "\n"


def build_inputs(root: Path) -> tuple[Path, Path]:
    """(data dir, teacher dir) under ``root``, from the fixed inputs."""
    import numpy as np

    import jax
    from jaxdistil.data.manifest import load_manifest, tokenizer_dir
    from jaxdistil.data.corpus import SourceOptions
    from jaxdistil.data.prepare import PrepareConfig, prepare
    from jaxdistil.hf import save_flax_model
    from jaxdistil.models import BertConfig, build_model, init_params

    (root / "corpus.txt").write_text(corpus_text())
    data = root / "data"
    prepare(PrepareConfig([str(root / "corpus.txt")], str(GOLDEN / "tokenizer"), data, max_len=32, workers=1,
                          options=SourceOptions(holdout=0.1)), progress=False, log=lambda *a: None)
    manifest = load_manifest(data)
    cfg = BertConfig(vocab_size=manifest["tokenizer"]["vocab_size"], hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    teacher = root / "teacher"
    save_flax_model(cfg, params, teacher, tokenizer_dir=tokenizer_dir(manifest))
    return data, teacher


def run_config(run_dir: Path, data: Path, teacher: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher", "layers": [1]},
        "data": {"dir": str(data)},
        "loader": {"batch_size": 16, "max_len": 32, "buckets": [32], "read_threads": 1, "prefetch": 0},
        "optim": {"learning_rate": 1e-3, "grad_accum_steps": 2},
        "train": {"steps": STEPS, "eval_every": 4, "eval_batches": 2, "log_every": 1},
        "checkpoint": {"every": 4, "keep": 2, "keep_best": 0, "async_save": False},
        "logging": {"progress": False, "tensorboard": False, "peak_tflops": 1.0},
    }


def losses(run_dir: Path) -> list[dict]:
    """The metrics that must not change, per logged line."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: record[k] for k in ("step", "kind", *LOSS_KEYS) if k in record})
    return out


def environment() -> dict:
    import jax

    import hashlib

    # The CPU's name and its feature flags: hosts named alike ("AMD EPYC") can be different
    # microarchitectures, whose XLA kernels sum in another order (not bit for bit).
    cpu, flags = platform.processor(), ""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
        flags = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "jax": jax.__version__,
            "devices": jax.device_count()}


def record() -> None:
    import os
    import tempfile

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from jaxdistil.config import config_from_dict
    from jaxdistil.train import train

    with tempfile.TemporaryDirectory() as tmp:
        data, teacher = build_inputs(Path(tmp))
        run = Path(tmp) / "run"
        train(config_from_dict(run_config(run, data, teacher)), log=lambda *a: None)
        kept = GOLDEN / "run"
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for name in ("student", "checkpoints"):
            shutil.copytree(run / name, kept / name)
        (GOLDEN / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in losses(run)))
        (GOLDEN / "environment.json").write_text(json.dumps(environment(), indent=1) + "\n")
    print(f"recorded {GOLDEN}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    record()
