"""Building blocks shared by every model: BERT, DistilBERT, RoBERTa and GPT-2.

BERT, DistilBERT and RoBERTa run the same post-LayerNorm transformer: embeddings -> LayerNorm, then
per layer ``LN(x + Attn(x))`` and ``LN(h + FFN(h))``, then an MLM head (dense -> activation ->
LayerNorm -> projection tied to the word embeddings, plus a bias). Only the names in transformers
differ; BERT and RoBERTa add token-type embeddings, RoBERTa counts positions from ``pad + 1``.
GPT-2 runs the pre-LayerNorm form (``cfg.pre_ln``): no embedding LayerNorm, per layer
``x + Attn(LN(x))`` and ``h + FFN(LN(h))``, a final LayerNorm, causal attention, and a bare tied
projection as LM head. The layer's parameters have the same names in both forms (``sa_layer_norm``
is GPT-2's ``ln_1``, ``output_layer_norm`` its ``ln_2``), so one rules table, one student-from-teacher
layer copy and one ``jaxdistil.hf`` name table serve all four.

Every parameter carries logical axis names; ``jaxdistil.training.sharding`` maps them to mesh axes:

  vocab, embed, position, token_type, heads, kv (per-head width), mlp, transform, norm, layers.

Shapes in docstrings: B batch, T sequence length, D hidden, N heads, H per-head width, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdistil.errors import UserError
from jaxdistil.models import attention

Dtype = Any

# Activation sharding names (used with nn.with_logical_constraint, no-ops without rules).
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"


def activation_fn(name: str):
    """Hugging Face activation names: ``gelu`` is the exact erf form, ``gelu_new`` the tanh one."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}")


# rules=(): the boxes carry names only and never constrain on unbox. DenseGeneral unboxes its FLAT
# kernel/bias before reshaping it (flax#3676), which fails under a mesh (the train step's activation
# rules); jaxdistil.training.sharding maps the names to shardings itself.
def _normal(std: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names, rules=())


def _zeros(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names, rules=())


def _layer_norm(cfg, dtype, param_dtype, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in fp32 even with a bf16 compute dtype.
    return nn.LayerNorm(
        epsilon=cfg.ln_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros(("norm",)),
        name=name,
    )


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """DistilBERT's fixed position table, computed as transformers does (float64, then float32)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angles = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.zeros((n_pos, dim), dtype=np.float32)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table


def attention_mask_from(
    attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape: tuple[int, int],
    causal: bool = False,
) -> jax.Array:
    """Boolean mask [B, 1, T, T] (or broadcastable to it): key j is visible to query i.

    ``segment_ids`` (packed sequences, 0 = padding) restricts attention to the same segment;
    otherwise ``attention_mask`` [B, T] (1 = real token) hides padded keys, as transformers does.
    ``causal`` also hides the keys after the query (j > i).
    """
    batch, length = shape
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = (same & (segment_ids[:, None, :] > 0))[:, None]
    elif attention_mask is None:
        mask = jnp.ones((batch, 1, 1, length), dtype=bool)
    else:
        mask = attention_mask.astype(bool)[:, None, None, :]
    if causal:
        mask = mask & jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    return mask


# The per-layer quantities ``encode(..., outputs=...)`` returns on request (None when not asked):
#   attentions  [L, B, N, T, S] attention probabilities (compute dtype; before attention dropout)
#   scores      [L, B, N, T, S] float32 scaled masked scores before the softmax: q k^T / sqrt(H), hidden
#               keys at float32's most negative value (transformers' scores + additive mask)
#   queries, keys, values  [L, B, T, N, H] the projections (bias added, before any scaling), compute dtype
# Asking for attentions or scores runs the explicit (einsum) attention; queries, keys and values do not
# change the attention path. Nothing asked: nothing extra is computed or stacked out of the layers.
OUTPUTS = ("attentions", "scores", "queries", "keys", "values")


def requested_outputs(outputs=(), output_attentions: bool = False) -> tuple[str, ...]:
    """The names asked for, in ``OUTPUTS`` order (hashable: a module attribute); ``outputs``: names
    (or one name), ``output_attentions=True`` adds "attentions". One-line UserError for an unknown name."""
    names = {outputs} if isinstance(outputs, str) else set(outputs or ())
    unknown = sorted(str(n) for n in names - set(OUTPUTS))
    if unknown:
        raise UserError(f"unknown model output {', '.join(map(repr, unknown))}: the outputs a model returns "
                        f"on request are {', '.join(OUTPUTS)}")
    if output_attentions:
        names.add("attentions")
    return tuple(n for n in OUTPUTS if n in names)


@struct.dataclass
class EncoderOutput:
    last_hidden_state: jax.Array  # [B, T, D]
    hidden_states: jax.Array  # [L + 1, B, T, D]: embeddings output, then each layer's output
    # The OUTPUTS fields, when requested:
    attentions: jax.Array | None = None  # [L, B, N, T, S]
    scores: jax.Array | None = None  # [L, B, N, T, S] float32
    queries: jax.Array | None = None  # [L, B, T, N, H]
    keys: jax.Array | None = None  # [L, B, T, N, H]
    values: jax.Array | None = None  # [L, B, T, N, H]

    def extras(self) -> dict[str, jax.Array]:
        """The OUTPUTS fields that hold arrays (the requested ones)."""
        return {name: getattr(self, name) for name in OUTPUTS if getattr(self, name) is not None}


@struct.dataclass
class MaskedLMOutput:
    logits: jax.Array  # [B, T, V]
    hidden_states: jax.Array  # [L + 1, B, T, D]
    attentions: jax.Array | None = None  # the OUTPUTS fields of EncoderOutput, when requested
    scores: jax.Array | None = None
    queries: jax.Array | None = None
    keys: jax.Array | None = None
    values: jax.Array | None = None

    @classmethod
    def of(cls, logits: jax.Array, enc: EncoderOutput) -> MaskedLMOutput:
        return cls(logits, enc.hidden_states, **enc.extras())


class Embeddings(nn.Module):
    """Word + position (+ token type) embeddings, LayerNorm (not in GPT-2), dropout.

    ``position_ids`` count from 0; the table is read at ``position_ids + cfg.position_offset``
    (RoBERTa's ``pad + 1``)."""

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        std = cfg.initializer_range
        self.word_embeddings = nn.Embed(
            cfg.vocab_size, cfg.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_normal(std, ("vocab", "embed")),
        )
        if cfg.sinusoidal:
            table = sinusoidal_table(cfg.max_position_embeddings, cfg.hidden)
            pos_init = nn.with_logical_partitioning(
                lambda *_: jnp.asarray(table, self.param_dtype), ("position", "embed"))
        else:
            pos_init = _normal(std, ("position", "embed"))
        self.position_embeddings = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=pos_init,
        )
        if cfg.token_types:
            self.token_type_embeddings = nn.Embed(
                cfg.token_types, cfg.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=_normal(std, ("token_type", "embed")),
            )
        if not cfg.pre_ln:
            self.LayerNorm = _layer_norm(cfg, self.dtype, self.param_dtype, "LayerNorm")
        self.dropout = nn.Dropout(cfg.embedding_dropout)

    def __call__(self, input_ids, position_ids, token_type_ids, deterministic: bool):
        offset = self.cfg.position_offset
        if input_ids.shape[-1] > self.cfg.max_tokens:  # a gather past the table reads NaN, silently
            raise UserError(f"rows of {input_ids.shape[-1]} tokens exceed the model's {self.cfg.max_tokens} "
                            "positions; shorten the rows (loader.max_len) or use a model with more positions")
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids + offset if offset else position_ids)
        if self.cfg.token_types:
            x = x + self.token_type_embeddings(token_type_ids)
        if not self.cfg.pre_ln:
            x = self.LayerNorm(x)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
        return self.dropout(x, deterministic=deterministic)


class TransformerLayer(nn.Module):
    """One transformer layer, post-LN (BERT family) or pre-LN (GPT-2, ``cfg.pre_ln``).

    Call: (x [B,T,D], mask [B,1,T,T]) -> (x, (x, {name: array} of the ``outputs`` asked, names of
    ``OUTPUTS``, per layer: no L axis)). ``attention``: the implementation
    (``jaxdistil.models.attention``), resolved already."""

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True
    outputs: tuple[str, ...] = ()  # requested_outputs(...)
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, mask):
        cfg, dt, pdt = self.cfg, self.dtype, self.param_dtype
        std = cfg.initializer_range
        head_dim = cfg.hidden // cfg.heads

        def proj(name):
            return nn.DenseGeneral(
                (cfg.heads, head_dim), dtype=dt, param_dtype=pdt, name=name,
                kernel_init=_normal(std, ("embed", "heads", "kv")), bias_init=_zeros(("heads", "kv")),
            )(x)

        residual = x
        if cfg.pre_ln:
            x = _layer_norm(cfg, dt, pdt, "sa_layer_norm")(x)
        q, k, v = proj("q_lin"), proj("k_lin"), proj("v_lin")  # [B, T, N, H]
        attn_dropout = 0.0 if self.deterministic else cfg.attention_dropout
        drop = None
        if attn_dropout > 0.0:
            dropout = nn.Dropout(attn_dropout)
            drop = lambda p: dropout(p, deterministic=False)  # noqa: E731
        extras = {}
        if "scores" in self.outputs:
            ctx, extras["scores"], probs = attention.explicit(q, k, v, mask, drop)
        else:
            ctx, probs = attention.attend(q, k, v, mask, self.attention, causal=cfg.causal, drop=drop,
                                          return_probs="attentions" in self.outputs)
        if "attentions" in self.outputs:
            extras["attentions"] = probs
        for name, value in (("queries", q), ("keys", k), ("values", v)):
            if name in self.outputs:
                extras[name] = value
        attn = nn.DenseGeneral(
            cfg.hidden, axis=(-2, -1), dtype=dt, param_dtype=pdt, name="out_lin",
            kernel_init=_normal(std, ("heads", "kv", "embed")), bias_init=_zeros(("embed",)),
        )(ctx)
        # BERT drops the attention output here (BertSelfOutput); DistilBERT does not (rate 0).
        attn = nn.Dropout(cfg.attention_output_dropout)(attn, deterministic=self.deterministic)
        if cfg.pre_ln:
            h = attn + residual
            ff_in = _layer_norm(cfg, dt, pdt, "output_layer_norm")(h)
        else:
            h = ff_in = _layer_norm(cfg, dt, pdt, "sa_layer_norm")(attn + residual)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, EMBED))

        ff = nn.Dense(
            cfg.mlp, dtype=dt, param_dtype=pdt, name="lin1",
            kernel_init=_normal(std, ("embed", "mlp")), bias_init=_zeros(("mlp",)),
        )(ff_in)
        ff = activation_fn(cfg.act)(ff)
        ff = nn.with_logical_constraint(ff, (BATCH, LENGTH, "activation_mlp"))
        ff = nn.Dense(
            cfg.hidden, dtype=dt, param_dtype=pdt, name="lin2",
            kernel_init=_normal(std, ("mlp", "embed")), bias_init=_zeros(("embed",)),
        )(ff)
        ff = nn.Dropout(cfg.dropout)(ff, deterministic=self.deterministic)
        out = ff + h if cfg.pre_ln else _layer_norm(cfg, dt, pdt, "output_layer_norm")(ff + h)
        out = nn.with_logical_constraint(out, (BATCH, LENGTH, EMBED))
        return out, (out, extras)


class Encoder(nn.Module):
    """``cfg.layers`` layers under ``nn.scan`` (params stacked on a leading ``layers`` axis).

    Scanning compiles one layer instead of L, which keeps compile times flat in depth. ``remat``
    recomputes each layer's activations in the backward pass (memory for compute).
    ``unroll`` (default) unrolls the scan into straight-line code, with the same stacked params:
    no while loop, so XLA schedules across layers and drops the loop's per-layer weight slices,
    stacked residual buffers and zero-filled gradient accumulators; the step measured faster on
    CPU (benchmarks/PERFORMANCE.md) for a longer compile. ``unroll=False`` keeps the rolled loop.
    """

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    unroll: bool = True
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True, outputs: tuple[str, ...] = ()):
        """-> (x, hidden states [L, B, T, D], {name: [L, ...]} of the ``outputs`` asked (``OUTPUTS``))."""
        block = TransformerLayer
        if self.remat:
            block = nn.remat(block, prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,),
            length=self.cfg.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
            unroll=self.cfg.layers if self.unroll else 1,
        )
        x, (states, extras) = stack(
            self.cfg, self.dtype, self.param_dtype, deterministic, requested_outputs(outputs), self.attention,
            name="layers",
        )(x, mask)
        if self.cfg.pre_ln:
            # GPT-2's ln_f: the last hidden state (and the last of hidden_states) is normalised.
            x = _layer_norm(self.cfg, self.dtype, self.param_dtype, "final_layer_norm")(x)
            states = states.at[-1].set(x)
        return x, states, extras


class MLMHead(nn.Module):
    """Dense -> activation -> LayerNorm; the caller projects onto the tied word embeddings."""

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.transform = nn.Dense(
            cfg.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_normal(cfg.initializer_range, ("embed", "transform")),
            bias_init=_zeros(("transform",)),
        )
        self.transform_norm = _layer_norm(cfg, self.dtype, self.param_dtype, "transform_norm")
        self.bias = self.param("bias", _zeros(("vocab",)), (cfg.vocab_size,), self.param_dtype)

    def __call__(self, hidden):
        return self.transform_norm(activation_fn(self.cfg.act)(self.transform(hidden)))


class TransformerEncoder(nn.Module):
    """Embeddings + encoder: what every model here starts with (``encode`` -> EncoderOutput).

    Subclasses add a head in ``setup`` (after ``super().setup()``): the MLM head of
    ``TransformerMaskedLM``, the sequence-classification heads of ``jaxdistil.models.classification``.
    """

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "xla"  # jaxdistil.models.attention, resolved (not "auto")

    def setup(self):
        self.embeddings = Embeddings(self.cfg, self.dtype, self.param_dtype)
        self.encoder = Encoder(self.cfg, self.dtype, self.param_dtype, self.remat, attention=self.attention)

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        outputs: tuple[str, ...] = (),
    ) -> EncoderOutput:
        """input_ids [B, T] int; attention_mask [B, T] (1 real, 0 pad); segment_ids [B, T] for
        packed rows (0 pad), with position_ids restarting per segment.

        outputs: names of ``OUTPUTS`` (per-layer attentions, scores, queries, keys, values) to return in
        the EncoderOutput's fields of those names; ``output_attentions=True`` is ``"attentions"``."""
        outputs = requested_outputs(outputs, output_attentions)
        batch, length = input_ids.shape
        if position_ids is None and self.cfg.position_offset:
            # RoBERTa counts the real tokens (ids != pad), as transformers does: pads get -1, i.e.
            # the table's pad row.
            real = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(real, axis=1) * real - 1
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask_from(attention_mask, segment_ids, (batch, length), causal=self.cfg.causal)
        x = self.embeddings(input_ids, position_ids, token_type_ids, deterministic)
        first = x
        x, states, extras = self.encoder(x, mask, deterministic, outputs)
        hidden_states = jnp.concatenate([first[None], states], axis=0)
        return EncoderOutput(x, hidden_states, **extras)


class TransformerMaskedLM(TransformerEncoder):
    """Embeddings + encoder + MLM head; the base of ``BertForMaskedLM`` and ``DistilBertForMaskedLM``.

    Methods (use ``model.apply(variables, ..., method=...)``):
      ``encode``     -> EncoderOutput, no vocabulary projection (what the losses start from);
      ``mlm_logits`` hidden [..., D] -> logits [..., V] for any subset of rows;
      ``__call__``   -> MaskedLMOutput (both).
    """

    def setup(self):
        super().setup()
        self.mlm_head = MLMHead(self.cfg, self.dtype, self.param_dtype)

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] in the compute dtype."""
        h = self.mlm_head(hidden)
        return self.embeddings.word_embeddings.attend(h) + self.mlm_head.bias.astype(self.dtype)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, deterministic: bool = True, output_attentions: bool = False,
                 outputs: tuple[str, ...] = ()):
        enc = self.encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids,
                          deterministic, output_attentions, outputs)
        return MaskedLMOutput.of(self.mlm_logits(enc.last_hidden_state), enc)
