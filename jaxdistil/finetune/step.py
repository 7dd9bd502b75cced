"""The fine-tuning step: a sequence classifier's objective on the step template, and its scoring step.

The classifier trains on the same template as distillation (``jaxdistil.training.step``): a
``TrainState`` born sharded by the logical-axis rules, the batch over data x fsdp, the AdamW chain
of ``jaxdistil.training.optim``, gradient accumulation, the state donated. The objective is
transformers': cross-entropy for classification, mean squared error for regression (one output),
averaged over the batch's real rows (``weight`` = 1; padding rows of the last batch weigh 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdistil.models import COMPUTE_DTYPES, ModelConfig, attention, frozen_param_paths
from jaxdistil.models.classification import ClassifierHead, SequenceClassifier, build_classifier
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig
from jaxdistil.training.step import TrainStep, make_eval_step

INPUTS = ("attention_mask", "token_type_ids")


def example_losses(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """Per-example loss [B]: logits [B, L] float32, labels [B] (int ids, or floats for regression)."""
    if regression:
        return (logits[:, 0] - labels.astype(jnp.float32)) ** 2
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


class ClassifierObjective:
    """Classification / regression loss as the step template's ``Objective`` (no consts).

    sums: "loss_sum" (per-example losses x weight), "correct" (weighted hits); counts: "rows" (real
    examples), "tokens" (their real tokens). metrics: "loss", "accuracy" (0 for regression).
    """

    extra_init: dict = {}
    totals = {"tokens": "tokens", "examples": "rows"}

    def __init__(self, model: SequenceClassifier, regression: bool):
        self.model, self.regression = model, regression

    def forward(self, params, batch, deterministic: bool, key=None) -> jax.Array:
        kwargs = {k: batch[k] for k in INPUTS if k in batch}
        rngs = None if key is None else {"dropout": key}
        return self.model.apply({"params": params}, batch["input_ids"], deterministic=deterministic, rngs=rngs,
                                **kwargs)

    def prepare(self, batch, consts, key):
        weight = batch["weight"].astype(jnp.float32)
        counts = {"rows": jnp.sum(weight),
                  "tokens": jnp.sum(batch["attention_mask"] * weight[:, None], dtype=jnp.float32)}
        return dict(batch), counts

    def sums(self, params, micro, consts, key):
        logits = self.forward(params["model"], micro, False, key)
        weight = micro["weight"].astype(jnp.float32)
        out = {"loss_sum": jnp.sum(example_losses(logits, micro["label"], self.regression) * weight)}
        if self.regression:
            out["correct"] = jnp.zeros((), jnp.float32)
        else:
            out["correct"] = jnp.sum((jnp.argmax(logits, -1) == micro["label"]).astype(jnp.float32) * weight)
        return out

    def combine(self, sums, counts):
        rows = jnp.maximum(counts["rows"], 1.0)
        loss = sums["loss_sum"] / rows
        return loss, {"loss": loss, "accuracy": sums["correct"] / rows}


class ClassifierStep:
    """A classifier, its objective on the step template, and the jitted steps.

    train_step(state, batch) -> (state, metrics {loss, accuracy, grad_norm, param_norm, update_norm, lr, ...})
    eval_step(params, batch) -> {logits [B, num_labels], weight [B]} (replicated)
    """

    def __init__(self, cfg: ModelConfig, head: ClassifierHead, optim: OptimConfig, mesh_cfg: shd.MeshConfig,
                 dtype: str = "float32", attention_impl: str = "auto"):
        self.mesh = shd.make_mesh(mesh_cfg)
        self.rules = shd.make_rules(mesh_cfg.rules)
        impl = attention.resolve(attention_impl, COMPUTE_DTYPES[dtype])
        self.model = build_classifier(cfg, head, dtype=COMPUTE_DTYPES[dtype], attention=impl)
        self.objective = ClassifierObjective(self.model, head.regression)
        self.core = TrainStep(self.model, self.objective, optim, self.mesh, self.rules,
                              frozen=frozen_param_paths(cfg), const_shardings={})
        self.optimizer, self.schedule = self.core.optimizer, self.core.schedule
        self.abstract_state, self.state_shardings = self.core.abstract_state, self.core.state_shardings
        self._train = self.core.train_step
        objective = self.objective
        self.eval_step: Callable[..., Any] = make_eval_step(
            lambda p, b: {"logits": objective.forward(p, b, True), "weight": b["weight"]}, self.mesh, self.rules,
            (self.state_shardings.params, shd.batch_sharding(self.mesh)))

    def train_step(self, state, batch):
        return self._train(state, batch, {})

    def init_state(self, rng: jax.Array, params: Any) -> Any:
        return self.core.init_state(rng, params)

    def shard_batch(self, host_batch: dict) -> dict[str, jax.Array]:
        return shd.shard_batch(host_batch, self.mesh)


def build_classifier_step(cfg: ModelConfig, head: ClassifierHead, optim: OptimConfig, mesh_cfg: shd.MeshConfig,
                          dtype: str = "float32", attention_impl: str = "auto") -> ClassifierStep:
    return ClassifierStep(cfg, head, optim, mesh_cfg, dtype, attention_impl)
