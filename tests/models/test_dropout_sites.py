"""Where randomness enters each model in train mode, compared with transformers' PyTorch models, for
the four families (their LMs and their sequence classifiers) and both kinds of dropout.

Hidden / residual dropout (``nn.Dropout`` modules in transformers): with attention dropout 0 and the
hidden dropouts at ``p > 0``, every dropout transformers applies in a forward pass is recorded with a
forward hook, ours with ``flax.linen.intercept_methods``; both lists (inside a layer or not, input
shape, rate) must be the same: a site missing or added on our side (e.g. one after DistilBERT's
``out_lin``, which transformers does not have) fails here, while eval-mode parity tests cannot see it.

Attention-probability dropout (a functional ``dropout(attn_weights, p)`` in transformers, no module to
hook): with one kind of dropout at 1.0 and the other at 0, train mode is deterministic (every dropped
value is 0), so the train-mode logits must equal transformers' (eager attention): dropping the
probabilities anywhere else, or not at all, changes them.
"""

from __future__ import annotations

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.hf import load_model
from jaxdistil.models import build_model
from jaxdistil.models.classification import build_classifier
from jaxdistil.selfcheck import save_random_hf_model

torch = pytest.importorskip("torch")

P = 0.3
B, T = 2, 7
SHAPES = {
    "Bert": dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
                 max_position_embeddings=16),
    "DistilBert": dict(vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=24, max_position_embeddings=16),
    "Roberta": dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
                    max_position_embeddings=18),
    "GPT2": dict(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=16, bos_token_id=49, eos_token_id=49,
                 pad_token_id=49),
}


def rates(family: str, hidden: float, attention: float) -> dict:
    """transformers' config fields: every hidden / residual / head dropout at ``hidden``, the
    attention probabilities' at ``attention``."""
    if family in ("Bert", "Roberta"):
        return dict(hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention)
    if family == "DistilBert":
        return dict(dropout=hidden, seq_classif_dropout=hidden, attention_dropout=attention)
    return dict(embd_pdrop=hidden, resid_pdrop=hidden, attn_pdrop=attention)


ARCHS = [f"{family}{suffix}" for family in SHAPES for suffix in ("ForMaskedLM", "ForSequenceClassification")]
ARCHS = [a.replace("GPT2ForMaskedLM", "GPT2LMHeadModel") for a in ARCHS]
# Sites per architecture: embeddings + the sites of one layer (+ the head's: BERT's and DistilBERT's
# one before the classifier, RoBERTa's two around the dense layer, none in GPT-2's score).
SITES = {"Bert": 3, "DistilBert": 2, "Roberta": 3, "GPT2": 3}
HEAD_SITES = {"Bert": 1, "DistilBert": 1, "Roberta": 2, "GPT2": 0}


def family_of(arch: str) -> str:
    return next(f for f in sorted(SHAPES, key=len, reverse=True) if arch.startswith(f))


def inputs(pad: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 48, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 5:] = 0
    ids[1, 5:] = pad
    return ids, mask


def torch_model(hf_dir, arch: str):
    import transformers

    cls = getattr(transformers, arch)
    return cls.from_pretrained(str(hf_dir), attn_implementation="eager").train()


def flax_apply(hf_dir, arch: str):
    """(apply(ids, mask, rng or None) -> logits, pad id) of our model of ``hf_dir``."""
    loaded = load_model(hf_dir)
    if arch.endswith("ForSequenceClassification"):
        model, params = build_classifier(loaded.config, loaded.head), loaded.classifier_params()
    else:
        model, params = build_model(loaded.config), loaded.params

    def forward(params, ids, mask, rng, deterministic):
        out = model.apply({"params": params}, ids, attention_mask=mask, deterministic=deterministic,
                          rngs={"dropout": rng})
        return getattr(out, "logits", out)

    forward = jax.jit(forward, static_argnums=4)

    def apply(ids, mask, rng):
        key = jax.random.PRNGKey(0) if rng is None else rng
        return np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), key, rng is None))

    return apply, int(loaded.config.padding_id)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_dropout_sites_match_transformers(tmp_path, arch):
    family = family_of(arch)
    hf_dir = save_random_hf_model(arch, tmp_path / arch, **SHAPES[family], **rates(family, P, 0.0))
    apply, pad = flax_apply(hf_dir, arch)
    ids, mask = inputs(pad)

    model = torch_model(hf_dir, arch)
    theirs: collections.Counter = collections.Counter()
    layers = model.config.num_hidden_layers

    def hook(name):
        def record(module, args, output):
            if module.p > 0:
                kind = "layer" if re.search(r"\.(layer|h)\.\d+\.", name) else "model"
                theirs[(kind, tuple(args[0].shape), round(module.p, 6))] += 1
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))

    sites: dict[tuple, tuple] = {}  # module path -> (kind, input shape, rate)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == "__call__":
            deterministic = kwargs.get("deterministic", module.deterministic)
            if module.rate > 0 and not deterministic:
                kind = "layer" if "layers" in module.path else "model"
                sites[tuple(module.path)] = (kind, tuple(args[0].shape), round(module.rate, 6))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply(ids, mask, jax.random.PRNGKey(0))
    ours = collections.Counter(sites.values())
    # The Flax encoder scans one layer body over the stacked parameters: each per-layer site is one
    # module (counted once however often the body is traced), where PyTorch's hooks fire per layer.
    per_layer = collections.Counter()
    for (kind, shape, rate), n in theirs.items():
        assert kind != "layer" or n % layers == 0
        per_layer[(kind, shape, rate)] = n // layers if kind == "layer" else n
    assert ours == per_layer, f"{arch}: ours {dict(ours)} vs transformers {dict(per_layer)} per layer"
    head = HEAD_SITES[family] if arch.endswith("ForSequenceClassification") else 0
    assert sum(per_layer.values()) == SITES[family] + head


@pytest.mark.parametrize("kind", ["attention", "hidden"])
@pytest.mark.parametrize("arch", ["BertForMaskedLM", "DistilBertForMaskedLM", "RobertaForMaskedLM", "GPT2LMHeadModel"])
def test_dropout_at_one_equals_transformers(tmp_path, arch, kind):
    family = family_of(arch)
    hidden, attention = (0.0, 1.0) if kind == "attention" else (1.0, 0.0)
    hf_dir = save_random_hf_model(arch, tmp_path / arch, **SHAPES[family], **rates(family, hidden, attention),
                                  initializer_range=0.2)
    apply, pad = flax_apply(hf_dir, arch)
    ids, mask = inputs(pad)
    with torch.no_grad():
        theirs = torch_model(hf_dir, arch)(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                           attention_mask=torch.as_tensor(mask)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = apply(ids, mask, jax.random.PRNGKey(0))
        evaluated = apply(ids, mask, None)
    real = mask.astype(bool) if ours.ndim == 3 else slice(None)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert np.abs(ours[real] - evaluated[real]).max() > 1e-2  # train mode did drop something
