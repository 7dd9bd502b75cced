"""The teacher cache's reading side: top-k soft targets against torch, the dense expansion, what a
cached teacher refuses, and a corrupt or foreign cache refused in one line."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.distill import teacher_cache as tc
from jaxdistil.distill.losses import LossConfig, loss_sums
from jaxdistil.distill.objective import StepConfig
from jaxdistil.distill.terms import TermConfig
from jaxdistil.errors import UserError

torch = pytest.importorskip("torch")


def test_expand_top_k_of_the_whole_vocabulary_is_the_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 13)).astype(np.float32)
    values, ids = jax.lax.top_k(jnp.asarray(logits), 13)
    x = jnp.concatenate([ids.astype(jnp.float32), values], axis=-1)
    np.testing.assert_array_equal(np.asarray(tc.expand_top_k(x, 13)), logits)
    values, ids = jax.lax.top_k(jnp.asarray(logits), 3)
    dense = np.asarray(tc.expand_top_k(jnp.concatenate([ids.astype(jnp.float32), values], axis=-1), 13))
    top = np.argsort(-logits, axis=1)[:, :3]
    np.testing.assert_array_equal(np.take_along_axis(dense, top, 1), np.take_along_axis(logits, top, 1))
    assert (np.sort(dense, axis=1)[:, :-3] == tc.FILL).all()


@pytest.mark.parametrize("k", [1, 4, 37])
def test_top_k_soft_targets_equal_torch(k):
    """L_ce from a top-k cache through the logits engine (chunks, the custom gradient) equals the
    renormalised top-k KL written in torch, T^2 sum over real rows of sum_(i in top k) p_i (log p_i -
    log q_i), p = softmax(top-k logits / T), q = log_softmax(student logits / T) over the whole
    vocabulary: in the loss and in the gradients of the student's hidden states and head."""
    b, t, d, v, temp = 3, 7, 6, 37, 2.0
    rng = np.random.default_rng(k)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    kernel = rng.normal(size=(d, v)).astype(np.float32)
    teacher_logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    attention = np.ones((b, t), np.int32)
    attention[0, 5:] = 0  # padding
    attention[2, 3:] = 0
    labels = np.full((b, t), -100, np.int32)
    values, ids = jax.lax.top_k(jnp.asarray(teacher_logits), k)
    cached = jnp.concatenate([ids.astype(jnp.float32), values], axis=-1)
    cfg = LossConfig(temperature=temp, alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.0, chunk_rows=8)

    def ours(h, w):
        sums = loss_sums(h, cached, (lambda p, x: x @ p, w), lambda x: tc.expand_top_k(x, v), labels, attention, cfg,
                         teacher_cos=jnp.zeros((b, t, 4)))
        return sums["ce_sum"]

    loss, (g_h, g_w) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(kernel))

    h_t = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
    w_t = torch.tensor(kernel, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax((h_t @ w_t) / temp, dim=-1)
    top_v = torch.tensor(np.asarray(values), dtype=torch.float64)
    top_i = torch.tensor(np.asarray(ids), dtype=torch.int64)
    log_p = torch.log_softmax(top_v / temp, dim=-1)
    kl = (log_p.exp() * (log_p - torch.gather(log_q, -1, top_i))).sum(-1)
    want = temp**2 * (kl * torch.tensor(attention, dtype=torch.float64)).sum()
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_h), h_t.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_w), w_t.grad.numpy(), rtol=1e-5, atol=1e-5)


def _step(**kw) -> StepConfig:
    return StepConfig(loss=LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0), **kw)


def test_what_a_cached_teacher_serves_and_refuses():
    """A cache serves the terms whose inputs it stores: the layers each term reads (``term_layers``,
    negative indices resolved), top-k soft targets for kl / jsd only; the rest is one line."""
    terms = (TermConfig("kl", temperature=2.0), TermConfig("mlm_ce"), TermConfig("hidden_cos"),
             TermConfig("jsd", rows="masked"), TermConfig("hidden_mse", layers=((0, 0), (1, -2))),
             TermConfig("attention_mse", layers=((0, 1),)), TermConfig("minilmv2_relations", relation_heads=2))
    ok = _step(terms=terms)
    stored = tc.term_layers(ok, teacher_layers=4)
    assert stored == {"hidden_states": (0, 3, 4), "scores": (1,), "queries": (3,), "keys": (3,), "values": (3,)}
    tc.check_terms(ok, 8, 100, has_hidden=False, stored=stored, teacher_layers=4)
    tc.check_terms(_step(terms=(TermConfig("reverse_kl"), TermConfig("logits_mse"))), 100, 100, has_hidden=False)
    cases = [
        (_step(terms=(TermConfig("reverse_kl"),)), "needs every teacher logit; the cache has the top 8 of 100"),
        (_step(terms=(TermConfig("logits_mse"),)), "needs every teacher logit"),
        (StepConfig(loss=LossConfig(alpha_mse=1.0)), "loss.alpha_mse > 0 needs every teacher logit"),
        (StepConfig(), "loss.alpha_cos > 0 needs the teacher's hidden states"),
        (_step(terms=(TermConfig("hidden_mse", layers=((0, 1),)),)),
         "terms[0] (hidden_mse) reads the teacher's hidden_states of layer 1, which the cache does not store"),
        (_step(terms=(TermConfig("attention_kl"),)), "reads the teacher's attentions of layer 3"),
        (_step(teachers=(("teacher", 1.0), ("wide", 1.0)), terms=(TermConfig("kl", teacher=("teacher", "wide")),)),
         "also has wide"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            tc.check_terms(cfg, 8, 100, has_hidden=False, stored={"hidden_states": (0, 4)}, teacher_layers=4)


def _tiny_cache(root, steps=3, rows=(0, 2)):
    """A cache written by hand in the format the writer uses (two chunks)."""
    from safetensors.numpy import save_file

    lo, hi = rows
    block = root / f"rows-{lo}-{hi}"
    block.mkdir(parents=True)
    chunks = []
    for first, last in ((0, 1), (2, steps - 1)):
        arrays = {}
        for s in range(first, last + 1):
            arrays[f"{s}/input_ids"] = np.full((hi - lo, 4), s, np.int32)
            arrays[f"{s}/top_k_ids"] = np.tile(np.arange(2, dtype=np.uint16), (hi - lo, 4, 1))
            arrays[f"{s}/top_k_logits"] = np.full((hi - lo, 4, 2), s, np.float32)
        name = f"chunk-{first}-{last}.safetensors"
        save_file(arrays, str(block / name))
        chunks.append({"file": name, "first": first, "last": last, "bytes": (block / name).stat().st_size,
                       "sha256": tc.file_sha256(block / name)})
    (block / "index.json").write_text(json.dumps({"rows": [lo, hi], "chunks": chunks}))
    (root / "manifest.json").write_text(json.dumps({"format": tc.FORMAT, "identity": {"seed": 0, "mask_id": 3},
                                                    "top_k": 2, "hidden": False}))
    return root


def test_reader_rows_checks_and_one_line_refusals(tmp_path):
    cache = tc.TeacherCache(_tiny_cache(tmp_path / "c"))
    assert cache.steps_covered(0, 2) == 3
    got = cache.rows(2, 0, 2)
    assert (got["input_ids"] == 2).all() and got["top_k_logits"].shape == (2, 4, 2) and "hidden" not in got
    cache.check({"seed": 0, "mask_id": 3}, 3, slice(0, 2))
    with pytest.raises(UserError, match=r"is not of this run: seed is 0 in the cache, 1 in the run"):
        cache.check({"seed": 1, "mask_id": 3}, 3, slice(0, 2))
    with pytest.raises(UserError, match="holds 3 updates of rows 0..1, the run needs 5; extend it"):
        cache.check({"seed": 0, "mask_id": 3}, 5, slice(0, 2))
    with pytest.raises(UserError, match="holds 0 updates of rows 0..3"):  # rows no block holds
        cache.check({"seed": 0, "mask_id": 3}, 1, slice(0, 4))

    # A batch from another data stream than the cache's.
    batches = tc.CachedBatches(iter([{"input_ids": np.zeros((2, 4), np.int32)}]), cache, slice(0, 2), start_step=1)
    with pytest.raises(UserError, match="the loader's batch of update 1 differs"):
        next(batches)
    good = tc.CachedBatches(iter([{"input_ids": np.full((2, 4), 2, np.int32)}]), cache, slice(0, 2), start_step=2)
    batch = next(good)
    assert batch["teacher_top_k"].shape == (2, 4, 4) and batch["teacher_top_k"].dtype == np.float32
    np.testing.assert_array_equal(batch["teacher_top_k"][0, 0], [0, 1, 2, 2])

    # A truncated chunk: one line naming it, found on first read.
    chunk = tmp_path / "c" / "rows-0-2" / "chunk-2-2.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(UserError, match="chunk-2-2.safetensors is missing, truncated or corrupt"):
        tc.TeacherCache(tmp_path / "c").rows(2, 0, 2)
    for broken, message in ((tmp_path / "none", "does not exist"), (tmp_path, "has no manifest.json")):
        with pytest.raises(UserError, match=message):
            tc.TeacherCache(broken)
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        tc.TeacherCache(tmp_path / "c")
