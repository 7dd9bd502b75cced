"""Predictions of a fine-tuned classifier for texts (or pairs), as transformers' text-classification
pipeline gives them: the label with the highest softmax score (classification) or the value
(regression, ``problem_type: regression``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from jaxdistil.errors import UserError
from jaxdistil.hf import LoadedModel
from jaxdistil.models import BertConfig
from jaxdistil.models.classification import build_classifier


def predict(loaded: LoadedModel, texts: Sequence[str | tuple[str, str]]) -> list[dict[str, Any]]:
    """[{"label", "score"}] per text (classification) or [{"value"}] (regression); a text may be a
    (text, text pair) tuple."""
    if loaded.classifier is None:
        raise UserError(f"{loaded.path} is not a fine-tuned classifier; fine-tune it with `jaxdistil finetune`")
    if loaded.tokenizer_dir is None:
        raise UserError(f"{loaded.path} has no tokenizer files; copy them next to its config.json")
    tokenizer = AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
    model = build_classifier(loaded.config, loaded.head)
    params = loaded.classifier_params()
    types = isinstance(loaded.config, BertConfig)
    names = loaded.head.label_names()
    out = []
    for text in texts:
        pair = (text,) if isinstance(text, str) else tuple(text)
        enc = tokenizer(*pair, truncation=True, max_length=loaded.config.max_tokens,
                        return_token_type_ids=types, return_tensors="np")
        with jax.default_matmul_precision("highest"):  # fp32 as PyTorch (GPUs default to TF32)
            logits = np.asarray(model.apply(
                {"params": params}, jnp.asarray(enc["input_ids"], jnp.int32),
                jnp.asarray(enc["attention_mask"], jnp.int32),
                jnp.asarray(enc["token_type_ids"], jnp.int32) if types else None), np.float64)[0]
        if loaded.head.regression:
            out.append({"value": float(logits[0])})
            continue
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        out.append({"label": names[best], "score": float(probs[best])})
    return out
