"""The one place a distillation step is built: models, mesh, rules, optimizer, state, step functions.

``DistillStep(StepSpec(...))`` is what ``train``, the shard study and the benchmark run:

  spec.student / spec.teacher   model configs (shapes); the teacher None for MLM-only training
  spec.step                     StepConfig: loss, masking, optim (with total_steps), dtype, ...
  spec.mesh                     MeshConfig: data / fsdp / tensor sizes and rule overrides

  built.mesh, built.rules                      the device mesh and the logical-axis rules table
  built.student, built.teacher                 Flax modules in the compute dtype
  built.optimizer, built.schedule              the AdamW chain and its learning rate
  built.abstract_state, built.state_shardings  TrainState of ShapeDtypeStructs / NamedShardings
  built.train_step                             jitted (state, teacher params, batch, weights) -> (state, metrics)
  built.eval_step(model)                       jitted held-out scoring of "student" or "teacher"
  built.init_state / place_teacher / random_teacher / shard_batch / replicate

``run_step_spec`` reads a spec from a run config (``jaxdistil.config.RunConfig``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill import sharding as shd
from jaxdistil.distill.optim import frozen_param_paths, make_optimizer
from jaxdistil.distill.step import (
    StepConfig, TrainState, abstract_train_state, build_models, init_train_state, make_eval_step,
    make_train_step)
from jaxdistil.errors import UserError
from jaxdistil.models import ModelConfig, init_params

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a distillation step is made of (see the module doc).

    strict: a dimension that its rule's mesh axes do not divide is an error (True) or replicated
      with a warning (False). compiler_options: XLA options of the train step's compile.
    """

    student: ModelConfig
    teacher: ModelConfig | None
    step: StepConfig
    mesh: shd.MeshConfig = shd.MeshConfig()
    strict: bool = False
    compiler_options: Mapping[str, Any] | None = None


def run_step_spec(cfg: Any, student: ModelConfig, teacher: ModelConfig | None, mask_id: int,
                  total_steps: int, rules: Sequence[str] = (), strict: bool = False) -> StepSpec:
    """The StepSpec of a run config: its loss, masking, optimizer (``total_steps`` updates), compute
    dtype, remat, frozen parameters, normalisation groups and mesh (``rules``: extra overrides)."""
    frozen = frozen_param_paths(student, cfg.student.freeze_pos_embs, cfg.student.freeze_token_type_embds)
    step = StepConfig(
        loss=cfg.loss, masking=cfg.masking, optim=dataclasses.replace(cfg.optim, total_steps=total_steps),
        mask_id=int(mask_id), dtype=cfg.train.dtype, remat=cfg.train.remat,
        group_rows=cfg.loader.group_rows, frozen=frozen, causal=student.causal,
        projection=cos_projection(cfg.loss, student, teacher))
    mesh = dataclasses.replace(cfg.mesh, rules=tuple(cfg.mesh.rules) + tuple(rules))
    return StepSpec(student, teacher, step, mesh, strict)


def cos_projection(loss: Any, student: ModelConfig, teacher: ModelConfig | None) -> tuple[int, int] | None:
    """(student width, teacher width) of L_cos's learned projection (loss.cos_projection=linear), or None."""
    if loss.cos_projection == "none":
        return None
    if teacher is None:
        raise UserError("loss.cos_projection=linear needs a teacher (it maps the student's hidden states "
                        "to the teacher's width); remove it for MLM-only training")
    return (student.hidden, teacher.hidden)


class DistillStep:
    """A StepSpec built on ``devices`` (default: all of them); see the module doc."""

    def __init__(self, spec: StepSpec, devices: Sequence[jax.Device] | None = None):
        self.spec = spec
        self.mesh = shd.make_mesh(spec.mesh, devices)
        self.rules = shd.make_rules(spec.mesh.rules)
        self.student, self.teacher = build_models(spec.step, spec.student, spec.teacher)
        self.optimizer, self.schedule = make_optimizer(spec.step.optim, model_cfg=spec.student,
                                                       frozen=spec.step.frozen)
        self.abstract_state, self.state_shardings = abstract_train_state(
            self.student, self.optimizer, self.mesh, self.rules, spec.strict, projection=spec.step.projection)
        self.teacher_shardings = None
        if self.teacher is not None:
            self.teacher_shardings = shd.param_shardings(self.teacher, self.mesh, self.rules,
                                                         strict=spec.strict)
        self.train_step = make_train_step(
            self.student, self.teacher, spec.step, self.optimizer, self.schedule, self.mesh, self.rules,
            self.state_shardings, self.teacher_shardings,
            compiler_options=dict(spec.compiler_options) if spec.compiler_options else None)
        self._eval_steps: dict[tuple, Any] = {}

    # -- state and parameters
    def init_state(self, rng: jax.Array, params: PyTree | None = None) -> TrainState:
        """The initial TrainState, born sharded: ``params`` placed by the rules (e.g. a student
        copied from teacher layers) or drawn at random from ``rng``."""
        state, _ = init_train_state(self.student, rng, self.optimizer, self.mesh, self.rules, params=params,
                                    strict=self.spec.strict, projection=self.spec.step.projection)
        return state

    def place_teacher(self, params: PyTree) -> PyTree:
        """The teacher's (unboxed, host) params placed by the rules."""
        return shd.shard_params(params, self.teacher_shardings)

    def random_teacher(self, rng: jax.Array) -> PyTree:
        """A randomly initialised teacher, born sharded (for studies and benchmarks of the step)."""
        return jax.jit(lambda r: init_params(self.teacher, r), out_shardings=self.teacher_shardings)(rng)

    # -- data
    def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return shd.shard_batch(host_batch, self.mesh)

    def replicate(self, value: Any) -> jax.Array:
        return jax.device_put(value, shd.replicated(self.mesh))

    # -- evaluation
    def eval_step(self, which: str = "student", masking: MaskingConfig | None = None,
                  baseline_id: int | None = None):
        """The jitted held-out scoring of the student's or the teacher's params (``make_eval_step``),
        with ``masking`` (default: the step's); built once per (model, masking, baseline)."""
        key = (which, masking or self.spec.step.masking, baseline_id)
        if key not in self._eval_steps:
            model = self.student if which == "student" else self.teacher
            shardings = self.state_shardings.params if which == "student" else self.teacher_shardings
            cfg = dataclasses.replace(self.spec.step, masking=key[1])
            self._eval_steps[key] = make_eval_step(model, cfg, self.mesh, self.rules, shardings, baseline_id)
        return self._eval_steps[key]
