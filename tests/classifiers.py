"""Sequence-classifier test material shared by tests/models and tests/finetune: the golden run's
tokenizer, random transformers classifiers saved with it, ragged batches, a CSV task (importable:
``tests/`` is on pytest's path)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from jaxdistil.selfcheck import save_random_hf_model

REPO = Path(__file__).resolve().parents[1]


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


def write_csv(path: Path, rows: list[tuple[str, str]], header=("sentence", "label")) -> Path:
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
    return write_csv(tmp_path / "task.csv", rows)
