"""The manifest of a prepared data directory, and the checks a run makes against it.

``DATA_DIR/manifest.json`` (written last by ``jaxdistil prepare``, so a directory without one is
incomplete) records the source, the tokenizer (hash, vocab size, special ids), the record format,
and per split the shard files and the counts of documents, sequences, dropped sequences, tokens.

Layout of a prepared directory::

    manifest.json
    tokenizer/                  Hugging Face tokenizer files
    token_counts.npy            int64 [V] occurrences of each id in the training split
    train/*.array_record        one record per sequence: the ids as little-endian ``dtype``
    validation/*.array_record   the held-out split (absent when empty)
    text/                       the tfds text dataset built from local files / the built-in corpus
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxdistil.data.masking import token_weights_from_counts
from jaxdistil.data.tokenization import tokenizer_hash_of_dir
from jaxdistil.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "jaxdistil.tokenized.v1"


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``DATA_DIR/manifest.json`` (UserError when missing or from another format)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{data_dir} is not a prepared data directory (no {MANIFEST_NAME}); "
            "create one with `jaxdistil prepare --output DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-run `jaxdistil prepare`") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; re-run prepare")
    manifest["data_dir"] = str(Path(data_dir))
    return manifest


def check_vocab(
    manifest: dict[str, Any], vocab_size: int, tokenizer_hash: str | None = None, what: str = "the teacher",
    at_least: bool = False,
) -> None:
    """Refuse a model whose vocabulary differs from the data's tokenizer.

    vocab_size: the model's ``config.vocab_size``; tokenizer_hash: the hash of the model's own
    tokenizer (``tokenization.tokenizer_hash_of_dir``), None when the model ships none.
    at_least: accept a larger embedding table than the tokenizer's vocabulary (a vocabulary padded to
    a round size: every data id still has its row), as for a teacher that only hidden-state or
    attention terms read.
    """
    tok = manifest["tokenizer"]
    fits = int(vocab_size) >= int(tok["vocab_size"]) if at_least else int(vocab_size) == int(tok["vocab_size"])
    if not fits:
        raise UserError(
            f"{what} has a vocabulary of {vocab_size} tokens but the data in {manifest.get('data_dir', '?')} "
            f"was tokenized with {tok['vocab_size']} ({tok['spec']}); prepare the data with "
            f"--tokenizer set to {what}'s tokenizer"
        )
    if tokenizer_hash is not None and tokenizer_hash != tok["hash"]:
        raise UserError(
            f"{what}'s tokenizer ({tokenizer_hash[:19]}) differs from the one the data was prepared with "
            f"({tok['hash'][:19]}, {tok['spec']}); prepare the data with --tokenizer set to "
            f"{what}'s tokenizer"
        )


def check_model_vocab(manifest: dict[str, Any], loaded: Any, what: str, at_least: bool = False) -> None:
    """``check_vocab`` for a loaded model (``jaxdistil.hf.LoadedModel``): its vocabulary size and,
    when it ships a tokenizer, that tokenizer's hash."""
    tok_hash = tokenizer_hash_of_dir(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
    check_vocab(manifest, loaded.config.vocab_size, tok_hash, what=what, at_least=at_least)


def split_files(manifest: dict[str, Any], split: str) -> list[str]:
    """Absolute paths of a split's ArrayRecord shards (UserError when the split is absent)."""
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(
            f"the data in {manifest['data_dir']} has no {split!r} split (has: {', '.join(splits)}); "
            "re-run prepare with --holdout > 0 for a held-out split"
        )
    return [str(Path(manifest["data_dir"]) / f) for f in splits[split]["files"]]


def token_counts(manifest: dict[str, Any]) -> np.ndarray:
    """int64 [V] token occurrences over the training split."""
    return np.load(Path(manifest["data_dir"]) / manifest["token_counts"])


def token_weights(manifest: dict[str, Any], smoothing: float = 0.7) -> np.ndarray:
    """float32 [V] masking weights ``max(count, 1) ** -smoothing``, 0 for the special tokens."""
    return token_weights_from_counts(
        token_counts(manifest), manifest["tokenizer"]["special_ids"].values(), smoothing
    )


def tokenizer_dir(manifest: dict[str, Any]) -> str:
    return str(Path(manifest["data_dir"]) / manifest["tokenizer_dir"])


def mask_token_id(manifest: dict, causal: bool = False) -> int:
    """The data's mask token id; -1 for causal-LM data without one (no masking then).

    A masked LM on data whose tokenizer has no mask token (GPT-2's) is a UserError."""
    special = manifest["tokenizer"]["special_ids"]
    if "mask" in special:
        return int(special["mask"])
    if causal:
        return -1
    raise UserError("the data's tokenizer has no mask token, which masked-LM training needs; prepare the data "
                    "with the masked LM's tokenizer (BERT [MASK], RoBERTa <mask>)")
