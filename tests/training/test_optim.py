"""The update hop of the step (grads -> clip -> AdamW -> schedule) against PyTorch's AdamW recipe.

The reference trains with ``torch.optim.AdamW`` + ``clip_grad_norm_`` + transformers'
``get_linear_schedule_with_warmup``; here the same three run side by side with the optax chain.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxdistil.errors import UserError
from jaxdistil.models import DistilBertConfig, frozen_param_paths
from jaxdistil.training.optim import OptimConfig, decay_mask, make_optimizer, make_schedule


def hf_linear_warmup(step: int, warmup: int, total: int) -> float:
    """transformers.get_linear_schedule_with_warmup's multiplier at scheduler step ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize("total,prop", [(100, 0.05), (37, 0.1), (10, 0.0)])
def test_schedule_matches_reference(total, prop):
    cfg = OptimConfig(learning_rate=5e-4, warmup_prop=prop, total_steps=total)
    sched = make_schedule(cfg)
    warmup = math.ceil(total * prop)
    for s in range(total + 3):
        assert float(sched(s)) == pytest.approx(5e-4 * hf_linear_warmup(s, warmup, total), abs=1e-10), s


def test_config_errors():
    with pytest.raises(UserError, match="total_steps is not set"):
        make_optimizer(OptimConfig())
    with pytest.raises(UserError, match="warmup_prop"):
        OptimConfig(warmup_prop=1.5)
    with pytest.raises(UserError, match="grad_accum_steps"):
        OptimConfig(grad_accum_steps=0)


PARAMS = {
    "embeddings": {"word_embeddings": {"embedding": (10, 4)}, "position_embeddings": {"embedding": (6, 4)},
                   "LayerNorm": {"scale": (4,), "bias": (4,)}},
    "encoder": {"layers": {"lin1": {"kernel": (2, 4, 8), "bias": (2, 8)},
                           "sa_layer_norm": {"scale": (2, 4), "bias": (2, 4)}}},
    "mlm_head": {"transform_norm": {"scale": (4,), "bias": (4,)}, "bias": (10,)},
}


def flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def unflat(items):
    out = {}
    for path, v in items:
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def test_decay_mask_names():
    mask = dict(flat(decay_mask(unflat((k, np.zeros(s)) for k, s in flat(PARAMS)))))
    assert {k for k, v in mask.items() if v} == {
        "embeddings/word_embeddings/embedding", "embeddings/position_embeddings/embedding",
        "encoder/layers/lin1/kernel"}


@pytest.mark.slow
@pytest.mark.parametrize("sinusoidal", [False, True])
def test_adamw_chain_matches_torch(sinusoidal):
    torch = pytest.importorskip("torch")
    cfg = OptimConfig(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0, warmup_prop=0.3, total_steps=8)
    model_cfg = DistilBertConfig(sinusoidal_pos_embds=sinusoidal)
    frozen = "embeddings/position_embeddings/embedding" if sinusoidal else None
    rs = np.random.RandomState(0)
    init = [(k, rs.normal(size=shape).astype(np.float32)) for k, shape in flat(PARAMS)]
    grads_seq = [[(k, 3 * rs.normal(size=v.shape).astype(np.float32)) for k, v in init]
                 for _ in range(cfg.total_steps)]

    tx, _ = make_optimizer(cfg, unflat(init), frozen=frozen_param_paths(model_cfg))
    params = jax.tree_util.tree_map(jax.numpy.asarray, unflat(init))
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(unflat(grads), state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)

    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init if k != frozen}
    no_decay = [p for k, p in tparams.items() if k.endswith("bias") or "norm" in k.lower().split("/")[-2]]
    decay = [p for k, p in tparams.items() if all(p is not q for q in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    warmup = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: hf_linear_warmup(s, warmup, cfg.total_steps))
    for grads in grads_seq:
        for k, g in grads:
            if k in tparams:
                tparams[k].grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), cfg.max_grad_norm)
        opt.step()
        sched.step()

    got = dict(flat(jax.device_get(params)))
    for k, v in init:
        want = v if k == frozen else tparams[k].detach().numpy()
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("total,prop", [(100, 0.05), (37, 0.1), (10, 0.0), (7, 1.0)])
def test_schedule_equals_transformers_get_linear_schedule_with_warmup(total, prop):
    """The reference's own scheduler: LambdaLR from transformers, stepped as distiller.py does
    (scheduler.step() after every optimizer.step(); update s uses the rate after s steps)."""
    torch = pytest.importorskip("torch")
    from transformers import get_linear_schedule_with_warmup

    lr = 5e-4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warmup = math.ceil(total * prop)  # distiller.py: math.ceil(num_train_optimization_steps * warmup_prop)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    ours = make_schedule(OptimConfig(learning_rate=lr, warmup_prop=prop, total_steps=total))
    for s in range(total + 2):
        # optax evaluates the schedule in float32: equal within 2e-7 of the peak rate.
        assert float(ours(s)) == pytest.approx(opt.param_groups[0]["lr"], rel=0, abs=1e-10), s
        opt.step()
        sched.step()
