"""Shared layers: the attention masks (padding, packed segments, causal) against explicit loops,
DistilBERT's sinusoidal table against transformers' own function."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdistil.models.layers import activation_fn, attention_mask_from, sinusoidal_table


def test_attention_masks_against_loops():
    seg = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 0, 0]])
    am = (seg > 0).astype(np.int32)
    for causal in (False, True):
        got = np.asarray(attention_mask_from(am, seg, seg.shape, causal=causal))
        pad = np.asarray(attention_mask_from(am, None, seg.shape, causal=causal))
        for b in range(2):
            for i in range(5):
                for j in range(5):
                    visible = seg[b, j] > 0 and seg[b, i] == seg[b, j] and (not causal or j <= i)
                    assert got[b, 0, i, j] == visible, (b, i, j, causal)
                    assert np.broadcast_to(pad, (2, 1, 5, 5))[b, 0, i, j] == (am[b, j] == 1 and (not causal or j <= i))


def test_sinusoidal_table_equals_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

    out = torch.empty(40, 24)
    create_sinusoidal_embeddings(40, 24, out)
    np.testing.assert_allclose(sinusoidal_table(40, 24), out.numpy(), atol=1e-7)


def test_activations():
    import math

    x = np.array([-1.0, 0.5], np.float32)
    np.testing.assert_allclose(activation_fn("gelu")(x), [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x],
                               rtol=1e-6)
    np.testing.assert_allclose(activation_fn("relu")(x), [0.0, 0.5])
    with pytest.raises(ValueError, match="unsupported activation"):
        activation_fn("swish")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_rows_longer_than_the_position_table_are_refused(family):
    """An embedding gather past the position table reads NaN without error; the model refuses it
    at trace time instead, naming the limit (RoBERTa's offset counted)."""
    import jax
    import jax.numpy as jnp

    from jaxdistil.errors import UserError
    from jaxdistil.models import build_model, configs, init_params

    make = {"bert": lambda: configs.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=8),
            "roberta": lambda: configs.RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32,
                                                      max_position_embeddings=10),
            "distilbert": lambda: configs.DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2,
                                                            hidden_dim=32, max_position_embeddings=8),
            "gpt2": lambda: configs.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=8)}
    cfg = make[family]()
    assert cfg.max_tokens == 8
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    ok = model.apply({"params": params}, jnp.ones((1, 8), jnp.int32), method="encode")
    assert jnp.isfinite(jax.tree.leaves(ok)[0]).all()
    with pytest.raises(UserError, match="9 tokens exceed the model's 8 positions"):
        model.apply({"params": params}, jnp.ones((1, 9), jnp.int32), method="encode")
