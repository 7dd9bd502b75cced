"""Attention implementations, chosen by config (``train.attention``), all with the models' masks.

  xla     ``jax.nn.dot_product_attention(implementation="xla")``: XLA's attention, every platform
          (on TPU the TPU compiler fuses it)
  cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused flash attention,
          NVIDIA GPUs only, 16-bit compute (bf16 / fp16); the padding and packed-segment masks go
          in as the boolean mask, GPT-2's causal mask as ``is_causal``
  einsum  the explicit softmax: the scores [B, N, T, S] and probabilities materialised in float32;
          what attention-probability dropout and returning the probabilities need, and the
          reference the others are tested against
  auto    (the default) cudnn on a GPU with a 16-bit compute dtype, xla everywhere else

Whatever is chosen, a layer that drops attention probabilities (training with
``attention_probs_dropout_prob > 0``) or returns them, or the scores before the softmax, runs the
einsum form: neither fused kernel exposes them (returning only the queries, keys or values does
not). A Pallas / splash-attention kernel for TPUs is not offered: it could not be tested here (no
TPU); XLA's attention is what runs there.

Masks: ``mask`` is boolean, broadcastable to [B, 1, T, S] (True: key visible), from
``jaxdistil.models.layers.attention_mask_from`` (padding, packed segments, causal).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdistil.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention takes


def resolve(name: str, dtype, platform: str | None = None) -> str:
    """The implementation ``name`` stands for on ``platform`` (default: JAX's backend) with compute
    ``dtype``; one-line UserError for an unknown name or one the platform cannot run."""
    if name not in IMPLEMENTATIONS:
        raise UserError(f"train.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    platform = platform or jax.default_backend()
    fused_dtype = jnp.dtype(dtype) in [jnp.dtype(d) for d in FUSED_DTYPES]
    if name == "auto":
        return "cudnn" if platform == "gpu" and fused_dtype else "xla"
    if name == "cudnn":
        if platform != "gpu":
            raise UserError(f"train.attention=cudnn needs an NVIDIA GPU (this backend: {platform}); "
                            "use train.attention=auto or xla")
        if not fused_dtype:
            raise UserError(f"train.attention=cudnn computes in bf16 / fp16, not {jnp.dtype(dtype).name}; "
                            "set train.dtype=bfloat16 or use train.attention=xla")
    return name


def scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled, masked attention scores in float32: q, k [B, T, N, H] -> [B, N, T, S] (hidden keys
    at float32's most negative value, as transformers does)."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    return jnp.where(mask, s.astype(jnp.float32), jnp.finfo(jnp.float32).min)


def explicit(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
             drop=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The einsum form: (context [B, T, N, H], scores [B, N, T, S] float32 (``scores``),
    probabilities [B, N, T, S] in q's dtype, before ``drop``)."""
    s = scores(q, k, mask)
    probs = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    kept = probs if drop is None else drop(probs)
    return jnp.einsum("bnts,bsnh->btnh", kept, v), s, probs


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str,
           causal: bool = False, drop=None, return_probs: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Attention of q, k, v [B, T, N, H] under ``mask``: (context [B, T, N, H], probabilities
    [B, N, T, S] or None).

    implementation: a resolved name (``resolve``); causal: the mask includes the causal mask (cuDNN
    is told so, to skip the upper triangle); drop: a function applied to the probabilities
    (attention dropout) or None. With ``drop`` or ``return_probs`` the einsum form runs.
    """
    if drop is not None or return_probs or implementation == "einsum":
        ctx, _, probs = explicit(q, k, v, mask, drop)
        return ctx, (probs if return_probs else None)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                            implementation="cudnn"), None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla"), None
