"""Downstream tasks: GLUE through tensorflow-datasets, local CSV / TSV / JSONL files, a built-in one.

``load_task(TaskConfig(name=...))`` gives a ``Task``: what it predicts (text fields, labels, problem
type, metrics) and its splits as ``Examples`` (texts and labels in memory; GLUE's largest task has
400k rows). Task names:

  cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli   GLUE, read with ``tfds.data_source("glue/...")``
                                                        (also ``glue/NAME`` and ``tfds:glue/NAME``)
  tfds:NAME                                             another tfds dataset (task.text_fields, ...)
  PATH.csv | PATH.tsv | PATH.jsonl                      a local training file; validation from
                                                        task.validation_files or held out by hash
  builtin:pydocs-topics                                 offline: which area of the standard library
                                                        (asyncio, email, ...) a documentation
                                                        paragraph comes from, labels from the corpus

The built-in task uses the documents of ``builtin:python-docs`` and the same held-out hash as
``jaxdistil prepare`` (``task.holdout``, the corpus's 0.1 by default), so its validation paragraphs
come from documents that pre-training and distillation on that corpus never saw.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tensorflow_datasets.text.glue  # noqa: F401  (registers glue/*: tfds without TensorFlow does not)

from jaxdistil.data import corpus
from jaxdistil.errors import UserError

BUILTIN = "builtin:pydocs-topics"
# Standard-library areas of the built-in task: packages with many documented objects, present in
# every Python from 3.11 on (distutils and lib2to3 are gone in newer ones).
PYDOCS_AREAS = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter", "unittest", "xml")
MIN_PARAGRAPH = 40  # characters


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The ``task`` section of a fine-tuning config.

    name: see the module doc (the ``--task`` argument).
    text_fields / label_field: the columns of a file or tfds task (GLUE tasks know theirs).
    labels: label names in id order; empty: from the task (GLUE), or the sorted values of the
      training file's label column. A row whose label is not one of them is an error.
    problem_type: ``single_label_classification`` or ``regression`` (files; GLUE knows).
    validation_files: files' held-out splits; empty: ``holdout`` of the training file by text hash.
    holdout: held-out fraction (files without validation files, the built-in task).
    max_train_examples: keep only the first N training examples (0 = all).
    tfds_data_dir / download: where tfds datasets live, and whether tfds may download them.
    """

    name: str = ""
    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    labels: tuple[str, ...] = ()
    problem_type: str = "single_label_classification"
    validation_files: tuple[str, ...] = ()
    holdout: float = 0.1
    max_train_examples: int = 0
    tfds_data_dir: str | None = None
    download: bool = True


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its text fields, label count (1 = regression), validation splits, metrics."""

    fields: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    validation: tuple[str, ...] = ("validation",)
    labels: tuple[str, ...] = ()


GLUE: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("mcc",), labels=("unacceptable", "acceptable")),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",), labels=("negative", "positive")),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("f1", "accuracy"), labels=("not_equivalent", "equivalent")),
    "qqp": GlueTask(("question1", "question2"), 2, ("f1", "accuracy"), labels=("not_duplicate", "duplicate")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched"),
                     labels=("entailment", "neutral", "contradiction")),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",), labels=("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), labels=("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), labels=("not_entailment", "entailment")),
}


@dataclasses.dataclass
class Examples:
    """One split: ``texts[i]`` is a tuple of one or two strings, ``labels`` [N] int32 (float32 for
    regression)."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass
class Task:
    """A loaded task: ``train`` and the validation splits by name (MNLI has two)."""

    name: str
    num_labels: int
    problem_type: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    train: Examples
    validation: dict[str, Examples]

    @property
    def regression(self) -> bool:
        return self.problem_type == "regression"

    def majority_baseline(self) -> float:
        """Accuracy of always predicting the training split's most frequent label (classification)."""
        if self.regression:
            return float("nan")
        majority = int(np.bincount(self.train.labels).argmax())
        rows = np.concatenate([v.labels for v in self.validation.values()])
        return float(np.mean(rows == majority))


def glue_name(name: str) -> str | None:
    """``sst2`` / ``glue/sst2`` / ``tfds:glue/sst2`` -> ``sst2``; None for other names."""
    short = name.removeprefix("tfds:").removeprefix("glue/")
    return short if short in GLUE and (name == short or name.endswith(f"glue/{short}")) else None


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes | bytearray | np.bytes_) else str(value)


def _check_labels(labels: np.ndarray, num_labels: int, names: tuple[str, ...], where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
        raise UserError(f"{where}: example {int(bad[0])} has label {int(labels[bad[0]])}, outside the task's "
                        f"{num_labels} labels ({', '.join(names)}); use a split with labels (GLUE's test "
                        "splits have none) or fix the data")


def _tfds_split(name: str, split: str, cfg: TaskConfig):
    try:
        return tfds.data_source(name, split=split, data_dir=cfg.tfds_data_dir, download=cfg.download)
    except Exception as err:  # unknown names, failed downloads, missing splits: many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read split {split!r} of tfds dataset {name!r} ({type(err).__name__}: "
                        f"{first[:200]}); prepare it with file_format=array_record, pass task.tfds_data_dir "
                        "or use a local file / builtin:pydocs-topics offline") from None


def _from_source(source: Any, fields: tuple[str, ...], label_field: str, regression: bool,
                 limit: int = 0) -> Examples:
    n = len(source) if not limit else min(limit, len(source))
    texts, labels = [], []
    for i in range(n):
        ex = source[i]
        missing = [f for f in (*fields, label_field) if f not in ex]
        if missing:
            raise UserError(f"examples have no field {missing[0]!r} (fields: {', '.join(sorted(ex))}); "
                            "set task.text_fields / task.label_field")
        texts.append(tuple(_text(ex[f]) for f in fields))
        labels.append(float(ex[label_field]) if regression else int(ex[label_field]))
    return Examples(texts, np.asarray(labels, np.float32 if regression else np.int32))


def _glue(short: str, cfg: TaskConfig) -> Task:
    spec = GLUE[short]
    regression = spec.num_labels == 1
    name = f"glue/{short}"
    train = _from_source(_tfds_split(name, "train", cfg), spec.fields, "label", regression, cfg.max_train_examples)
    validation = {s: _from_source(_tfds_split(name, s, cfg), spec.fields, "label", regression)
                  for s in spec.validation}
    if not regression:
        for split, ex in {"train": train, **validation}.items():
            _check_labels(ex.labels, spec.num_labels, spec.labels, f"{name} {split}")
    metrics = spec.metrics
    if short == "mnli":
        metrics = ("accuracy_matched", "accuracy_mismatched")
    return Task(short, spec.num_labels, "regression" if regression else "single_label_classification",
                spec.labels, metrics, train, validation)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; pass an existing .csv, .tsv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number} is not a JSON object ({err.msg}); one object per line") from None
        return rows
    if suffix not in (".csv", ".tsv"):
        raise UserError(f"task file {path}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))


def _file_examples(path: Path, cfg: TaskConfig, names: tuple[str, ...] | None) -> tuple[Examples, list[str]]:
    """Examples of one file and its raw label values (classification: mapped by ``names`` when given)."""
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"task file {path} holds no rows; give a file with a header and examples")
    fields = cfg.text_fields or ("sentence",)
    if len(fields) > 2:
        raise UserError(f"task.text_fields names {len(fields)} fields; a classifier reads one text or a pair")
    missing = [f for f in (*fields, cfg.label_field) if f not in rows[0]]
    if missing:
        raise UserError(f"task file {path} has no column {missing[0]!r} (columns: {', '.join(rows[0])}); "
                        "set task.text_fields and task.label_field to its columns")
    texts = [tuple(str(r[f]) for f in fields) for r in rows]
    raw = [str(r[cfg.label_field]).strip() for r in rows]
    if cfg.problem_type == "regression":
        try:
            return Examples(texts, np.asarray([float(v) for v in raw], np.float32)), raw
        except ValueError:
            bad = next(v for v in raw if not _is_float(v))
            raise UserError(f"task file {path}: label {bad!r} is not a number (problem_type=regression)") from None
    if names is None:
        return Examples(texts, np.zeros(len(raw), np.int32)), raw
    index = {n: i for i, n in enumerate(names)}
    for number, value in enumerate(raw, start=2):
        if value not in index:
            raise UserError(f"{path}:{number}: label {value!r} is not one of the task's labels "
                            f"({', '.join(names)}); fix the row or set task.labels")
    return Examples(texts, np.asarray([index[v] for v in raw], np.int32)), raw


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _split_by_hash(ex: Examples, holdout: float) -> tuple[Examples, Examples]:
    held = np.asarray([corpus.split_of(" ".join(t), holdout) == corpus.HELDOUT for t in ex.texts])
    pick = lambda mask: Examples([t for t, m in zip(ex.texts, mask) if m], ex.labels[mask])  # noqa: E731
    return pick(~held), pick(held)


def _files(cfg: TaskConfig) -> Task:
    path = Path(cfg.name).expanduser()
    regression = cfg.problem_type == "regression"
    names: tuple[str, ...] | None = tuple(cfg.labels) or None
    if not regression and names is None:
        _, raw = _file_examples(path, cfg, None)
        values = sorted(set(raw))
        names = tuple(values if not all(v.lstrip("-").isdigit() for v in values)
                      else sorted(values, key=int))
    train, _ = _file_examples(path, cfg, names)
    if cfg.validation_files:
        validation = {Path(f).stem: _file_examples(Path(f).expanduser(), cfg, names)[0] for f in cfg.validation_files}
    else:
        train, held = _split_by_hash(train, cfg.holdout)
        validation = {"validation": held}
    if cfg.max_train_examples:
        train = Examples(train.texts[: cfg.max_train_examples], train.labels[: cfg.max_train_examples])
    num = 1 if regression else len(names)
    metrics = ("pearson", "spearman") if regression else ("accuracy",)
    return Task(path.stem, num, cfg.problem_type, () if regression else names, metrics, train, validation)


def pydocs_topics(holdout: float = 0.1) -> tuple[Examples, Examples]:
    """The built-in task's (train, validation): paragraphs of standard-library docstrings labelled by
    the package they document (``PYDOCS_AREAS``), split by the corpus's held-out hash of the whole
    document."""
    splits = {corpus.TRAIN: ([], []), corpus.HELDOUT: ([], [])}
    for key, text in corpus.python_docs_documents():
        area = key.split(":", 1)[0].split("/", 1)[0]
        if area not in PYDOCS_AREAS:
            continue
        texts, labels = splits[corpus.split_of(text, holdout)]
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) >= MIN_PARAGRAPH:
                texts.append((paragraph,))
                labels.append(PYDOCS_AREAS.index(area))
    return tuple(Examples(t, np.asarray(lab, np.int32)) for t, lab in splits.values())  # type: ignore[return-value]


def load_task(cfg: TaskConfig) -> Task:
    """The task named by ``cfg.name`` (see the module doc); one-line UserError for anything unusable."""
    if not cfg.name:
        raise UserError("no task given; pass --task NAME (a GLUE task such as sst2, a .csv/.tsv/.jsonl file, "
                        f"or {BUILTIN})")
    if not 0.0 < cfg.holdout < 1.0:
        raise UserError(f"task.holdout must be in (0, 1), got {cfg.holdout}")
    if cfg.name == BUILTIN:
        train, validation = pydocs_topics(cfg.holdout)
        if cfg.max_train_examples:
            train = Examples(train.texts[: cfg.max_train_examples], train.labels[: cfg.max_train_examples])
        return Task("pydocs-topics", len(PYDOCS_AREAS), "single_label_classification", PYDOCS_AREAS,
                    ("accuracy",), train, {"validation": validation})
    short = glue_name(cfg.name)
    if short is not None:
        return _glue(short, cfg)
    if cfg.name.startswith("tfds:"):
        name = cfg.name.removeprefix("tfds:")
        if not cfg.text_fields:
            raise UserError(f"task {cfg.name}: set task.text_fields (and task.label_field) to its features")
        regression = cfg.problem_type == "regression"
        train = _from_source(_tfds_split(name, "train", cfg), tuple(cfg.text_fields), cfg.label_field, regression,
                             cfg.max_train_examples)
        validation = {"validation": _from_source(_tfds_split(name, "validation", cfg), tuple(cfg.text_fields),
                                                 cfg.label_field, regression)}
        num = 1 if regression else len(cfg.labels) or int(max(train.labels.max(), 1)) + 1
        names = tuple(cfg.labels) or tuple(str(i) for i in range(num))
        if not regression:
            for split, ex in {"train": train, **validation}.items():
                _check_labels(ex.labels, num, names, f"{name} {split}")
        return Task(name.replace("/", "-"), num, cfg.problem_type, () if regression else names,
                    ("pearson", "spearman") if regression else ("accuracy",), train, validation)
    if Path(cfg.name).suffix.lower() in (".csv", ".tsv", ".jsonl"):
        return _files(cfg)
    raise UserError(f"unknown task {cfg.name!r}; use a GLUE task ({', '.join(GLUE)}), tfds:NAME, a .csv/.tsv/.jsonl "
                    f"file or {BUILTIN}")
