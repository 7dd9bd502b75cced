"""The whole method, end to end, on a 2-core CPU in minutes (``jaxdistil demo [--output DIR]``).

  1. data      the built-in corpus (docstrings of the Python standard library), a WordPiece
               tokenizer trained on it, tokenized into train / held-out shards (``jaxdistil prepare``)
  2. teacher   a small BERT pre-trained from scratch with the MLM loss alone (``train``, no teacher)
  3. student   a DistilBERT of half its depth, initialised from the teacher's layers 0 and 2, distilled
               with the paper's triple loss (``train --config configs/demo.yaml``)
  4. evaluate  both on the held-out text with the same masks: MLM accuracy and perplexity
  5. export    the student as a Hugging Face DistilBertForMaskedLM, checked against transformers
  6. report    parameters, accuracy, perplexity, the student's retention of the teacher's accuracy,
               their inference speed ratio: printed, saved as DIR/report.json and a plot DIR/report.png

Every stage is a library call of its own command, and every stage resumes: running the demo again
reuses the data and the finished runs and only rebuilds the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np

from jaxdistil.config import load_run_config
from jaxdistil.data.loader import LoaderConfig, eval_batches
from jaxdistil.data.manifest import MANIFEST_NAME
from jaxdistil.data.prepare import PrepareConfig, prepare
from jaxdistil.errors import UserError
from jaxdistil.evaluation import evaluate_model
from jaxdistil.hf import export_model, load_model
from jaxdistil.metrics import read_metrics
from jaxdistil.models import build_model
from jaxdistil.train import train

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
VOCAB = 2000  # WordPiece tokens trained on the corpus (a small vocabulary keeps the MLM head cheap)
MAX_LEN = 64

# The teacher: configs/demo.yaml with these overrides: an MLM-only run of a randomly initialised BERT.
# It masks 40% of the tokens instead of 15%: more supervision per step, which pre-training from
# scratch on a budget of a few hundred steps needs (Wettig et al. 2023, "Should You Mask 15% in MLM?").
TEACHER_STAGE = [
    "teacher.model=null",
    "student.init=random",
    "student.model_type=bert",
    (
        "student.config={hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 4, "
        f"intermediate_size: 512, max_position_embeddings: {MAX_LEN}, "
        "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"
    ),
    "loss.alpha_ce=0.0",
    "loss.alpha_cos=0.0",
    "loss.alpha_mlm=1.0",
    "masking.mlm_mask_prop=0.4",
    "optim.learning_rate=2.0e-3",
    "train.steps=400",
]


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def forward_times(
    models: list[tuple[Any, Any]], batch: dict[str, np.ndarray], repeats: int = 10
) -> list[float]:
    """Best wall time (s) of a jitted forward pass (logits of every token) of each (config, params)
    on ``batch``; the models take turns so that a busy machine slows them alike."""
    ids, mask = jax.device_put(batch["input_ids"]), jax.device_put(batch["attention_mask"])
    runs = []
    for cfg, params in models:
        model = build_model(cfg)
        forward = jax.jit(lambda p, i, m, model=model: model.apply({"params": p}, i, attention_mask=m).logits)
        params = jax.device_put(params)
        forward(params, ids, mask).block_until_ready()  # compile
        runs.append((forward, params))
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for k, (forward, params) in enumerate(runs):
            start = time.perf_counter()
            forward(params, ids, mask).block_until_ready()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def plot(report: dict[str, Any], teacher_hist: dict, student_hist: dict, path: Path) -> None:
    """Loss curves of both runs and held-out accuracy, as a PNG (matplotlib, Agg backend)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    t_train = teacher_hist["train"]
    s_train = student_hist["train"]
    left.plot(
        [r["step"] for r in t_train], [r["loss_mlm"] for r in t_train], label="teacher pre-training: L_mlm"
    )
    for key, label in (
        ("loss", "student: total (5 L_ce + 2 L_mlm + L_cos)"),
        ("loss_ce", "student: L_ce"),
        ("loss_mlm", "student: L_mlm"),
        ("loss_cos", "student: L_cos"),
    ):
        left.plot([r["step"] for r in s_train], [r[key] for r in s_train], label=label)
    left.set_xlabel("update")
    left.set_ylabel("training loss")
    left.set_yscale("log")
    left.set_title("training losses")
    left.legend(fontsize=8)
    t_eval = [r for r in teacher_hist["eval"] if "student_accuracy" in r]
    s_eval = [r for r in student_hist["eval"] if "student_accuracy" in r]
    right.plot(
        [r["step"] for r in t_eval],
        [r["student_accuracy"] for r in t_eval],
        "o-",
        label="teacher (pre-training)",
    )
    right.plot(
        [r["step"] for r in s_eval],
        [r["student_accuracy"] for r in s_eval],
        "o-",
        label="student (distillation)",
    )
    right.axhline(report["teacher"]["accuracy"], color="gray", ls="--", lw=1, label="teacher, final")
    right.set_xlabel("update")
    right.set_ylabel("held-out MLM accuracy")
    right.set_title(f"student keeps {report['retention'] * 100:.1f}% of the teacher's accuracy")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    t, s = report["teacher"], report["student"]
    init = report.get("student_init")
    copied = (
        [f"{'  student as copied':22}{'':>14}{init['accuracy']:>14.4f}"
         f"  (accuracy before distillation; perplexity {init['perplexity']:.2f})"]
        if init else []
    )
    lines = [
        f"{'':22}{'teacher':>14}{'student':>14}",
        f"{'architecture':22}{t['architecture']:>14}{s['architecture']:>14}",
        f"{'layers':22}{t['layers']:>14}{s['layers']:>14}",
        f"{'parameters':22}{t['params'] / 1e6:>13.2f}M{s['params'] / 1e6:>13.2f}M",
        f"{'held-out MLM accuracy':22}{t['accuracy']:>14.4f}{s['accuracy']:>14.4f}",
        f"{'held-out perplexity':22}{t['perplexity']:>14.2f}{s['perplexity']:>14.2f}",
        *copied,
        f"{'forward pass (ms)':22}{t['forward_ms']:>14.1f}{s['forward_ms']:>14.1f}",
        "",
        f"retention (student accuracy / teacher accuracy): {report['retention'] * 100:.1f}%",
        f"inference speed-up of the student: {report['speedup']:.2f}x",
        f"held-out set: {report['heldout_masked_tokens']:,} masked of {report['heldout_tokens']:,} tokens",
        f"export: {report['export']}",
        f"wall time: {report['wall_time_s']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds"].items())
        + ")",
    ]
    return "\n".join(lines)


def demo(
    output: str | Path = "demo-out",
    *,
    teacher_steps: int | None = None,
    student_steps: int | None = None,
    export: bool = True,
) -> dict[str, Any]:
    """Runs the demo into ``output`` and returns the report (also written to report.json / .png)."""
    out = Path(output).expanduser().absolute()
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    data_dir, teacher_dir, student_dir = out / "data", out / "teacher", out / "student"
    common = [f"data.dir={data_dir}", f"loader.max_len={MAX_LEN}"]

    # 1. data
    t0 = time.perf_counter()
    if (data_dir / MANIFEST_NAME).is_file():
        _stage(f"data: reusing {data_dir}")
    else:
        _stage("data: the built-in corpus -> WordPiece tokenizer -> tokenized shards")
        out.mkdir(parents=True, exist_ok=True)
        prepare(PrepareConfig("builtin:python-docs", f"train:{VOCAB}", data_dir, max_len=MAX_LEN, force=True))
    seconds["data"] = time.perf_counter() - t0

    # 2. teacher: MLM-only pre-training of a small BERT
    t0 = time.perf_counter()
    _stage("teacher: pre-training a 4-layer BERT with the MLM loss")
    teacher_over = TEACHER_STAGE + common + [f"run_dir={teacher_dir}"]
    if teacher_steps:
        teacher_over.append(f"train.steps={teacher_steps}")
    t_cfg = load_run_config(CONFIG, teacher_over)
    t_res = train(t_cfg)
    if t_res.interrupted is not None:
        raise UserError("the demo was interrupted; run it again to resume")
    seconds["teacher"] = time.perf_counter() - t0

    # 3. student: distillation from the teacher's layers 0 and 2
    t0 = time.perf_counter()
    _stage("student: distilling a 2-layer DistilBERT from teacher layers 0, 2 (5 L_ce + 2 L_mlm + L_cos)")
    student_over = common + [f"run_dir={student_dir}", f"teacher.model={teacher_dir}"]
    if student_steps:
        student_over.append(f"train.steps={student_steps}")
    s_res = train(load_run_config(CONFIG, student_over))
    if s_res.interrupted is not None:
        raise UserError("the demo was interrupted; run it again to resume")
    seconds["student"] = time.perf_counter() - t0

    # 4. evaluate both on the whole held-out split, same masks
    t0 = time.perf_counter()
    _stage("evaluation on held-out text")
    t_eval = evaluate_model(str(teacher_dir), str(data_dir), batch_size=32, max_len=MAX_LEN)
    s_eval = evaluate_model(str(student_dir), str(data_dir), batch_size=32, max_len=MAX_LEN)
    teacher, student = load_model(str(teacher_dir)), load_model(str(student_dir))
    batch = next(
        iter(eval_batches(str(data_dir), LoaderConfig(batch_size=32, max_len=MAX_LEN, buckets=(MAX_LEN,))))
    )
    t_time, s_time = forward_times(
        [(teacher.config, teacher.params), (student.config, student.params)], batch
    )
    seconds["evaluate"] = time.perf_counter() - t0

    # 5. export the student to Hugging Face format
    t0 = time.perf_counter()
    export_note = "skipped"
    if export:
        _stage("export: the student as a Hugging Face DistilBertForMaskedLM")
        rep = export_model(str(student_dir), out / "student-hf", force=True)
        export_note = (
            f"{rep.output} (transformers logits match within {rep.max_abs_diff:.1e})"
            if rep.verified
            else f"{rep.output} ({rep.note})"
        )
        print(export_note)
    seconds["export"] = time.perf_counter() - t0

    # 6. report
    def describe(loaded, ev, seconds_):
        return {
            "architecture": type(loaded.config).__name__.replace("Config", ""),
            "layers": loaded.config.layers,
            "hidden": loaded.config.hidden,
            "params": int(ev["params"]),
            "accuracy": ev["accuracy"],
            "perplexity": ev["perplexity"],
            "loss": ev["loss"],
            "forward_ms": seconds_ * 1e3,
        }

    # The student's run evaluated it at step 0 (teacher layers copied, not yet distilled) on the same
    # held-out batches and masks as evaluate_model.
    first = next((r for r in read_metrics(student_dir)["eval"] if r["step"] == 0), None)
    report = {
        "teacher": describe(teacher, t_eval, t_time),
        "student": describe(student, s_eval, s_time),
        "student_init": (
            {"accuracy": first["student_accuracy"], "perplexity": first["student_perplexity"]}
            if first
            else None
        ),
        "retention": s_eval["accuracy"] / max(t_eval["accuracy"], 1e-12),
        "speedup": t_time / s_time,
        "heldout_tokens": int(t_eval["tokens"]),
        "heldout_masked_tokens": int(t_eval["masked_tokens"]),
        "steps": {"teacher": t_res.step, "student": s_res.step},
        "export": export_note,
        "device": f"{jax.devices()[0].platform} x {jax.device_count()}",
        "output": str(out),
    }
    report["stage_seconds"] = seconds
    report["wall_time_s"] = time.perf_counter() - start
    plot(report, read_metrics(teacher_dir), read_metrics(student_dir), out / "report.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
