"""The one place a distillation step is built: models, mesh, rules, the objective on the step template.

``DistillStep(StepSpec(...))`` is what ``train``, ``evaluate``, the shard study, the benchmark and
the tests run (the step template itself, ``jaxdistil.training.step.TrainStep``, also serves the
classifier step of fine-tuning):

  spec.student / spec.teacher   model configs (shapes); the teacher None for MLM-only training
  spec.extra_teachers           model configs of the run config's ``teachers:`` list (step.teachers[1:])
  spec.step                     StepConfig: loss, masking, optim (with total_steps), dtype, ...
  spec.mesh                     MeshConfig: data / fsdp / tensor sizes and rule overrides

  built.mesh, built.rules                      the device mesh and the logical-axis rules table
  built.student, built.teacher                 Flax modules in the compute dtype
  built.objective                              the DistillObjective the template runs
  built.optimizer, built.schedule              the AdamW chain and its learning rate
  built.abstract_state, built.state_shardings  TrainState of ShapeDtypeStructs / NamedShardings
  built.train_step                             jitted (state, batch, consts) -> (state, metrics)
  built.consts(teacher_params, token_weights[, extra])  the step's consts, placed
  built.eval_step(model)                       jitted held-out scoring of "student" or "teacher"
  built.init_state / place_teacher / random_teacher / shard_batch / replicate

``run_step_spec`` reads a spec from a run config (``jaxdistil.distill.config.RunConfig``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill.objective import DistillObjective, StepConfig, build_models, build_teacher, eval_sums
from jaxdistil.errors import UserError
from jaxdistil.models import ModelConfig, frozen_param_paths, init_params
from jaxdistil.training import sharding as shd
from jaxdistil.training.state import TrainState
from jaxdistil.training.step import TrainStep, make_eval_step

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
    extra_teachers: tuple[ModelConfig, ...] = ()


def run_step_spec(cfg: Any, student: ModelConfig, teacher: ModelConfig | None, mask_id: int,
                  total_steps: int, rules: Sequence[str] = (), strict: bool = False,
                  extra_teachers: Sequence[ModelConfig] = (),
                  cached_layers: Mapping[str, Sequence[int]] | None = None) -> StepSpec:
    """The StepSpec of a run config: its loss, terms and teachers, masking, optimizer (``total_steps``
    updates), compute dtype, remat, frozen parameters, normalisation groups and mesh (``rules``: extra
    overrides); extra_teachers: the model configs of ``cfg.teachers``, in order; cached_layers: with
    ``teacher.cache``, the per-layer teacher outputs the cache holds (``TeacherCache.outputs``)."""
    frozen = frozen_param_paths(student, cfg.student.freeze_pos_embs, cfg.student.freeze_token_type_embds)
    step = StepConfig(
        loss=cfg.loss, masking=cfg.masking, optim=dataclasses.replace(cfg.optim, total_steps=total_steps),
        mask_id=int(mask_id), dtype=cfg.train.dtype, attention=cfg.train.attention, remat=cfg.train.remat,
        group_rows=cfg.loader.group_rows, frozen=frozen, causal=student.causal,
        projection=cos_projection(cfg.loss, student, teacher), terms=tuple(cfg.terms),
        teachers=tuple((t.name, t.weight) for t in (cfg.teacher, *cfg.teachers)),
        cached_teacher=bool(cfg.teacher.cache),
        cached_layers=tuple((f, tuple(v)) for f, v in (cached_layers or {}).items()))
    mesh = dataclasses.replace(cfg.mesh, rules=tuple(cfg.mesh.rules) + tuple(rules))
    return StepSpec(student, teacher, step, mesh, strict, extra_teachers=tuple(extra_teachers))


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
        self.extra_teachers = tuple(build_teacher(spec.step, c) for c in spec.extra_teachers)
        self.objective = DistillObjective(self.student, self.teacher, spec.step, self.extra_teachers)
        self.teacher_shardings = None
        if self.teacher is not None:
            self.teacher_shardings = shd.param_shardings(self.teacher, self.mesh, self.rules,
                                                         strict=spec.strict)
        self.extra_teacher_shardings = tuple(shd.param_shardings(m, self.mesh, self.rules, strict=spec.strict)
                                             for m in self.extra_teachers)
        frozen = tuple(dict.fromkeys(frozen_param_paths(spec.student) + spec.step.frozen))
        self.core = TrainStep(self.student, self.objective, spec.step.optim, self.mesh, self.rules, frozen=frozen,
                              const_shardings={"teacher": None if spec.step.cached_teacher else self.teacher_shardings,
                                               "teachers": self.extra_teacher_shardings,
                                               "token_weights": shd.replicated(self.mesh)},
                              strict=spec.strict, compiler_options=spec.compiler_options)
        self.optimizer, self.schedule = self.core.optimizer, self.core.schedule
        self.abstract_state, self.state_shardings = self.core.abstract_state, self.core.state_shardings
        self.train_step = self.core.train_step
        self._eval_steps: dict[tuple, Any] = {}

    # -- state and parameters
    def init_state(self, rng: jax.Array, params: PyTree | None = None) -> TrainState:
        """The initial TrainState, born sharded: ``params`` placed by the rules (e.g. a student
        copied from teacher layers) or drawn at random from ``rng``."""
        return self.core.init_state(rng, params)

    def place_teacher(self, params: PyTree) -> PyTree:
        """The teacher's (unboxed, host) params placed by the rules."""
        return shd.shard_params(params, self.teacher_shardings)

    def place_extra_teachers(self, params: Sequence[PyTree]) -> tuple[PyTree, ...]:
        """The ``teachers:`` list's (unboxed, host) params, in order, placed by the rules."""
        return tuple(shd.shard_params(p, s) for p, s in zip(params, self.extra_teacher_shardings, strict=True))

    def random_teacher(self, rng: jax.Array, index: int = 0) -> PyTree:
        """A randomly initialised teacher (``index`` 0: the loss section's, i: ``extra_teachers[i - 1]``),
        born sharded (for studies, benchmarks and tests of the step)."""
        model = (self.teacher, *self.extra_teachers)[index]
        shardings = (self.teacher_shardings, *self.extra_teacher_shardings)[index]
        return jax.jit(lambda r: init_params(model, r), out_shardings=shardings)(rng)

    def consts(self, teacher_params: PyTree | None, token_weights: Any,
               extra_teachers: Sequence[PyTree] = ()) -> dict[str, Any]:
        """The train step's consts: the placed teacher params (or None), the [V] masking weights and
        the placed params of the ``teachers:`` list (``place_extra_teachers``)."""
        if len(extra_teachers) != len(self.extra_teachers):
            raise UserError(f"{len(extra_teachers)} extra teachers' params for the {len(self.extra_teachers)} "
                            "teachers of the step")
        return {"teacher": teacher_params, "teachers": tuple(extra_teachers),
                "token_weights": self.replicate(token_weights)}

    # -- data
    def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return shd.shard_batch(host_batch, self.mesh)

    def replicate(self, value: Any) -> jax.Array:
        return jax.device_put(value, shd.replicated(self.mesh))

    # -- evaluation
    def eval_step(self, which: str = "student", masking: MaskingConfig | None = None,
                  baseline_id: int | None = None):
        """The jitted held-out scoring ``(params, batch, token_weights, rng) -> sums`` of the student's
        or the teacher's params (``objective.eval_sums``), with ``masking`` (default: the step's);
        built once per (model, masking, baseline)."""
        key = (which, masking or self.spec.step.masking, baseline_id)
        if key not in self._eval_steps:
            model = self.student if which == "student" else self.teacher
            shardings = self.state_shardings.params if which == "student" else self.teacher_shardings
            cfg = dataclasses.replace(self.spec.step, masking=key[1])
            repl = shd.replicated(self.mesh)
            self._eval_steps[key] = make_eval_step(eval_sums(model, cfg, baseline_id), self.mesh, self.rules,
                                                   (shardings, shd.batch_sharding(self.mesh), repl, repl))
        return self._eval_steps[key]
