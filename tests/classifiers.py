"""Sequence-classifier test material shared by tests/models, tests/hf and tests/finetune: random
transformers models of the four families saved with a tokenizer (the golden run's WordPiece for
BERT / DistilBERT, the byte-level BPE of ``families.py`` for RoBERTa / GPT-2), ragged batches, a CSV
task (importable: ``tests/`` is on pytest's path)."""

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


# Odd sizes (3 heads of 8, 5 heads of 4): a width or head mix-up cannot pass by symmetry. The vocabulary
# is the byte-level tokenizer's (``families.byte_bpe``, 400 at most), set by ``hf_model``.
ROBERTA = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
               max_position_embeddings=42, initializer_range=0.2)
GPT2 = dict(n_embd=20, n_layer=2, n_head=5, n_positions=40, initializer_range=0.2)


def hf_model(directory: Path, arch: str, **extra) -> Path:
    """A random transformers ``arch`` (``BertForMaskedLM``, ``RobertaForSequenceClassification``,
    ``GPT2ForSequenceClassification``...) saved with its family's tokenizer. GPT-2 classifiers pad
    with <|endoftext|> (``pad_token_id`` = eos) unless ``extra`` says otherwise."""
    if arch.startswith(("Roberta", "GPT2")):
        import families

        tok = (families.roberta_tokenizer if arch.startswith("Roberta") else families.gpt2_tokenizer)(directory)
        config = dict(ROBERTA, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id) if arch.startswith("Roberta") else dict(
            GPT2, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        if arch == "GPT2ForSequenceClassification":
            config["pad_token_id"] = tok.eos_token_id
        return save_random_hf_model(arch, directory, **dict(config, vocab_size=len(tok), **extra))
    config = dict(BERT if arch.startswith("Bert") else DISTIL, **extra)
    out = save_random_hf_model(arch, directory, **config)
    for name in os.listdir(TOKENIZER):
        shutil.copy(TOKENIZER / name, out)
    return out


def ragged(seed: int, pairs: bool, vocab: int = VOCAB, pad: int = 0, left: int = 0):
    """ids, mask [4, 13] (rows of 13, 9, 4, 11 tokens, right-padded with ``pad``; the last ``left``
    rows left-padded instead) and, with ``pairs``, token types (a second segment in every row)."""
    rng = np.random.default_rng(seed)
    lengths = [13, 9, 4, 11]
    t = max(lengths)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(6, vocab, (4, t))
    ids = np.where(ids == pad, ids - 1, ids)  # no pad id among the real tokens
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    types = ((np.arange(t)[None] >= np.asarray([6, 5, 2, 4])[:, None]) * mask).astype(np.int32) if pairs else None
    for row in range(4 - left, 4):
        shift = t - lengths[row]
        ids[row], mask[row] = np.roll(ids[row], shift), np.roll(mask[row], shift)
    return ids, mask, types


def write_csv(path: Path, rows: list[tuple[str, str]], header=("sentence", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_task(tmp_path: Path, n: int = 120, bpe: bool = False) -> Path:
    """A two-label CSV task: six random words, then two words that give the label. The words are
    whole tokens of the golden run's WordPiece vocabulary (tests/fixtures/golden_run.py) or, with
    ``bpe``, of the byte-level BPE of ``families.TEXTS`` (RoBERTa / GPT-2)."""
    rng = np.random.default_rng(0)
    if bpe:
        words = "the quick brown fox jumps over lazy dog near river bank small student large".split()
        cues = {"pos": " knowledge distillation", "neg": " standard library"}
    else:
        words = "the a of to and in is it that for on with as was by this be are".split()
        cues = {"pos": " which there", "neg": " from have"}
    rows = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        rows.append((" ".join(rng.choice(words, 6)) + cues[label], label))
    return write_csv(tmp_path / "task.csv", rows)
