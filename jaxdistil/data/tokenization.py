"""Tokenizers for ``prepare``: load a Hugging Face fast tokenizer, or train a WordPiece one.

Whatever the origin, the tokenizer is saved beside the data in Hugging Face format
(``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``, ``special_tokens_map.json``), loadable
by ``transformers.AutoTokenizer`` / ``BertTokenizerFast``. Its *hash* covers what decides the ids of
a text (vocabulary in id order, normalizer, pre-tokenizer, model type), so a run can refuse a
teacher whose tokenizer would give different ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxdistil.errors import UserError

# BERT's special tokens; a trained WordPiece vocabulary starts with them (ids 0..4).
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
TRAIN_PREFIX = "train:"


def _transformers():
    transformers.logging.set_verbosity_error()  # "no max_length" notices are noise here
    return transformers


def _has_vocab(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()


def load_tokenizer(spec: str | os.PathLike):
    """A fast Hugging Face tokenizer from a directory or hub id (``PreTrainedTokenizerFast``)."""
    transformers = _transformers()
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and not _has_vocab(path) and _has_vocab(path / "tokenizer"):
        path = path / "tokenizer"  # a prepared data directory or a jaxdistil run directory
    if path.is_dir():
        has_json = (path / "tokenizer.json").is_file()
        has_vocab = (path / "vocab.txt").is_file()
        if not has_json and not has_vocab:
            raise UserError(
                f"tokenizer directory {path} has no vocabulary (tokenizer.json or vocab.txt); "
                "point --tokenizer at a Hugging Face tokenizer directory or use train:N"
            )
        try:
            if has_json or (path / "tokenizer_config.json").is_file():
                tok = transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
            else:  # a bare BERT vocab.txt: WordPiece with BERT's defaults
                tok = transformers.BertTokenizerFast.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load the tokenizer in {path}: {first}") from None
    elif path.exists() or spec.startswith((".", "/", "~")):
        raise UserError(
            f"--tokenizer {spec} is not a directory; pass a tokenizer directory, hub id or train:N"
        )
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(spec, use_fast=True)
        except Exception as err:  # hub errors come in many types (offline, 404, gated...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"cannot load tokenizer {spec!r} from the Hugging Face hub ({first}); "
                "pass a local tokenizer directory or train:N"
            ) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {spec} has no fast (Rust) version; pass a tokenizer with tokenizer.json")
    special_ids(tok)  # fail early when [CLS]/[SEP]/... (or bos/eos) are missing
    return tok


def parse_train_spec(spec: str) -> int | None:
    """``train:N`` -> N; anything else -> None."""
    if not spec.startswith(TRAIN_PREFIX):
        return None
    try:
        n = int(spec[len(TRAIN_PREFIX) :])
    except ValueError:
        raise UserError(f"--tokenizer {spec}: N in train:N must be an integer vocabulary size") from None
    if n < len(SPECIAL_TOKENS) + 26:
        raise UserError(f"--tokenizer {spec}: a vocabulary of {n} is too small; use at least 100")
    return n


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, *, lowercase: bool = True, length: int | None = None
):
    """Train a BERT-style WordPiece tokenizer on ``texts`` (``PreTrainedTokenizerFast``).

    BERT normalizer (lower-casing optional) and pre-tokenizer, ``[CLS] $A [SEP]`` template, special
    tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. The vocabulary can come out smaller than
    ``vocab_size`` on a small corpus.
    """
    transformers = _transformers()
    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return transformers.BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, **SPECIAL_TOKENS)


def save_tokenizer(tok, out_dir: str | os.PathLike, max_len: int | None = None) -> Path:
    """Save in Hugging Face format; adds the ``vocab.txt`` and ``special_tokens_map.json`` that
    transformers 5 no longer writes but older loaders and BERT tooling expect."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if max_len is not None:
        tok.model_max_length = max_len
    tok.save_pretrained(str(out))
    vocab = vocab_in_id_order(tok)
    if not (out / "vocab.txt").exists():
        (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    if not (out / "special_tokens_map.json").exists():
        special = {k: getattr(tok, k) for k in SPECIAL_TOKENS if getattr(tok, k, None) is not None}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def vocab_in_id_order(tok) -> list[str]:
    """Token strings indexed by id (added tokens included)."""
    vocab = tok.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for token, idx in vocab.items():
        tokens[idx] = token
    return tokens


def special_ids(tok) -> dict[str, int]:
    """Ids of pad/unk/cls/sep/mask (the keys are ``pad``, ``unk``, ``cls``, ``sep``, ``mask``).

    ``cls`` / ``sep`` are what ``prepare`` wraps every sequence with: BERT's [CLS] / [SEP],
    RoBERTa's <s> / </s>, or for a tokenizer without them (GPT-2) its bos / eos tokens (both
    <|endoftext|>, as the reference's binarized_data.py writes GPT-2 data). Without a pad token
    (GPT-2) batches are padded with eos under the attention mask; without a mask token there is no
    ``mask`` key (causal-LM data only).
    """
    fallback = {"cls_token": "bos_token", "sep_token": "eos_token", "pad_token": "eos_token", "unk_token": "eos_token"}
    ids = {}
    for key in SPECIAL_TOKENS:
        idx = getattr(tok, key + "_id", None)
        if idx is None and key in fallback:
            idx = getattr(tok, fallback[key] + "_id", None)
        if idx is None and key == "mask_token":
            continue
        if idx is None:
            raise UserError(
                f"the tokenizer has no {key.replace('_token', '')} token; use a BERT or RoBERTa tokenizer "
                "([CLS]/<s> ... [SEP]/</s>) or one with bos/eos tokens (GPT-2)"
            )
        ids[key.replace("_token", "")] = int(idx)
    return ids


def tokenizer_hash(tok) -> str:
    """sha256 over the vocabulary (id order), normalizer, pre-tokenizer and model type."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    payload = {
        "vocab": vocab_in_id_order(tok),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "model": model.get("type"),
        "continuing_subword_prefix": model.get("continuing_subword_prefix"),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def tokenizer_hash_of_dir(path: str | os.PathLike) -> str | None:
    """The hash of the tokenizer saved in ``path`` (e.g. a teacher's directory), None if it has none."""
    path = Path(path)
    if not (_has_vocab(path) or _has_vocab(path / "tokenizer")):
        return None
    return tokenizer_hash(load_tokenizer(path))


def tokenizer_info(tok, spec: str) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry."""
    return {
        "spec": spec,
        "hash": tokenizer_hash(tok),
        "vocab_size": len(tok),
        "special_ids": special_ids(tok),
        "lowercase": bool(getattr(tok, "do_lower_case", False)),
        "class": type(tok).__name__,
    }
