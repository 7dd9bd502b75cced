"""The top-k tokens for each mask token, as transformers' fill-mask pipeline (``jaxdistil fill-mask``).

  jaxdistil fill-mask --model DIR "Paris is the [MASK] of France." [--top-k 5] [--step N] [--json]

DIR is a jaxdistil run directory, a Flax model directory or a Hugging Face directory (or hub id).
Scores are the softmax over the vocabulary at the mask position; ``token_str`` and ``sequence``
are decoded as the pipeline decodes them, so the two outputs can be compared line by line.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from jaxdistil.errors import UserError
from jaxdistil.models import BertConfig, build_model


def load_tokenizer(tokenizer_dir: str | None, model_path: str):
    """transformers' AutoTokenizer for a model's tokenizer directory (no torch needed)."""
    if tokenizer_dir is None:
        raise UserError(f"{model_path}: no tokenizer files (tokenizer.json / vocab.txt) with the model; "
                        "copy the tokenizer files next to config.json")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def fill_mask(loaded, tokenizer, texts: str | list[str], top_k: int = 5) -> list[list[list[dict[str, Any]]]]:
    """Predictions for every mask token of every text.

    loaded: a ``jaxdistil.hf.LoadedModel``; tokenizer: a transformers tokenizer.
    Returns result[text][mask] = top_k dicts {"score", "token", "token_str", "sequence"}, best first.
    """
    if not loaded.has_mlm_head:
        raise UserError(f"{loaded.path}: the model has no trained MLM head (encoder-only checkpoint); "
                        "fill-mask needs a masked-LM model")
    if loaded.config.causal:
        raise UserError(f"{loaded.path}: {loaded.config.model_type} is a causal LM, not a masked LM; "
                        "use `jaxdistil generate` to continue a prompt")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    cfg = loaded.config
    model = build_model(cfg)
    forward = jax.jit(lambda p, ids, types: model.apply({"params": p}, ids, token_type_ids=types).logits)
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise UserError("the tokenizer has no mask token; use the masked-LM's tokenizer ([MASK] / <mask>)")
    results = []
    for text in [texts] if isinstance(texts, str) else texts:
        enc = tokenizer(text, return_tensors="np")
        ids = np.asarray(enc["input_ids"], np.int32)  # [1, T]
        positions = np.flatnonzero(ids[0] == mask_id)
        if positions.size == 0:
            raise UserError(f"no {tokenizer.mask_token} token in {text!r}; put {tokenizer.mask_token} where "
                            "a word should be predicted")
        if ids.shape[1] > cfg.max_tokens:
            raise UserError(f"text is {ids.shape[1]} tokens long, more than the model's "
                            f"{cfg.max_tokens} positions; shorten it")
        types = enc.get("token_type_ids") if isinstance(cfg, BertConfig) else None
        types = jnp.asarray(types, jnp.int32) if types is not None else None
        with jax.default_matmul_precision("highest"):  # fp32 as PyTorch (GPUs default to TF32)
            logits = np.asarray(forward(loaded.params, jnp.asarray(ids), types), np.float32)[0]  # [T, V]
        single = positions.size == 1
        per_mask = []
        for pos in positions:
            row = logits[pos].astype(np.float64)
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            best = np.argsort(-probs, kind="stable")[:top_k]
            preds = []
            for token in best:
                filled = ids[0].copy()
                filled[pos] = token
                filled = filled[filled != tokenizer.pad_token_id]
                preds.append({
                    "score": float(probs[token]),
                    "token": int(token),
                    "token_str": tokenizer.decode([int(token)]),
                    # Like the pipeline: special tokens kept when other masks remain in the sentence.
                    "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=single),
                })
            per_mask.append(preds)
        results.append(per_mask)
    return results
