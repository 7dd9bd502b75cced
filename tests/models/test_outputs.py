"""The per-layer outputs a model returns on request (``encode(..., outputs=...)``, names of
``jaxdistil.models.layers.OUTPUTS``) against transformers' PyTorch models with the same weights
(random checkpoints saved with ``save_pretrained``, read by the HF loader):

1. attention probabilities equal transformers' ``output_attentions=True`` (eager attention); queries,
   keys and values equal what forward hooks on transformers' q / k / v projections capture (GPT-2's
   one ``c_attn`` split in three); scores equal q k^T / sqrt(H) + the additive mask recomputed in
   torch from the hooked q, k (hidden keys at float32's most negative value exactly), and their
   softmax is transformers' probabilities: the four families, padded rows, within 1e-5 (fp32);
2. packed rows: no probability crosses a segment, each segment's outputs are those it gets alone;
3. remat and the rolled scan (``unroll=False``) return the same outputs, and they differentiate;
4. nothing asked, nothing extra: no arrays in the unasked fields, no extra results of the lowered
   function; queries / keys / values keep the fused attention path;
5. an unknown name is refused in one line naming the allowed ones.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import FAST_COMPILE

from jaxdistil.errors import UserError
from jaxdistil.hf.load import load_model
from jaxdistil.models import attention as attention_impl
from jaxdistil.models import build_model
from jaxdistil.models.layers import OUTPUTS, Encoder, attention_mask_from
from jaxdistil.selfcheck import ragged_batch, save_random_hf_model

torch = pytest.importorskip("torch", reason="the outputs are compared with transformers' PyTorch models")

TOL = 1e-5
MIN = np.finfo(np.float32).min
# Odd sizes (5 heads of width 6, mlp 37), 2 layers; initializer_range 0.2 for scores of order 1-10.
HF = {
    "bert": ("BertForMaskedLM", {"vocab_size": 97, "hidden_size": 30, "num_hidden_layers": 2,
                                 "num_attention_heads": 5, "intermediate_size": 37, "max_position_embeddings": 24,
                                 "initializer_range": 0.2}),
    "distilbert": ("DistilBertForMaskedLM", {"vocab_size": 97, "dim": 30, "n_layers": 2, "n_heads": 5,
                                             "hidden_dim": 37, "max_position_embeddings": 24,
                                             "initializer_range": 0.2}),
    "roberta": ("RobertaForMaskedLM", {"vocab_size": 97, "hidden_size": 30, "num_hidden_layers": 2,
                                       "num_attention_heads": 5, "intermediate_size": 37,
                                       "max_position_embeddings": 26, "initializer_range": 0.2}),
    "gpt2": ("GPT2LMHeadModel", {"vocab_size": 97, "n_embd": 30, "n_layer": 2, "n_head": 5, "n_inner": 37,
                                 "n_positions": 24, "initializer_range": 0.2, "bos_token_id": 96,
                                 "eos_token_id": 96}),
}
# The q / k / v projections in transformers' module tree (GPT-2: one c_attn for the three).
PROJECTIONS = {"bert": r"bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)",
               "roberta": r"roberta\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)",
               "distilbert": r"distilbert\.transformer\.layer\.(\d+)\.attention\.(q_lin|k_lin|v_lin)",
               "gpt2": r"transformer\.h\.(\d+)\.attn\.(c_attn)"}
NAME = {"query": "queries", "key": "keys", "value": "values", "q_lin": "queries", "k_lin": "keys",
        "v_lin": "values"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF directory, LoadedModel): each random checkpoint saved and loaded once."""
    made = {}

    def get(family: str):
        if family not in made:
            arch, config = HF[family]
            directory = save_random_hf_model(arch, tmp_path_factory.mktemp(family), seed=3, **config)
            made[family] = (directory, load_model(directory))
        return made[family]

    return get


def _encode(model, params, batch: dict, outputs=OUTPUTS, **kw):
    """EncoderOutput of ``model`` on ``batch`` (numpy) under jit, full fp32 matmuls."""
    keys = ("attention_mask", "token_type_ids", "position_ids", "segment_ids")
    args = {k: jnp.asarray(batch[k]) for k in keys if k in batch}

    def run(p, ids):
        return model.apply({"params": p}, ids, method="encode", outputs=outputs, **args, **kw)

    with jax.default_matmul_precision("highest"):
        return jax.device_get(jax.jit(run, compiler_options=FAST_COMPILE)(params, jnp.asarray(batch["input_ids"])))


def _transformers_outputs(directory, family: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """attentions [L, B, N, T, S] from transformers and queries / keys / values [L, B, T, N, H] from
    forward hooks on its projections."""
    import transformers

    arch, _ = HF[family]
    model = getattr(transformers, arch).from_pretrained(str(directory), attn_implementation="eager").eval()
    heads = model.config.num_attention_heads
    captured: dict[tuple[str, int], np.ndarray] = {}

    def hook(layer: int, kind: str):
        def record(module, args, output):
            out = output.detach().numpy()
            b, t = out.shape[:2]
            parts = np.split(out, 3, axis=-1) if kind == "c_attn" else [out]
            names = ("queries", "keys", "values") if kind == "c_attn" else (NAME[kind],)
            for name, part in zip(names, parts):
                captured[(name, layer)] = part.reshape(b, t, heads, -1)
        return record

    for path, module in model.named_modules():
        found = re.fullmatch(PROJECTIONS[family], path)
        if found:
            module.register_forward_hook(hook(int(found.group(1)), found.group(2)))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long), output_attentions=True)
    layers = len(out.attentions)
    assert len(captured) == 3 * layers  # every projection of every layer was hooked
    result = {"attentions": np.stack([a.numpy() for a in out.attentions])}
    for name in ("queries", "keys", "values"):
        result[name] = np.stack([captured[(name, i)] for i in range(layers)])
    return result


def _torch_scores(q: np.ndarray, k: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """transformers' eager scores before the softmax, from hooked q, k [L, B, T, N, H]: q k^T / sqrt(H)
    plus the additive mask (0 visible, float32 min hidden); ``visible`` [B, T, S] bool."""
    qt, kt = torch.as_tensor(q).permute(0, 1, 3, 2, 4), torch.as_tensor(k).permute(0, 1, 3, 2, 4)
    s = torch.matmul(qt, kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [L, B, N, T, S]
    additive = torch.where(torch.as_tensor(visible.copy()), 0.0, torch.finfo(torch.float32).min)
    return (s + additive[None, :, None]).numpy()


@pytest.mark.parametrize("family", list(HF))
def test_outputs_equal_transformers(family, checkpoints):
    directory, loaded = checkpoints(family)
    batch = ragged_batch(loaded.config.vocab_size, lengths=(11, 6, 1), seed=1, pad=int(loaded.config.padding_id))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = _encode(build_model(loaded.config), loaded.params, batch)
    theirs = _transformers_outputs(directory, family, ids, mask)

    layers, heads, width = loaded.config.layers, loaded.config.heads, loaded.config.hidden // loaded.config.heads
    b, t = ids.shape
    assert ours.attentions.shape == ours.scores.shape == (layers, b, heads, t, t)
    assert ours.queries.shape == ours.keys.shape == ours.values.shape == (layers, b, t, heads, width)
    assert ours.scores.dtype == np.float32
    for name in ("attentions", "queries", "keys", "values"):
        assert theirs[name].shape == getattr(ours, name).shape, name
        np.testing.assert_allclose(getattr(ours, name), theirs[name], atol=TOL, rtol=0, err_msg=name)

    visible = np.broadcast_to(np.asarray(attention_mask_from(mask, None, (b, t), causal=family == "gpt2"))[:, 0],
                              (b, t, t))
    want = _torch_scores(theirs["queries"], theirs["keys"], visible)
    np.testing.assert_allclose(ours.scores, want, atol=TOL, rtol=0, err_msg="scores")
    hidden = np.broadcast_to(~visible[None, :, None], ours.scores.shape)
    assert hidden.any() and (ours.scores[hidden] == MIN).all() and (want[hidden] == MIN).all()
    assert np.abs(ours.scores[~hidden]).max() > 1.0  # not a degenerate comparison
    np.testing.assert_allclose(jax.nn.softmax(ours.scores, axis=-1), theirs["attentions"], atol=TOL, rtol=0)
    # output_attentions=True (the flag from before outputs=) is "attentions", through __call__ too.
    with jax.default_matmul_precision("highest"):
        call = jax.jit(lambda p: build_model(loaded.config).apply(
            {"params": p}, jnp.asarray(ids), jnp.asarray(mask), output_attentions=True),
            compiler_options=FAST_COMPILE)(loaded.params)
    assert call.scores is None and call.queries is None and call.keys is None and call.values is None
    np.testing.assert_allclose(np.asarray(call.attentions), theirs["attentions"], atol=TOL, rtol=0)


def _packed():
    """Row 0: segments of 5 and 4 tokens and a pad; row 1: 3 and 7 tokens. Positions restart."""
    rs = np.random.RandomState(0)
    seg = np.array([[1] * 5 + [2] * 4 + [0], [1] * 3 + [2] * 7])
    pos = np.concatenate([np.arange(5), np.arange(4), [0], np.arange(3), np.arange(7)]).reshape(2, 10)
    ids = np.where(seg > 0, rs.randint(5, 90, size=seg.shape), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg.astype(np.int32),
            "position_ids": pos.astype(np.int32)}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_packed_segments_attend_only_to_themselves(family, checkpoints):
    _, loaded = checkpoints(family)
    model = build_model(loaded.config)
    packed = _packed()
    packed_out = _encode(model, loaded.params, packed)
    # The four segments alone, as the rows of one right-padded batch.
    spans = [(0, 0, 5), (0, 5, 9), (1, 0, 3), (1, 3, 10)]  # (row, start, end) of each segment
    alone = {"input_ids": np.zeros((4, 7), np.int32), "attention_mask": np.zeros((4, 7), np.int32)}
    for i, (r, a, b) in enumerate(spans):
        alone["input_ids"][i, :b - a] = packed["input_ids"][r, a:b]
        alone["attention_mask"][i, :b - a] = 1
    alone["position_ids"] = np.broadcast_to(np.arange(7, dtype=np.int32), (4, 7)).copy()
    alone_out = _encode(model, loaded.params, alone)

    # [B, T, S, L, N]: indexed by [B, T, S] masks.
    probs, scores = (x.transpose(1, 3, 4, 0, 2) for x in (packed_out.attentions, packed_out.scores))
    seg = packed["segment_ids"]
    across = seg[:, :, None] != seg[:, None, :]  # key in another segment, or a pad
    real_query = np.broadcast_to((seg > 0)[:, :, None], across.shape)
    assert (probs[across & real_query] == 0).all()  # exactly 0
    assert (scores[across] == MIN).all()
    for i, (r, a, b) in enumerate(spans):
        n = b - a
        for name in ("queries", "keys", "values"):
            np.testing.assert_allclose(getattr(packed_out, name)[:, r, a:b], getattr(alone_out, name)[:, i, :n],
                                       atol=TOL, rtol=0, err_msg=f"{name} {i}")
        for name in ("attentions", "scores"):
            np.testing.assert_allclose(getattr(packed_out, name)[:, r, :, a:b, a:b],
                                       getattr(alone_out, name)[:, i, :, :n, :n], atol=TOL, rtol=0,
                                       err_msg=f"{name} {i}")
        np.testing.assert_allclose(packed_out.hidden_states[:, r, a:b], alone_out.hidden_states[:, i, :n],
                                   atol=TOL, rtol=0)
    if family == "gpt2":  # causal within each segment: later keys hidden
        later = np.triu(np.ones((10, 10), bool), 1)
        assert (probs[np.broadcast_to(later, across.shape)] == 0).all()


def test_remat_and_rolled_scan_return_the_same_outputs(checkpoints):
    """GPT-2 (pre-LN: the final LayerNorm rewrites the last hidden state after the scan)."""
    _, loaded = checkpoints("gpt2")
    cfg, params = loaded.config, loaded.params
    batch = ragged_batch(cfg.vocab_size, lengths=(7, 4), seed=2, pad=int(cfg.padding_id))
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])

    # Train mode (dropout on): remat gives the same outputs and the same gradient of a loss on them.
    def loss(p, model):
        out = model.apply({"params": p}, ids, mask, method="encode", outputs=OUTPUTS, deterministic=False,
                          rngs={"dropout": jax.random.PRNGKey(0)})
        value = out.attentions.sum() + (out.queries * out.keys).sum() + out.values.sum() + out.scores.max()
        return value.astype(jnp.float32), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1, compiler_options=FAST_COMPILE)
    (_, plain), grad = jax.device_get(step(params, build_model(cfg)))
    (_, remat), remat_grad = jax.device_get(step(params, build_model(cfg, remat=True)))
    assert set(plain.extras()) == set(remat.extras()) == set(OUTPUTS)
    for name in OUTPUTS:
        np.testing.assert_allclose(getattr(remat, name), getattr(plain, name), atol=1e-6, rtol=0, err_msg=name)
    q_grad = [np.asarray(g["encoder"]["layers"]["q_lin"]["kernel"]) for g in (grad, remat_grad)]
    assert np.abs(q_grad[0]).max() > 0
    np.testing.assert_allclose(q_grad[1], q_grad[0], atol=1e-5, rtol=1e-5)

    # The rolled loop (unroll=False) against the unrolled one, on the same input, eval mode.
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, cfg.hidden))
    visible = attention_mask_from(mask, None, ids.shape, causal=cfg.causal)
    runs = [jax.device_get(jax.jit(lambda p, x, u=unroll: Encoder(cfg, unroll=u).apply(
        {"params": p}, x, visible, outputs=OUTPUTS), compiler_options=FAST_COMPILE)(params["encoder"], x))
        for unroll in (True, False)]
    (_, states, extras), (_, rolled_states, rolled) = runs
    np.testing.assert_allclose(rolled_states, states, atol=1e-6, rtol=0)
    assert set(rolled) == set(extras) == set(OUTPUTS)
    for name in OUTPUTS:
        assert rolled[name].shape[0] == cfg.layers
        np.testing.assert_allclose(rolled[name], extras[name], atol=1e-6, rtol=0, err_msg=name)


def test_nothing_asked_adds_nothing(monkeypatch, checkpoints):
    """No arrays in the unasked fields (nor extra results of the lowered function); queries, keys and
    values keep the fused attention; scores and probabilities run the explicit form (bf16 compute)."""
    _, loaded = checkpoints("gpt2")
    cfg = loaded.config
    model = build_model(cfg, dtype=jnp.bfloat16)
    ids = jnp.ones((2, 6), jnp.int32)
    calls = {"fused": 0, "explicit": 0}
    fused, explicit = jax.nn.dot_product_attention, attention_impl.explicit

    def count(kind, fn):
        def counted(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(jax.nn, "dot_product_attention", count("fused", fused))
    monkeypatch.setattr(attention_impl, "explicit", count("explicit", explicit))

    def traced(method="encode", **kw):
        """(lowered function, its output shapes, attention calls made tracing it)."""
        calls.update(fused=0, explicit=0)
        lowered = jax.jit(lambda p: model.apply({"params": p}, ids, method=method, **kw)).lower(loaded.params)
        return lowered, lowered.out_info, dict(calls)

    lowered, shapes, used = traced()
    assert all(getattr(shapes, name) is None for name in OUTPUTS) and shapes.extras() == {}
    assert len(jax.tree.leaves(shapes)) == 2  # last_hidden_state, hidden_states
    assert used["fused"] > 0 and used["explicit"] == 0
    _, call_shapes, _ = traced("__call__")
    assert all(getattr(call_shapes, name) is None for name in OUTPUTS)
    assert len(jax.tree.leaves(call_shapes)) == 2  # logits, hidden_states

    lowered_qkv, shapes, used = traced(outputs=("queries", "keys", "values"))
    assert used["fused"] > 0 and used["explicit"] == 0  # q / k / v do not need the probabilities
    assert set(shapes.extras()) == {"queries", "keys", "values"}
    assert shapes.queries.shape == (cfg.layers, 2, 6, cfg.heads, cfg.hidden // cfg.heads)
    assert shapes.queries.dtype == jnp.bfloat16
    # The same computation with three more results: as many matmuls and exponentials as the plain call.
    plain_text, qkv_text = lowered.as_text(), lowered_qkv.as_text()
    for op in ("dot_general", "exponential"):
        assert qkv_text.count(op) == plain_text.count(op) > 0, op
    for asked in (("scores",), ("attentions",)):
        _, shapes, used = traced(outputs=asked)
        assert used["fused"] == 0 and used["explicit"] > 0 and set(shapes.extras()) == set(asked)
    assert shapes.attentions.dtype == jnp.bfloat16
    _, shapes, _ = traced(outputs="scores")  # one name as a string
    assert shapes.scores.dtype == jnp.float32 and shapes.scores.shape == (cfg.layers, 2, cfg.heads, 6, 6)


def test_unknown_names_are_refused_in_one_line(checkpoints):
    _, loaded = checkpoints("distilbert")
    model = build_model(loaded.config)
    ids = jnp.ones((1, 4), jnp.int32)
    for method in ("encode", "__call__"):
        with pytest.raises(UserError) as err:
            jax.eval_shape(lambda p, m=method: model.apply({"params": p}, ids, method=m,
                                                           outputs=("queries", "logits")), loaded.params)
        message = str(err.value)
        assert "\n" not in message and "'logits'" in message and "'queries'" not in message
        assert "attentions, scores, queries, keys, values" in message
