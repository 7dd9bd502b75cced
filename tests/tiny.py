"""Tiny models, batches and steps shared by the tests (importable: ``tests/`` is on the path).

Every test that runs a distillation step gets it from ``build`` (the ``tiny_step`` fixture of
``conftest.py``), which goes through the library's one builder, ``jaxdistil.distill.builder.DistillStep``:
no test assembles a step by hand. Sizes (hidden 64, 2 layers, vocab 128) keep each compile to a few
seconds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from jaxdistil.distill.builder import DistillStep, StepSpec
from jaxdistil.distill.objective import StepConfig
from jaxdistil.models import BertConfig, DistilBertConfig, build_model, init_params
from jaxdistil.training import sharding as shd

V, D, HEADS, F, LAYERS, P = 128, 64, 8, 128, 2, 32
SPECIAL = 5  # ids 0..4 are "special": never masked, never in the synthetic text
MASK_ID = 3
# Unoptimised LLVM code compiles twice as fast; for jits run only a few times.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def student_cfg(dropout: float = 0.0, sinusoidal: bool = False, **kw) -> DistilBertConfig:
    """The tiny DistilBERT student; ``kw``: other HF config fields (``dim=32``...)."""
    return DistilBertConfig(**{**dict(vocab_size=V, dim=D, n_heads=HEADS, hidden_dim=F, n_layers=LAYERS,
                                      max_position_embeddings=P, dropout=dropout, attention_dropout=dropout,
                                      sinusoidal_pos_embds=sinusoidal), **kw})


def teacher_cfg(dropout: float = 0.0, **kw) -> BertConfig:
    """The tiny BERT teacher; ``kw``: other HF config fields."""
    return BertConfig(**{**dict(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                                num_hidden_layers=LAYERS, max_position_embeddings=P, hidden_dropout_prob=dropout,
                                attention_probs_dropout_prob=dropout), **kw})


def token_weights() -> np.ndarray:
    w = np.ones((V,), np.float32)
    w[:SPECIAL] = 0.0
    return w


def random_batch(seed: int, batch: int = 16, length: int = 16) -> dict[str, np.ndarray]:
    """Random ids with right padding of varying length."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(SPECIAL, V, size=(batch, length)).astype(np.int32)
    lens = rs.randint(length // 2, length + 1, size=batch)
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask}


def packed_batch(seed: int, batch: int = 16, length: int = 16) -> dict[str, np.ndarray]:
    """Two or three sequences packed per row (segment_ids, restarting position_ids), padded."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(SPECIAL, V, size=(batch, length)).astype(np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for r in range(batch):
        cuts = sorted(rs.choice(np.arange(3, length - 2), size=rs.randint(1, 3), replace=False))
        end = rs.randint(length - 2, length + 1)
        bounds = [0, *cuts, end]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, a:b] = s + 1
            pos[r, a:b] = np.arange(b - a)
    mask = (seg > 0).astype(np.int32)
    return {"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask,
            "segment_ids": seg, "position_ids": pos}


def patterned_batch(seed: int, batch: int = 16, length: int = 16) -> dict[str, np.ndarray]:
    """Learnable text: each row repeats a period-4 pattern drawn from 8 tokens."""
    rs = np.random.RandomState(seed)
    alphabet = np.arange(SPECIAL, SPECIAL + 8)
    pattern = rs.choice(alphabet, size=(batch, 4))
    ids = np.tile(pattern, (1, length // 4)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@functools.lru_cache(maxsize=None)
def initial_params(model_cfg, seed: int):
    """Host copy of a model's random init (cached: every test starting from it skips the init compile)."""
    model = build_model(model_cfg)
    return jax.device_get(jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(seed)))


@dataclasses.dataclass
class Tiny:
    """A built step with its state and consts: ``tiny.step(batch)`` runs one update."""

    built: DistillStep
    state: Any
    teacher_params: Any
    consts: Any

    def step(self, host_batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.state, metrics = self.built.train_step(self.state, self.built.shard_batch(host_batch), self.consts)
        return metrics

    @property
    def mesh(self):
        return self.built.mesh


def build(cfg: StepConfig | None = None, s_cfg=None, t_cfg: Any = "default", mesh: shd.MeshConfig | None = None,
          devices=None, seed: int = 0, compiler_options=None, teacher_params: Any = None,
          student_params: Any = "init", extra_teachers: tuple = ()) -> Tiny:
    """A tiny distillation (or, ``t_cfg=None``, MLM-only) step through ``DistillStep``.

    cfg: the StepConfig (default: the triple loss, 10 updates, MASK_ID); s_cfg / t_cfg: model configs
    (defaults: ``student_cfg()`` / ``teacher_cfg()``); mesh: default one device; student_params:
    "init" (the cached random init of ``s_cfg`` with ``seed``), None (drawn by the builder) or a tree;
    teacher_params: default the cached init of ``t_cfg`` with ``seed + 1``; extra_teachers: model
    configs of ``cfg.teachers[1:]`` (params: the cached init with ``seed + 2 + i``).
    """
    from jaxdistil.training.optim import OptimConfig

    cfg = cfg or StepConfig(optim=OptimConfig(total_steps=10), mask_id=MASK_ID)
    s_cfg = s_cfg or student_cfg()
    t_cfg = teacher_cfg() if t_cfg == "default" else t_cfg
    if mesh is None:
        mesh, devices = shd.MeshConfig(data=1), devices or jax.devices()[:1]
    built = DistillStep(StepSpec(s_cfg, t_cfg, cfg, mesh, compiler_options=compiler_options,
                                 extra_teachers=tuple(extra_teachers)), devices=devices)
    params = initial_params(s_cfg, seed) if isinstance(student_params, str) else student_params
    state = built.init_state(jax.random.PRNGKey(seed), params)
    t_params = None
    if t_cfg is not None:
        t_params = built.place_teacher(initial_params(t_cfg, seed + 1) if teacher_params is None else teacher_params)
    extra = built.place_extra_teachers([initial_params(c, seed + 2 + i) for i, c in enumerate(extra_teachers)])
    return Tiny(built, state, t_params, built.consts(t_params, token_weights(), extra))
