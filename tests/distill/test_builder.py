"""The one builder of a distillation step: a run config's spec (frozen tables, the projection, the
mesh rules, the schedule's length), the pieces it exposes and their shardings, the consts, the cached
scoring steps."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tiny
from tiny import MASK_ID, student_cfg, teacher_cfg

from jaxdistil.distill.builder import DistillStep, StepSpec, cos_projection, run_step_spec
from jaxdistil.distill.config import config_from_dict
from jaxdistil.distill.evaluation import eval_masking
from jaxdistil.distill.objective import COS_PROJECTION, DistillObjective, StepConfig
from jaxdistil.errors import UserError
from jaxdistil.models import POSITIONS, TOKEN_TYPES
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig


def test_run_step_spec_reads_the_run_config():
    cfg = config_from_dict({"student": {"freeze_pos_embs": True}, "loss": {"cos_projection": "linear"},
                            "mesh": {"fsdp": 2, "rules": ["mlp=none"]}, "loader": {"batch_size": 10, "group_rows": 5},
                            "train": {"dtype": "bfloat16", "remat": True}})
    narrow = student_cfg(dim=32, hidden_dim=64, n_heads=4)
    spec = run_step_spec(cfg, narrow, teacher_cfg(), MASK_ID, total_steps=77, rules=("embed=none",))
    assert spec.step.optim.total_steps == 77 and spec.step.mask_id == MASK_ID
    assert spec.step.frozen == (POSITIONS,) and spec.step.projection == (32, 64)
    assert spec.step.dtype == "bfloat16" and spec.step.remat and spec.step.group_rows == 5
    assert spec.mesh.fsdp == 2 and spec.mesh.rules == ("mlp=none", "embed=none")
    with pytest.raises(UserError, match="cos_projection=linear needs a teacher"):
        cos_projection(cfg.loss, narrow, None)
    frozen_types = config_from_dict({"student": {"model_type": "bert", "freeze_token_type_embds": True}})
    assert run_step_spec(frozen_types, teacher_cfg(), None, MASK_ID, 1).step.frozen == (TOKEN_TYPES,)


def test_built_pieces_are_consistent():
    cfg = StepConfig(optim=OptimConfig(total_steps=10), mask_id=MASK_ID)
    built = DistillStep(StepSpec(student_cfg(sinusoidal=True), teacher_cfg(), cfg, shd.MeshConfig(data=2, fsdp=4)))
    assert isinstance(built.objective, DistillObjective) and built.objective.extra_init == {}
    assert dict(built.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # Sinusoidal positions are frozen through the model config (the optimizer's frozen paths).
    assert built.core.frozen == (f"model/{POSITIONS}",)
    state = built.init_state(jax.random.PRNGKey(0))
    assert jax.tree.structure(state) == jax.tree.structure(built.abstract_state)
    teacher = built.random_teacher(jax.random.PRNGKey(1))
    assert jax.tree.map(lambda x: x.sharding, teacher) == built.teacher_shardings
    consts = built.consts(teacher, np.ones(tiny.V, np.float32))
    assert consts["token_weights"].sharding.spec == jax.sharding.PartitionSpec()
    # Scoring steps are built once per (model, masking, baseline).
    assert built.eval_step("student", eval_masking()) is built.eval_step("student", eval_masking())
    assert built.eval_step("teacher") is not built.eval_step("student")


def test_projection_is_the_objectives_module():
    cfg = StepConfig(optim=OptimConfig(total_steps=10), mask_id=MASK_ID, projection=(32, 64))
    built = DistillStep(StepSpec(student_cfg(dim=32, hidden_dim=64, n_heads=4), teacher_cfg(), cfg,
                                 shd.MeshConfig(data=1)), devices=jax.devices()[:1])
    assert set(built.objective.extra_init) == {COS_PROJECTION}
    assert set(built.abstract_state.extra) == {COS_PROJECTION}
    assert COS_PROJECTION not in built.abstract_state.params
    assert built.abstract_state.extra[COS_PROJECTION]["kernel"].shape == (32, 64)
