"""Fine-tuning and GLUE evaluation (jaxdistil.finetune, models.classification): parity with
transformers' sequence classifiers, export, tasks (tfds GLUE through mock_data, files), metrics
against independent formulas, exact resume, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdistil import cli
from jaxdistil.errors import UserError
from jaxdistil.finetune import metrics as ft_metrics
from jaxdistil.finetune.config import load_finetune_config
from jaxdistil.finetune.predict import predict
from jaxdistil.finetune.run import finetune
from jaxdistil.finetune.tasks import TaskConfig, load_task
from jaxdistil.hf import export_model, files, load_model
from jaxdistil.hf.verify import flax_classifier_logits, torch_classifier_logits
from jaxdistil.selfcheck import save_random_hf_model

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "fixtures" / "golden" / "tokenizer"
VOCAB = len([line for line in (TOKENIZER / "vocab.txt").read_text().splitlines() if line])
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, initializer_range=0.2)
DISTIL = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40,
              initializer_range=0.2)


def hf_model(directory: Path, arch: str, **extra) -> Path:
    config = dict(BERT if arch.startswith("Bert") else DISTIL, **extra)
    out = save_random_hf_model(arch, directory, **config)
    for name in os.listdir(TOKENIZER):
        shutil.copy(TOKENIZER / name, out)
    return out


def ragged(seed: int, pairs: bool):
    rng = np.random.default_rng(seed)
    lengths = [13, 9, 4, 11]
    t = max(lengths)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = (rng.integers(5, VOCAB, (4, t)) * mask).astype(np.int32)
    types = ((np.arange(t)[None] >= np.asarray([6, 5, 2, 4])[:, None]) * mask).astype(np.int32) if pairs else None
    return ids, mask, types


# --------------------------------------------------------------------------------------------------
# Models: parity with transformers, export, pipeline
# --------------------------------------------------------------------------------------------------

CASES = [
    ("BertForSequenceClassification", dict(num_labels=3), True),
    ("BertForSequenceClassification", dict(num_labels=1, problem_type="regression"), True),
    ("DistilBertForSequenceClassification", dict(num_labels=2), False),
    ("DistilBertForSequenceClassification", dict(num_labels=1, problem_type="regression"), False),
]


@pytest.mark.parametrize("arch,extra,pairs", CASES, ids=["bert-3", "bert-regression", "distil-2", "distil-regression"])
def test_classifier_parity_with_transformers(tmp_path, arch, extra, pairs):
    directory = hf_model(tmp_path / "m", arch, **extra)
    loaded = load_model(directory)
    assert loaded.head.num_labels == extra["num_labels"]
    assert loaded.head.regression == (extra.get("problem_type") == "regression")
    ids, mask, types = ragged(0, pairs)
    ours = flax_classifier_logits(loaded.config, loaded.head, loaded.classifier_params(), ids, mask, types)
    theirs = torch_classifier_logits(directory, ids, mask, types)
    assert ours.shape == theirs.shape == (4, extra["num_labels"])
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    assert float(np.abs(theirs).max()) > 1e-2  # not a vacuous comparison
    # Export round trip: the same tensors, bit for bit, verified in transformers.
    report = export_model(directory, tmp_path / "out")
    assert report.verified and report.max_abs_diff <= 1e-4
    a, b = files.read_state_dict(directory), files.read_state_dict(tmp_path / "out")
    for name, value in b.items():
        np.testing.assert_array_equal(value, a[name], err_msg=name)
    assert set(b) == {k for k in a if not k.endswith("position_ids")}
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == [arch] and len(exported["id2label"]) == extra["num_labels"]


def test_predict_equals_the_text_classification_pipeline(tmp_path):
    from transformers import pipeline

    directory = hf_model(tmp_path / "m", "BertForSequenceClassification", num_labels=3,
                         id2label={0: "neg", 1: "mid", 2: "pos"}, label2id={"neg": 0, "mid": 1, "pos": 2})
    report = export_model(directory, tmp_path / "exported")
    assert report.verified
    classify = pipeline("text-classification", model=str(tmp_path / "exported"), device="cpu")
    texts = ["the a of to and", "which there from", "it that for on with"]
    ours = predict(load_model(tmp_path / "exported"), texts)
    theirs = classify(texts)
    for a, b in zip(ours, theirs):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-4, (a, b)
    pair = predict(load_model(directory), [("the a", "of to")])[0]
    assert pair["label"] in ("neg", "mid", "pos")


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def test_glue_tasks_through_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=9):
        sst2 = load_task(TaskConfig(name="sst2"))
        mrpc = load_task(TaskConfig(name="glue/mrpc"))
        stsb = load_task(TaskConfig(name="tfds:glue/stsb"))
        mnli = load_task(TaskConfig(name="mnli"))
    assert len(sst2.train) == 9 and len(sst2.train.texts[0]) == 1 and sst2.metrics == ("accuracy",)
    assert sst2.num_labels == 2 and sst2.train.labels.dtype == np.int32
    assert len(mrpc.train.texts[0]) == 2 and mrpc.metrics == ("f1", "accuracy")
    assert stsb.regression and stsb.num_labels == 1 and stsb.train.labels.dtype == np.float32
    assert mnli.num_labels == 3 and set(mnli.validation) == {"validation_matched", "validation_mismatched"}
    assert mnli.metrics == ("accuracy_matched", "accuracy_mismatched")


def test_finetune_mnli_mock_two_validation_splits(tmp_path):
    model = hf_model(tmp_path / "m", "DistilBertForSequenceClassification", num_labels=3)
    cfg = load_finetune_config(None, [f"model={model}", "task.name=mnli", f"run_dir={tmp_path / 'run'}",
                                      "train.steps=2", "train.batch_size=8", "train.max_len=16",
                                      "logging.peak_tflops=1", "logging.progress=false"])
    with tfds.testing.mock_data(num_examples=12):
        result = finetune(cfg, log=lambda *a: None)
    assert set(result.last_eval) == {"accuracy_matched", "accuracy_mismatched", "score"}
    assert result.head_origin == "the model's own classification head"  # 3 labels fit MNLI


def _csv(path: Path, rows: list[tuple[str, str]], header=("sentence", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_task(tmp_path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    # Words of the test tokenizer's vocabulary (tests/fixtures/golden_run.py); the label is in two of them.
    words = "the a of to and in is it that for on with as was by this be are".split()
    rows = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        rows.append((" ".join(rng.choice(words, 6)) + (" which there" if label == "pos" else " from have"), label))
    return _csv(tmp_path / "task.csv", rows)


def test_local_csv_task_fine_tunes(tmp_path):
    task = load_task(TaskConfig(name=str(csv_task(tmp_path))))
    assert task.label_names == ("neg", "pos") and len(task.train) + len(task.validation["validation"]) == 120
    model = hf_model(tmp_path / "m", "BertForMaskedLM")
    run = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(model), "--task", str(tmp_path / "task.csv"),
                     f"run_dir={run}", "train.steps=30", "train.batch_size=16", "train.max_len=16",
                     "optim.learning_rate=1e-3", "logging.peak_tflops=1", "logging.progress=false"]) == 0
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["accuracy"] >= 0.9  # the label is in the words: learnable in a few steps
    loaded = load_model(run)
    assert loaded.head.label_names() == ("neg", "pos") and loaded.classifier is not None
    assert predict(loaded, ["the a of which there"])[0]["label"] == "pos"
    # The run exports as a transformers classifier, verified.
    report = export_model(run, tmp_path / "hf")
    assert report.verified and report.max_abs_diff <= 1e-4


# --------------------------------------------------------------------------------------------------
# Metrics against independent formulas
# --------------------------------------------------------------------------------------------------


def test_metrics_equal_their_definitions():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    tp, fp, fn, tn = (np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1)),
                      np.sum((p == 0) & (y == 0)))
    assert ft_metrics.metric("accuracy", p, y) == pytest.approx(np.mean(p == y))
    assert ft_metrics.metric("f1", p, y) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert ft_metrics.metric("mcc", p, y) == pytest.approx(mcc)
    a, b = rng.normal(size=300), rng.normal(size=300)
    b = a + rng.normal(size=300)
    assert ft_metrics.metric("pearson", a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731  (no ties in continuous data)
    assert ft_metrics.metric("spearman", a, b) == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1])
    # MNLI: each accuracy on its own split; the task score is the mean of its metrics, in percent.
    preds = {"validation_matched": np.array([0, 1, 2, 2]), "validation_mismatched": np.array([0, 0, 0, 0])}
    labels = {"validation_matched": np.array([0, 1, 2, 0]), "validation_mismatched": np.array([0, 1, 1, 1])}
    got = ft_metrics.task_metrics(("accuracy_matched", "accuracy_mismatched"), preds, labels)
    assert got == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.25}
    assert ft_metrics.task_score(got) == pytest.approx(50.0)
    assert ft_metrics.macro_score({"CoLA": 50.0, "SST-2": 90.0, "MRPC": 85.0}) == pytest.approx(75.0)


# --------------------------------------------------------------------------------------------------
# Exact resume and errors
# --------------------------------------------------------------------------------------------------


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    task = csv_task(tmp_path, 200)
    model = hf_model(tmp_path / "m", "BertForMaskedLM")
    common = [f"model={model}", f"task.name={task}", "train.steps=16", "train.batch_size=8",
              "train.max_len=16", "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=20",
              "optim.learning_rate=1e-3", "logging.peak_tflops=1", "logging.progress=false",
              "logging.tensorboard=false"]
    ref = tmp_path / "ref"
    finetune(load_finetune_config(None, [*common, f"run_dir={ref}"]), log=lambda *a: None)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdistil.cli", "finetune", "--model", str(model), "--task", str(task),
         *common, f"run_dir={run}"], env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"finetune exited early: {proc.stderr.read().decode()[-2000:]}")
            done = _losses(run) if (run / "metrics.jsonl").is_file() else {}
            if done and max(done) >= 7 and any(p.name.isdigit() for p in (run / "checkpoints").glob("*")):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the subprocess did not get far enough in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = finetune(load_finetune_config(None, [*common, f"run_dir={run}"]), log=lambda *a: None)
    assert result.step == 16
    assert _losses(run) == _losses(ref)  # bit for bit, every step


def _one_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line(tmp_path, capsys):
    model = hf_model(tmp_path / "m", "BertForMaskedLM")
    run = tmp_path / "run"
    base = ["finetune", "--model", str(model), f"run_dir={run}", "train.steps=1"]
    assert "unknown task 'nope'" in _one_line(capsys, [*base, "--task", "nope"])
    bad_columns = _csv(tmp_path / "cols.csv", [("x y", "pos")], header=("text", "label"))
    line = _one_line(capsys, [*base, "--task", str(bad_columns)])
    assert "no column 'sentence'" in line and "task.text_fields" in line
    labels = _csv(tmp_path / "labels.csv", [("a b c", "pos"), ("d e f", "maybe")])
    line = _one_line(capsys, [*base, "--task", str(labels), "task.labels=[neg,pos]"])
    assert "'maybe' is not one of the task's labels" in line
    weightless = tmp_path / "no-weights"
    weightless.mkdir()
    shutil.copy(model / "config.json", weightless)
    line = _one_line(capsys, ["finetune", "--model", str(weightless), "--task", str(csv_task(tmp_path)),
                              f"run_dir={run}"])
    assert "no weights found" in line
    assert not run.exists()  # nothing written
    with pytest.raises(UserError, match="outside the task's 2 labels"):
        with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: [{"sentence": b"x", "label": 5, "idx": 0}]):
            load_task(TaskConfig(name="sst2"))


def test_glue_command_compares_teacher_and_student(tmp_path, capsys):
    task = csv_task(tmp_path)
    teacher = hf_model(tmp_path / "teacher", "BertForMaskedLM")
    student = hf_model(tmp_path / "student", "DistilBertForMaskedLM")
    out = tmp_path / "glue"
    assert cli.main(["glue", "--model", str(student), "--compare", str(teacher), "--tasks", str(task),
                     "--output", str(out), "train.steps=4", "train.batch_size=8", "train.max_len=16",
                     "logging.peak_tflops=1", "logging.progress=false"]) == 0
    report = json.loads((out / "glue.json").read_text())
    assert set(report["rows"]) == {"teacher", "student"} and report["tasks"] == ["task"]
    s, t = report["rows"]["student"], report["rows"]["teacher"]
    assert report["retention"]["task"] == pytest.approx(s["scores"]["task"] / t["scores"]["task"])
    table = (out / "glue.md").read_text()
    assert "| retention |" in table and "| student (student) |" in table
