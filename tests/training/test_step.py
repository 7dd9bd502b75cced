"""The step template on an objective that is not distillation: a toy regression model, against the
same model and update written in PyTorch (``torch.optim.AdamW`` + ``clip_grad_norm_`` + a linear
schedule), with gradient accumulation, an extra trainable module and a frozen parameter."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig
from jaxdistil.training.step import TrainStep, split_micro

torch = pytest.importorskip("torch")

VOCAB, DIM, B, T, STEPS = 16, 4, 8, 6, 3
LR, CLIP, WD = 0.05, 0.5, 0.01


class Toy(nn.Module):
    """ids [B, T] -> a value per token: Embed(VOCAB, DIM) -> Dense(1)."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, DIM, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.5), ("vocab", "embed")), name="embed")(ids)
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", None)),
                        name="out")(x)[..., 0]


class ToyObjective:
    """Masked squared error; the extra module ``offset`` adds a learned scalar to every prediction.
    Counts: real tokens. The template must divide the micro-batch sums by the WHOLE batch's count."""

    totals = {"tokens": "tokens"}

    def __init__(self, model):
        self.model = model
        self.extra_init = {"offset": lambda key: {"value": nn.Partitioned(jnp.full((1,), 0.3), names=(None,))}}

    def prepare(self, batch, consts, key):
        return dict(batch), {"tokens": jnp.sum(batch["mask"], dtype=jnp.float32)}

    def sums(self, params, micro, consts, key):
        pred = self.model.apply({"params": params["model"]}, micro["ids"]) + params["extra"]["offset"]["value"][0]
        return {"sq": jnp.sum(micro["mask"] * (pred - micro["y"]) ** 2)}

    def combine(self, sums, counts):
        loss = sums["sq"] / jnp.maximum(counts["tokens"], 1.0)
        return loss, {"loss": loss}


def batches():
    rs = np.random.RandomState(0)
    out = []
    for _ in range(STEPS):
        mask = (rs.rand(B, T) < 0.8).astype(np.float32)
        out.append({"ids": rs.randint(0, VOCAB, (B, T)).astype(np.int32), "y": rs.normal(size=(B, T)).astype(np.float32),
                    "mask": mask})
    return out


def torch_reference(params, offset, data, frozen_embed: bool):
    """The same model, loss and AdamW in PyTorch; returns (losses, grad norms, final tensors)."""
    emb = torch.nn.Parameter(torch.tensor(np.asarray(params["embed"]["embedding"])))
    kernel = torch.nn.Parameter(torch.tensor(np.asarray(params["out"]["kernel"])))
    bias = torch.nn.Parameter(torch.tensor(np.asarray(params["out"]["bias"])))
    off = torch.nn.Parameter(torch.tensor(np.asarray(offset)))
    emb.requires_grad_(not frozen_embed)
    trained = [p for p in (emb, kernel, bias, off) if p.requires_grad]
    # optax's decay mask: no decay on biases (out/bias, and the offset's "value" is not a bias).
    opt = torch.optim.AdamW([{"params": [p for p in trained if p is not bias], "weight_decay": WD},
                             {"params": [bias], "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (STEPS - s) / STEPS)
    losses, norms = [], []
    for batch in data:
        ids, y, mask = (torch.tensor(batch[k]) for k in ("ids", "y", "mask"))
        pred = (emb[ids.long()] @ kernel)[..., 0] + bias[0] + off[0]
        loss = torch.sum(mask * (pred - y) ** 2) / mask.sum()
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trained, CLIP)))
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses, norms, {"embed": emb.detach().numpy(), "kernel": kernel.detach().numpy(),
                           "bias": bias.detach().numpy(), "offset": off.detach().numpy()}


@pytest.mark.parametrize("accum,frozen", [(1, False), (4, True)])
def test_template_equals_torch_adamw(accum, frozen):
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    optim = OptimConfig(learning_rate=LR, b1=0.9, b2=0.98, eps=1e-6, weight_decay=WD, max_grad_norm=CLIP,
                        warmup_prop=0.0, total_steps=STEPS, grad_accum_steps=accum)
    model = Toy()
    step = TrainStep(model, ToyObjective(model), optim, mesh, shd.RULES,
                     frozen=("embed/embedding",) if frozen else (), const_shardings={},
                     compiler_options={"xla_backend_optimization_level": 0})
    state = step.init_state(jax.random.PRNGKey(0))
    assert set(state.extra) == {"offset"}
    start_params, start_offset = jax.device_get(state.params), jax.device_get(state.extra["offset"]["value"])
    data = batches()
    metrics = []
    for batch in data:
        state, m = step.train_step(state, step.shard_batch(batch), {})
        metrics.append(jax.device_get(m))
    losses, norms, final = torch_reference(start_params, start_offset, data, frozen)
    np.testing.assert_allclose([m["loss"] for m in metrics], losses, rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in metrics], norms, rtol=1e-5)  # frozen: left out
    got = jax.device_get(state)
    np.testing.assert_allclose(got.params["out"]["kernel"], final["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.params["out"]["bias"], final["bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.extra["offset"]["value"], final["offset"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.params["embed"]["embedding"], final["embed"], rtol=1e-5, atol=1e-6)
    if frozen:
        np.testing.assert_array_equal(got.params["embed"]["embedding"], start_params["embed"]["embedding"])
    # The raw sums and counts come out for exact interval aggregation; counts are the whole batch's.
    assert metrics[0]["counts"]["tokens"] == data[0]["mask"].sum()
    np.testing.assert_allclose(metrics[0]["sums"]["sq"] / metrics[0]["counts"]["tokens"], losses[0], rtol=1e-5)
    assert int(got.step) == STEPS and metrics[0]["lr"] == pytest.approx(LR)


def test_update_and_param_norms():
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    optim = OptimConfig(learning_rate=LR, warmup_prop=0.0, total_steps=STEPS)
    model = Toy()
    step = TrainStep(model, ToyObjective(model), optim, mesh, shd.RULES, const_shardings={},
                     compiler_options={"xla_backend_optimization_level": 0})
    state = step.init_state(jax.random.PRNGKey(1))
    before = jax.device_get((state.params, state.extra))
    state, m = step.train_step(state, step.shard_batch(batches()[0]), {})
    after = jax.device_get((state.params, state.extra))
    delta = [np.ravel(a - b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert float(m["update_norm"]) == pytest.approx(float(np.linalg.norm(np.concatenate(delta))), rel=1e-5)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(after)])
    assert float(m["param_norm"]) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-5)


def test_micro_batches_are_strided_rows():
    x = jnp.arange(12).reshape(12, 1)
    y = split_micro(x, 3, None)
    assert y.shape == (3, 4, 1)
    np.testing.assert_array_equal(y[1, :, 0], [1, 4, 7, 10])


@pytest.mark.slow
def test_sharded_template_equals_one_device():
    """The toy objective under data=4 x fsdp=2 equals one device (the template places the batch
    over data x fsdp and keeps the params' shardings)."""
    optim = OptimConfig(learning_rate=LR, warmup_prop=0.0, total_steps=STEPS)
    model = Toy()
    out = []
    for mesh in (shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1]),
                 shd.make_mesh(shd.MeshConfig(data=4, fsdp=2))):
        step = TrainStep(model, ToyObjective(model), optim, mesh, shd.RULES, const_shardings={},
                         compiler_options={"xla_backend_optimization_level": 0})
        state = step.init_state(jax.random.PRNGKey(2))
        for batch in batches():
            state, m = step.train_step(state, step.shard_batch(batch), {})
        out.append((jax.device_get(state.params), float(m["loss"])))
    (p1, l1), (p8, l8) = out
    assert l8 == pytest.approx(l1, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p8, p1)
