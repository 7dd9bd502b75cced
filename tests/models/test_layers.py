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
