"""Memory and time per step of each distillation objective, bert-base -> 6 layers, in one run.

Every recipe is a shipped run config (its ``terms:`` and ``teachers:``) built by the library's one
builder (``jaxdistil.distill.builder.run_step_spec`` / ``DistillStep``) on random weights of the
real shapes: the bert-base-uncased teacher (12 layers, 768 wide, vocab 30522) and the recipe's
student (6 layers copied from the teacher for DistilBERT's recipes; TinyBERT's own 4 x 312 student;
MiniLMv2's 6 x 768). The batch is ``--batch`` full rows of ``--seq`` tokens, fp32, one device,
no gradient accumulation. Per recipe: XLA's compiled memory analysis of the train step (temporaries,
arguments = state + batch + teacher params, outputs), and the step's tokens/s and CPU seconds per
step over ``--steps`` timed steps after one warm-up step; the recipes are timed in turn, round by
round, so a slow phase of the machine touches them all.

  python benchmarks/objectives.py                      # the table of docs/objectives.md
  python benchmarks/objectives.py --shape tiny --steps 1 --output objectives-tiny.json   # seconds (tests)

Figures go to ``benchmarks/results/objectives_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "objectives_cpu.json"

# name -> (shipped config, overrides, what it is); every recipe in fp32 with one micro-batch.
RECIPES = {
    "distilbert": ("distilbert-base-uncased", [], "DistilBERT: 5 KL + 2 MLM + 1 cos (the reference's)"),
    "distilbert-masked-kl": ("distilbert-base-uncased", ["terms[0].rows=masked"],
                             "the same, KL on the masked rows only (--restrict_ce_to_mask)"),
    "jsd": ("distilbert-base-uncased", ["terms[0].kind=jsd"], "the same with JSD(0.5) for the KL"),
    "two-teachers": ("distilbert-base-uncased", ["terms[0].teacher=[teacher, second]"],
                     "the same, soft targets from a mixture of two bert-base teachers"),
    "tinybert-general": ("tinybert-general", [], "TinyBERT general: embedding + hidden + attention-score MSE"),
    "minilmv2": ("minilmv2-base", [], "MiniLMv2: Q-Q / K-K / V-V relations, 48 relation heads"),
    "mlm-only": ("distilbert-base-uncased", ["teacher.model=null", "terms=[{kind: mlm_ce}]"],
                 "no teacher: the student's MLM loss alone (the floor)"),
}


def _overrides(recipe: str, extra: list[str]) -> list[str]:
    """The recipe's overrides as ``key=value`` strings; ``terms[0].x=...`` edits the first term."""
    return [o for o in extra if not o.startswith("terms[0].")]


def _config(recipe: str, shape: str):
    from jaxdistil.distill.config import config_from_dict
    from jaxdistil.config import read_yaml

    name, extra, _ = RECIPES[recipe]
    raw = read_yaml(name)
    for o in (o for o in extra if o.startswith("terms[0].")):  # edits of the first term
        key, value = o[len("terms[0]."):].split("=", 1)
        import yaml

        raw["terms"][0][key] = yaml.safe_load(value)
    if recipe == "two-teachers":
        raw["teachers"] = [{"name": "second", "model": "bert-base-uncased", "weight": 1.0}]
    common = ["train.dtype=float32", "train.attention=xla", "optim.grad_accum_steps=1", "mesh.data=1",
              "loss.chunk_rows=2048"]
    if shape == "tiny":
        common.append("student.layers=0,1")
    return config_from_dict(raw, _overrides(recipe, extra) + common)


def _shapes(cfg, shape: str):
    """(teacher config or None, extra teacher configs, student config) of a recipe at ``shape``."""
    from jaxdistil.models import BertConfig
    from jaxdistil.students import student_shape

    if shape == "tiny":
        teacher = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=128)
    else:
        teacher = BertConfig()  # bert-base-uncased's shape
    student = student_shape(cfg, teacher, teacher.vocab_size, 0)
    if shape == "tiny" and cfg.student.init == "random":
        import dataclasses

        small = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
                 "n_layers": 1, "dim": 32, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 128}
        student = dataclasses.replace(student, **{k: v for k, v in small.items() if hasattr(student, k)})
    return (teacher if cfg.teacher.model else None), [teacher for _ in cfg.teachers], student


def build(recipe: str, shape: str, batch: int, seq: int):
    """(jitted step, its compiled memory analysis, state, batch, consts) of a recipe."""
    import jax

    from jaxdistil.distill.builder import DistillStep, run_step_spec

    cfg = _config(recipe, shape)
    teacher, extra, student = _shapes(cfg, shape)
    if shape == "tiny":  # relation heads / layer maps of the real recipes do not fit the tiny models
        cfg = _fit_tiny(cfg)
    spec = run_step_spec(cfg, student, teacher, mask_id=3, total_steps=1000, extra_teachers=extra)
    built = DistillStep(spec, devices=jax.devices()[:1])
    state = built.init_state(jax.random.PRNGKey(0))
    t_params = built.random_teacher(jax.random.PRNGKey(1)) if teacher is not None else None
    extras = [built.random_teacher(jax.random.PRNGKey(2 + i), i + 1) for i in range(len(extra))]
    vocab = student.vocab_size
    rng = np.random.default_rng(0)
    host = {"input_ids": rng.integers(5, vocab, size=(batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32)}
    weights = np.ones((vocab,), np.float32)
    weights[:5] = 0.0
    data = built.shard_batch(host)
    consts = built.consts(t_params, weights, extras)
    compiled = built.train_step.lower(state, data, consts).compile()
    return built.train_step, compiled.memory_analysis(), state, data, consts


def _fit_tiny(cfg):
    import dataclasses

    terms = []
    for t in cfg.terms:
        if t.kind == "minilmv2_relations":
            t = dataclasses.replace(t, relation_heads=4, layers=None)
        elif t.layers is not None:
            t = dataclasses.replace(t, layers=((0, 0), (1, 2)) if t.kind.startswith("hidden") else ((0, 1),))
        terms.append(t)
    return dataclasses.replace(cfg, terms=tuple(terms))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--shape", choices=("bert-base", "tiny"), default="bert-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per recipe (after one warm-up step)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    import jax

    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}; the recipes are {', '.join(RECIPES)}")
    load_before = os.getloadavg()[0]
    steps, rows = {}, {}
    for name in names:
        print(f"compiling {name} ...", flush=True)
        t0 = time.perf_counter()
        step, mem, state, data, consts = build(name, args.shape, args.batch, args.seq)
        state, m = step(state, data, consts)  # warm-up
        jax.block_until_ready(m["loss"])
        steps[name] = [step, state, data, consts]
        rows[name] = {"what": RECIPES[name][2], "config": RECIPES[name][0],
                      "compile_and_warmup_s": round(time.perf_counter() - t0, 1),
                      "temp_mb": mem.temp_size_in_bytes / 2**20, "argument_mb": mem.argument_size_in_bytes / 2**20,
                      "output_mb": mem.output_size_in_bytes / 2**20, "step_s": [], "cpu_s": [],
                      "loss": float(m["loss"])}
    for _ in range(args.steps):  # rounds: every recipe once per round
        for name in names:
            step, state, data, consts = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            state, m = step(state, data, consts)
            jax.block_until_ready(m["loss"])
            rows[name]["step_s"].append(time.perf_counter() - t0)
            rows[name]["cpu_s"].append(time.process_time() - c0)
            steps[name][1] = state
    tokens = args.batch * args.seq
    for name in names:
        r = rows[name]
        r["median_step_s"] = float(np.median(r["step_s"]))
        r["tokens_per_s"] = tokens / r["median_step_s"]
        r["cpu_s_per_step"] = float(np.median(r["cpu_s"]))
    base = rows.get("distilbert", rows[names[0]])
    for r in rows.values():
        r["time_vs_distilbert"] = r["median_step_s"] / base["median_step_s"]
    report = {"shape": args.shape, "batch": [args.batch, args.seq], "dtype": "float32", "steps": args.steps,
              "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "processor": platform.processor(),
              "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0], "recipes": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'recipe':22}{'tokens/s':>10}{'step s':>9}{'CPU s':>8}{'vs DistilBERT':>15}{'temp MB':>10}{'args MB':>10}")
    for name, r in rows.items():
        print(f"{name:22}{r['tokens_per_s']:>10.1f}{r['median_step_s']:>9.2f}{r['cpu_s_per_step']:>8.2f}"
              f"{r['time_vs_distilbert']:>15.2f}{r['temp_mb']:>10.0f}{r['argument_mb']:>10.0f}")
    print(f"load average {load_before:.2f} before, {report['load_avg_after']:.2f} after; written {args.output}")
    return report


if __name__ == "__main__":
    main()
