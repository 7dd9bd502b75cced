"""RoBERTa / GPT-2 test material shared by tests/models, tests/hf, tests/distill and test_generate:
byte-level BPE tokenizers trained on a few sentences, random transformers models, ragged batches,
a tiny GPT-2 config (importable: ``tests/`` is on pytest's path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxdistil.models import (
    GPT2Config,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Knowledge distillation trains a small student to imitate a large teacher model.",
    "A student learns from the soft targets of its teacher, layer by layer.",
    "Python's standard library ships modules for files, text, networks and processes.",
] * 10


def byte_bpe():
    """A byte-level BPE (RoBERTa's / GPT-2's model) trained on TEXTS, as a ``tokenizers.Tokenizer``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"])
    return bpe._tokenizer


def roberta_tokenizer(directory: Path):
    from tokenizers import processors

    backend = byte_bpe()
    backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                          ("<s>", backend.token_to_id("<s>")))
    tok = transformers.RobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                            sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                            mask_token="<mask>")
    tok.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def gpt2_tokenizer(directory: Path):
    end = "<|endoftext|>"
    tok = transformers.GPT2TokenizerFast(tokenizer_object=byte_bpe(), unk_token=end, bos_token=end, eos_token=end)
    tok.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def hf_model(kind: str, vocab: int = 120, std: float = 0.02, **kw):
    """A random transformers model of ``kind`` ("roberta" | "gpt2"), eval mode, fp32."""
    torch.manual_seed(0)
    if kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40, initializer_range=std, **kw)
        return transformers.RobertaForMaskedLM(cfg).eval()
    end = vocab - 1
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=40,
                                  initializer_range=std, bos_token_id=end, eos_token_id=end, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ragged_batch(vocab: int, pad: int, seed: int = 0):
    """ids [3, 12] with right padding (lengths 12, 7, 3) and the attention mask; no pad id inside."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab - 1, size=(3, 12))
    mask = (np.arange(12)[None] < np.array([12, 7, 3])[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad).astype(np.int64), mask


def tiny_gpt2(layers: int = 4, width: int = 64, vocab: int = 128) -> GPT2Config:
    return GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=8, n_positions=32, n_inner=128,
                      bos_token_id=vocab - 1, eos_token_id=vocab - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def fixed_batch(vocab: int, pad: int, rows: int = 8, length: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 2, size=(rows, length)).astype(np.int32)
    lens = rng.integers(length // 2, length + 1, size=rows)
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, pad).astype(np.int32), "attention_mask": mask}
