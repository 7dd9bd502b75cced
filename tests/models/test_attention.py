"""Attention implementations: on CPU every one that runs here equals the explicit softmax within
1e-6 (fp32), for all four families, with padded, packed and causal rows; the choice resolves per
platform and dtype, and what cannot run here is refused in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import packed_batch, random_batch

from jaxdistil.errors import UserError
from jaxdistil.models import BertConfig, DistilBertConfig, GPT2Config, RobertaConfig, build_model, init_params
from jaxdistil.models.attention import attend, resolve

CONFIGS = {
    "bert": BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=64, max_position_embeddings=40),
    "distilbert": DistilBertConfig(vocab_size=128, dim=48, n_layers=2, n_heads=3, hidden_dim=64,
                                   max_position_embeddings=40),
    "roberta": RobertaConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                             intermediate_size=64, max_position_embeddings=42),
    "gpt2": GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=3, n_inner=64, n_positions=40,
                       bos_token_id=127, eos_token_id=127),
}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("rows", ["padded", "packed"])
def test_xla_equals_the_explicit_softmax(family, rows):
    cfg = CONFIGS[family]
    batch = random_batch(0, batch=4, length=16) if rows == "padded" else packed_batch(1, batch=4, length=16)
    kwargs = {k: jnp.asarray(batch[k]) for k in ("attention_mask", "segment_ids", "position_ids") if k in batch}
    params = init_params(build_model(cfg), jax.random.PRNGKey(0))
    out = {}
    for impl in ("einsum", "xla"):
        model = build_model(cfg, attention=impl)
        enc = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="encode", **kwargs))(
            params, jnp.asarray(batch["input_ids"]))
        out[impl] = np.asarray(enc.last_hidden_state)
    real = batch["attention_mask"].astype(bool)
    assert np.abs(out["xla"] - out["einsum"])[real].max() <= 1e-6
    assert np.abs(out["einsum"][real]).max() > 0.1  # not a vacuous comparison


def test_attend_returns_probabilities_and_drops_them():
    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.tril(np.ones((5, 5), bool)))[None, None]
    ctx, probs = attend(q, k, v, mask, "xla", causal=True, return_probs=True)
    want = jax.nn.softmax(np.where(np.asarray(mask), np.einsum("btnh,bsnh->bnts", q, k) / 2.0, -np.inf), axis=-1)
    np.testing.assert_allclose(np.asarray(probs), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ctx), np.einsum("bnts,bsnh->btnh", want, v), atol=1e-6)
    dropped, _ = attend(q, k, v, mask, "xla", drop=lambda p: p * 0.0)
    assert float(jnp.abs(dropped).max()) == 0.0  # dropout goes through the explicit form


def test_resolution_per_platform_and_dtype():
    assert resolve("auto", jnp.float32, "cpu") == "xla"
    assert resolve("auto", jnp.bfloat16, "gpu") == "cudnn" and resolve("auto", jnp.float32, "gpu") == "xla"
    assert resolve("auto", jnp.bfloat16, "tpu") == "xla" and resolve("einsum", jnp.float32, "cpu") == "einsum"
    with pytest.raises(UserError, match="train.attention=cudnn needs an NVIDIA GPU"):
        resolve("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(UserError, match="computes in bf16 / fp16, not float32"):
        resolve("cudnn", jnp.float32, "gpu")
    with pytest.raises(UserError, match="must be one of auto, xla, cudnn, einsum"):
        resolve("flash", jnp.float32)
