"""The GPT-2 teacher / student: ``GPT2LMHeadModel`` as in transformers.

Pre-LN causal decoder: token + learned position embeddings (no LayerNorm), per layer
``x + Attn(ln_1(x))`` and ``h + MLP(ln_2(h))`` (GELU tanh form), a final ``ln_f``, and an LM head tied
to the token embeddings, without bias. Parameter tree (shared names with the encoders of
``jaxdistil.models.layers``): embeddings/{word_embeddings, position_embeddings},
encoder/layers/{sa_layer_norm (ln_1), q_lin, k_lin, v_lin (c_attn split in three), out_lin
(attn.c_proj), output_layer_norm (ln_2), lin1 (mlp.c_fc), lin2 (mlp.c_proj)} (stacked),
encoder/final_layer_norm (ln_f).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistil.models.configs import GPT2Config
from jaxdistil.models.layers import MaskedLMOutput, TransformerEncoder


class GPT2LMHeadModel(TransformerEncoder):
    """GPT-2 + tied LM head. Methods, as the masked-LM models' (the step treats them alike):
    ``encode`` -> EncoderOutput, ``mlm_logits`` hidden [..., D] -> next-token logits [..., V],
    ``__call__`` -> MaskedLMOutput (logits and hidden states)."""

    cfg: GPT2Config

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V]: the tied projection (GPT-2's lm_head has no bias)."""
        return self.embeddings.word_embeddings.attend(hidden)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, deterministic: bool = True, output_attentions: bool = False,
                 outputs: tuple[str, ...] = ()):
        enc = self.encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids,
                          deterministic, output_attentions, outputs)
        return MaskedLMOutput.of(self.mlm_logits(enc.last_hidden_state), enc)


def greedy_generate(model: GPT2LMHeadModel, params, input_ids: jax.Array, new_tokens: int,
                    temperature: float = 0.0, rng: jax.Array | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None) -> jax.Array:
    """Appends up to ``new_tokens`` tokens to ``input_ids`` [B, T0] (unpadded prompts of equal length).

    temperature 0: greedy (arg-max), as transformers' ``generate(do_sample=False)``; otherwise
    samples from softmax(logits / temperature) with ``rng``. ``eos_token_id``: as transformers, a row
    that has produced it is finished: its later positions hold ``pad_token_id`` (default: the eos
    id), and decoding stops once every row is finished, so the result is [B, T0 + n] with n <=
    ``new_tokens`` (a batch of one ends at its eos). Each step re-runs the whole prefix (no KV cache):
    a smoke test and demo generator, not a serving path.
    """
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng")
    ids = jnp.asarray(input_ids, jnp.int32)
    batch, start = ids.shape
    total = start + new_tokens
    if total > model.cfg.n_positions:
        raise ValueError(f"prompt + new tokens = {total} exceeds the model's {model.cfg.n_positions} positions")
    buf = jnp.zeros((batch, total), jnp.int32).at[:, :start].set(ids)
    pad = eos_token_id if pad_token_id is None else pad_token_id

    @jax.jit
    def next_token(buf, pos, key):
        # Positions after ``pos`` are zeros, hidden by the causal mask from every position <= pos.
        logits = model.apply({"params": params}, buf).logits  # [B, total, V]
        last = jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False).astype(jnp.float32)
        if temperature > 0:
            return jax.random.categorical(key, last / temperature, axis=-1).astype(jnp.int32)
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    key = rng if rng is not None else jax.random.PRNGKey(0)
    finished = np.zeros(batch, bool)
    for pos in range(start - 1, total - 1):
        key, sub = jax.random.split(key)
        token = next_token(buf, pos, sub)
        if eos_token_id is not None:
            token = np.where(finished, pad, np.asarray(token))
            finished |= token == eos_token_id
        buf = buf.at[:, pos + 1].set(token)
        if finished.all():
            return buf[:, :pos + 2]
    return buf
