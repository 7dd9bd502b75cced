"""Side-by-side runs of a Flax model and transformers' PyTorch model on the same inputs.

Used by the export check, ``jaxdistil selfcheck`` and the parity tests. torch is optional (a test
and export dependency): imported inside the functions that need it; ``torch_available()`` says
whether they can run.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from jaxdistil.models import build_model
from jaxdistil.models.classification import build_classifier
from jaxdistil.models.configs import BertConfig, ModelConfig

SENTENCES = (
    "The capital of France is {mask}.",
    "A student learns from a {mask} teacher, layer by layer.",
    "Hello world!",
    "Knowledge distillation compresses a large {mask} model into a smaller one that runs faster.",
)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silences transformers' "Loading weights" / "Writing model shards" bars inside our own output."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def torch_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def sample_inputs(tokenizer_dir: str | Path | None, cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A padded batch of ragged rows: ``input_ids`` / ``attention_mask`` [B, T] int32.

    Real sentences through the directory's tokenizer when there is one; otherwise random ids.
    """
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if tok.pad_token is None:  # GPT-2: pad with the config's padding id (<|endoftext|> unless it sets one)
            tok.pad_token = tok.convert_ids_to_tokens(int(cfg.padding_id))
        mask = tok.mask_token or ""
        enc = tok([s.format(mask=mask) for s in SENTENCES], padding=True, truncation=True,
                  max_length=min(cfg.max_tokens, 128), return_tensors="np",
                  return_token_type_ids=False)
        ids = np.asarray(enc["input_ids"], np.int32)
        if ids.size and ids.max() < cfg.vocab_size:
            return {"input_ids": ids, "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    rng = np.random.default_rng(seed)
    lengths = [11, 7, 3, 9]
    length = min(max(lengths), cfg.max_tokens)
    pad = int(cfg.padding_id)
    ids = rng.integers(0, cfg.vocab_size - 1, (len(lengths), length)).astype(np.int32)
    ids = ids + (ids >= pad)  # never the pad id (RoBERTa reads positions from the ids)
    mask = (np.arange(length)[None, :] < np.minimum(lengths, length)[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, pad).astype(np.int32), "attention_mask": mask}


def flax_forward(cfg: ModelConfig, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray | None = None, dtype: Any = None) -> dict[str, np.ndarray]:
    """logits [B, T, V] and hidden_states [L+1, B, T, D] of the Flax model, as float32 numpy."""
    model = build_model(cfg, dtype=dtype or jnp.float32)
    # Full fp32 matmuls: on GPUs JAX defaults to TF32 (10-bit mantissa), which alone would exceed
    # the 1e-4 parity limit; PyTorch's reference runs in full fp32.
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)({"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                   None if token_type_ids is None else jnp.asarray(token_type_ids))
    return {"logits": np.asarray(out.logits, np.float32),
            "hidden_states": np.asarray(out.hidden_states, np.float32)}


def torch_forward(hf_dir: str | Path, input_ids: np.ndarray, attention_mask: np.ndarray,
                  token_type_ids: np.ndarray | None = None, mlm: bool = True) -> dict[str, np.ndarray]:
    """transformers' PyTorch model from ``hf_dir`` in fp32 eval mode.

    ``mlm=True`` loads the LM (``AutoModelForMaskedLM``, or ``AutoModelForCausalLM`` for GPT-2:
    logits + hidden states), else ``AutoModel`` (hidden states only). hidden_states: [L+1, B, T, D]
    (embeddings output first).
    """
    import torch  # optional: the reference side only, checked by torch_available()
    from transformers import (  # (needs torch)
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
    )

    causal = AutoConfig.from_pretrained(str(hf_dir)).model_type == "gpt2"
    cls = (AutoModelForCausalLM if causal else AutoModelForMaskedLM) if mlm else AutoModel
    with no_progress_bars():
        model = cls.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    kwargs = {"input_ids": torch.as_tensor(np.asarray(input_ids, np.int64)),
              "attention_mask": torch.as_tensor(np.asarray(attention_mask, np.int64))}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.as_tensor(np.asarray(token_type_ids, np.int64))
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    result = {"hidden_states": np.stack([h.float().numpy() for h in out.hidden_states])}
    if mlm:
        result["logits"] = out.logits.float().numpy()
    return result


def max_diffs(flax_out: dict[str, np.ndarray], torch_out: dict[str, np.ndarray],
              attention_mask: np.ndarray) -> dict[str, float]:
    """max |diff| over real (unpadded) tokens: "logits", "hidden_states" (every layer), "last_hidden"."""
    real = np.asarray(attention_mask, bool)
    diffs = {}
    if "logits" in torch_out and "logits" in flax_out:
        diffs["logits"] = float(np.abs(flax_out["logits"] - torch_out["logits"])[real].max())
    h = np.abs(flax_out["hidden_states"] - torch_out["hidden_states"])  # [L+1, B, T, D]
    diffs["hidden_states"] = float(h[:, real].max())
    diffs["last_hidden"] = float(h[-1][real].max())
    return diffs


def compare_with_transformers(hf_dir: str | Path, cfg: ModelConfig, params: Any,
                              inputs: dict[str, np.ndarray] | None = None, mlm: bool = True,
                              tokenizer_dir: str | Path | None = None) -> dict[str, float]:
    """Runs the Flax params and the PyTorch model of ``hf_dir`` on the same batch; returns max_diffs.

    ``inputs`` defaults to ``sample_inputs(tokenizer_dir, cfg)``. BERT gets explicit zero
    token_type_ids on both sides.
    """
    inputs = inputs or sample_inputs(tokenizer_dir, cfg)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("token_type_ids")
    if types is None and isinstance(cfg, BertConfig):
        types = np.zeros_like(ids)
    ours = flax_forward(cfg, params, ids, mask, types)
    theirs = torch_forward(hf_dir, ids, mask, types if isinstance(cfg, BertConfig) else None, mlm=mlm)
    return max_diffs(ours, theirs, mask)


def flax_classifier_logits(cfg: ModelConfig, head: Any, params: Any, input_ids: np.ndarray,
                           attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
    """logits [B, num_labels] of a Flax sequence classifier, float32 numpy (full fp32 matmuls)."""
    model = build_classifier(cfg, head)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)({"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                   None if token_type_ids is None else jnp.asarray(token_type_ids))
    return np.asarray(out, np.float32)


def torch_classifier_logits(hf_dir: str | Path, input_ids: np.ndarray, attention_mask: np.ndarray,
                            token_type_ids: np.ndarray | None = None) -> np.ndarray:
    """logits [B, num_labels] of transformers' ``AutoModelForSequenceClassification`` (fp32, eval)."""
    import torch  # optional: the reference side only, checked by torch_available()
    from transformers import AutoModelForSequenceClassification  # (needs torch)

    with no_progress_bars():
        model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    kwargs = {"input_ids": torch.as_tensor(np.asarray(input_ids, np.int64)),
              "attention_mask": torch.as_tensor(np.asarray(attention_mask, np.int64))}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.as_tensor(np.asarray(token_type_ids, np.int64))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()
