"""Predictions of a fine-tuned classifier for texts (or pairs), as transformers' text-classification
pipeline gives them: the label with the highest softmax score (classification) or the value
(regression, ``problem_type: regression``).

The texts are tokenized one by one (as the pipeline does), then run in padded batches through one
jitted forward pass: padding changes no real token's value (padded keys are masked, GPT-2 finds each
row's last token by the pad id), so a batch gives each text the logits it gets alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.finetune.data import classifier_tokenizer
from jaxdistil.hf import LoadedModel
from jaxdistil.models import ConfigError, ModelConfig
from jaxdistil.models.classification import ClassifierHead, build_classifier, token_types

ROWS = 32  # texts per forward pass (at most; fewer texts: the next power of two)
LENGTH_STEP = 16  # batches are padded to a multiple of this: few shapes, few compilations


@functools.lru_cache(maxsize=8)
def _forward(cfg: ModelConfig, head: ClassifierHead):
    """The jitted classifier (params, ids, mask, token types) -> logits, one per model shape."""
    model = build_classifier(cfg, head)
    return jax.jit(lambda p, ids, mask, tt: model.apply({"params": p}, ids, mask, tt))


def predict(loaded: LoadedModel, texts: Sequence[str | tuple[str, str]]) -> list[dict[str, Any]]:
    """[{"label", "score"}] per text (classification) or [{"value"}] (regression); a text may be a
    (text, text pair) tuple."""
    if loaded.classifier is None:
        raise UserError(f"{loaded.path} is not a fine-tuned classifier; fine-tune it with `jaxdistil finetune`")
    if loaded.tokenizer_dir is None:
        raise UserError(f"{loaded.path} has no tokenizer files; copy them next to its config.json")
    cfg = loaded.config
    try:
        forward = _forward(cfg, loaded.head)
    except ConfigError as err:
        raise UserError(f"{loaded.path}: {err}") from None
    tokenizer = classifier_tokenizer(loaded.tokenizer_dir, cfg)
    types = token_types(cfg)
    encoded = [tokenizer(*((text,) if isinstance(text, str) else tuple(text)), truncation=True,
                         max_length=cfg.max_tokens, return_token_type_ids=types) for text in texts]
    params = loaded.classifier_params()
    logits = []
    for start in range(0, len(encoded), ROWS):
        chunk = encoded[start:start + ROWS]
        longest = max(len(e["input_ids"]) for e in chunk)
        length = min(-(-longest // LENGTH_STEP) * LENGTH_STEP, cfg.max_tokens)
        rows = 1 << (len(chunk) - 1).bit_length()  # a power of two: few shapes again
        ids = np.full((rows, length), int(cfg.padding_id), np.int32)
        mask = np.zeros((rows, length), np.int32)
        tt = np.zeros((rows, length), np.int32)
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[row, :n], mask[row, :n] = e["input_ids"], 1
            if types:
                tt[row, :n] = e["token_type_ids"]
        with jax.default_matmul_precision("highest"):  # fp32 as PyTorch (GPUs default to TF32)
            out = forward(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt) if types else None)
        logits.append(np.asarray(out, np.float64)[:len(chunk)])
    names = loaded.head.label_names()
    out = []
    for row in (np.concatenate(logits) if logits else []):
        if loaded.head.regression:
            out.append({"value": float(row[0])})
            continue
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        out.append({"label": names[best], "score": float(probs[best])})
    return out
