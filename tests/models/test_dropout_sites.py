"""Where randomness enters each model in train mode, compared with transformers' PyTorch models.

With ``attention_dropout = 0`` and hidden dropout ``p > 0``, every dropout that transformers applies
in a forward pass is recorded with a forward hook on its ``nn.Dropout`` modules; the Flax model's
dropouts are recorded with ``flax.linen.intercept_methods``. Both lists (which block, input shape,
rate) must be the same: a dropout site missing or added on our side (e.g. one after DistilBERT's
``out_lin``, which transformers does not have) fails here, while eval-mode parity tests cannot see it.
"""

from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.hf import load_model
from jaxdistil.models import build_model
from jaxdistil.selfcheck import save_random_hf_model

torch = pytest.importorskip("torch")

P = 0.3
CASES = {
    "BertForMaskedLM": dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=P,
                            attention_probs_dropout_prob=0.0),
    "DistilBertForMaskedLM": dict(vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=24,
                                  max_position_embeddings=16, dropout=P, attention_dropout=0.0),
}
B, T = 2, 7


def torch_sites(hf_dir, ids, mask) -> tuple[collections.Counter, int]:
    """(Counter of (block kind, input shape, rate) over the dropouts transformers ran, #layers)."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(hf_dir)).train()
    seen: collections.Counter = collections.Counter()

    def hook(name):
        def record(module, inputs, output):
            if module.p > 0:
                kind = "embeddings" if "embeddings" in name else "layer"
                seen[(kind, tuple(inputs[0].shape), round(module.p, 6))] += 1
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    return seen, model.config.num_hidden_layers


def flax_sites(hf_dir, ids, mask) -> collections.Counter:
    loaded = load_model(hf_dir)
    model = build_model(loaded.config)
    sites: dict[tuple, tuple] = {}  # module path -> (kind, input shape, rate)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == "__call__":
            deterministic = kwargs.get("deterministic", module.deterministic)
            if module.rate > 0 and not deterministic:
                kind = "layer" if "layers" in module.path else "embeddings"
                sites[tuple(module.path)] = (kind, tuple(args[0].shape), round(module.rate, 6))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply({"params": loaded.params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                    deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    return collections.Counter(sites.values())


@pytest.mark.parametrize("arch", list(CASES))
def test_dropout_sites_match_transformers(tmp_path, arch):
    hf_dir = save_random_hf_model(arch, tmp_path / arch, **CASES[arch])
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 5:] = 0
    theirs, layers = torch_sites(hf_dir, ids, mask)
    ours = flax_sites(hf_dir, ids, mask)
    # The Flax encoder scans one layer body over the stacked parameters: each per-layer site is one
    # module (counted once however often the body is traced), where PyTorch's hooks fire per layer.
    per_layer = collections.Counter()
    for (kind, shape, rate), n in theirs.items():
        if kind == "layer":
            assert n % layers == 0
            per_layer[(kind, shape, rate)] = n // layers
        else:
            per_layer[(kind, shape, rate)] = n
    assert ours == per_layer, f"{arch}: ours {dict(ours)} vs transformers {dict(per_layer)} per layer"
    assert sum(per_layer.values()) == (3 if arch.startswith("Bert") else 2)  # embeddings + sites per layer
