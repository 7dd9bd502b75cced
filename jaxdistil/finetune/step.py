"""The fine-tuning step: one jitted update of a sequence classifier, and its scoring step.

The same machinery as distillation: a ``TrainState`` born sharded by the logical-axis rules
(``jaxdistil.distill.step.init_train_state``), the batch over data x fsdp, the AdamW chain of
``jaxdistil.distill.optim``, the state donated. The loss is transformers': cross-entropy for
classification, mean squared error for regression (one output), averaged over the batch's real
rows (``weight`` = 1; padding rows of the last batch weigh 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdistil.distill import sharding as shd
from jaxdistil.distill.optim import OptimConfig, make_optimizer, trainable_global_norm
from jaxdistil.distill.step import TrainState, abstract_train_state, init_train_state
from jaxdistil.models import COMPUTE_DTYPES, ModelConfig
from jaxdistil.models.classification import ClassifierHead, SequenceClassifier, build_classifier

INPUTS = ("attention_mask", "token_type_ids")


def example_losses(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """Per-example loss [B]: logits [B, L] float32, labels [B] (int ids, or floats for regression)."""
    if regression:
        return (logits[:, 0] - labels.astype(jnp.float32)) ** 2
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


@dataclasses.dataclass
class ClassifierStep:
    """A classifier, its optimizer and mesh, and the jitted ``train_step`` / ``eval_step``.

    train_step(state, batch) -> (state, metrics {loss, accuracy, grad_norm, param_norm, lr, tokens})
    eval_step(params, batch) -> {logits [B, num_labels], weight [B]} (replicated)
    """

    model: SequenceClassifier
    mesh: Any
    rules: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    train_step: Callable
    eval_step: Callable

    def init_state(self, rng: jax.Array, params: Any) -> TrainState:
        state, _ = init_train_state(self.model, rng, self.optimizer, self.mesh, self.rules, params=params)
        return state

    def shard_batch(self, host_batch: dict) -> dict[str, jax.Array]:
        return shd.shard_batch(host_batch, self.mesh)


def build_classifier_step(cfg: ModelConfig, head: ClassifierHead, optim: OptimConfig, mesh_cfg: shd.MeshConfig,
                          dtype: str = "float32") -> ClassifierStep:
    mesh = shd.make_mesh(mesh_cfg)
    rules = shd.make_rules(mesh_cfg.rules)
    model = build_classifier(cfg, head, dtype=COMPUTE_DTYPES[dtype])
    optimizer, schedule = make_optimizer(optim, model_cfg=cfg)
    abstract, shardings = abstract_train_state(model, optimizer, mesh, rules)
    repl, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)

    def forward(params, batch, deterministic, rngs=None):
        kwargs = {k: batch[k] for k in INPUTS if k in batch}
        return model.apply({"params": params}, batch["input_ids"], deterministic=deterministic, rngs=rngs, **kwargs)

    def train_step(state: TrainState, batch):
        with shd.activation_rules(mesh, rules):
            key = jax.random.fold_in(state.rng, state.step)
            weight = batch["weight"].astype(jnp.float32)
            rows = jnp.maximum(jnp.sum(weight), 1.0)

            def loss_fn(params):
                logits = forward(params, batch, False, {"dropout": key})
                return jnp.sum(example_losses(logits, batch["label"], head.regression) * weight) / rows, logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if head.regression:
                accuracy = jnp.zeros((), jnp.float32)
            else:
                hits = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
                accuracy = jnp.sum(hits * weight) / rows
            metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": trainable_global_norm(grads),
                       "param_norm": optax.tree.norm(params).astype(jnp.float32),
                       "lr": jnp.asarray(schedule(state.step), jnp.float32),
                       "tokens": jnp.sum(batch["attention_mask"] * weight[:, None], dtype=jnp.float32),
                       "examples": jnp.sum(weight)}
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, batch):
        with shd.activation_rules(mesh, rules):
            return {"logits": forward(params, batch, True), "weight": batch["weight"]}

    train = jax.jit(train_step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                    donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(shardings.params, batch_sh), out_shardings=repl)
    return ClassifierStep(model, mesh, rules, optimizer, schedule, abstract, shardings, train, evaluate)
