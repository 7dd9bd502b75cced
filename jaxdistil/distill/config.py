"""The distillation run config: ``RunConfig``, one typed section per concept.

  teacher, student, data, train   here (what a distillation run is made of)
  teachers     TeacherConfig (a list)                      more teachers, read by the terms that name them
  loader       jaxdistil.data.loader.LoaderConfig          batch size, max length, buckets, packing
  masking      jaxdistil.data.masking.MaskingConfig        MLM masking proportions and smoothing
  loss         jaxdistil.distill.losses.LossConfig         temperature and the alphas
  terms        jaxdistil.distill.terms.TermConfig (a list)  hidden-state, attention and relation terms
  optim        jaxdistil.training.optim.OptimConfig        AdamW, clipping, schedule, accumulation
  mesh         jaxdistil.training.sharding.MeshConfig      data / fsdp / tensor sizes
  checkpoint   jaxdistil.training.checkpoint.CheckpointConfig   save interval, how many to keep
  logging      jaxdistil.config.LoggingConfig              progress bar, TensorBoard, MFU peak
  distributed  jaxdistil.distributed.DistributedConfig     multi-process runs (``distributed: auto``)

``load_run_config("tiny", ["train.steps=20", "optim.learning_rate=1e-3"])`` reads the YAML (a path or
a shipped config's name, ``jaxdistil.config.read_yaml``), applies the overrides and builds the
dataclasses; unknown keys and wrong types raise ``UserError`` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jaxdistil.config import LoggingConfig, apply_overrides, build_section, dump_config, read_yaml
from jaxdistil.data.loader import LoaderConfig
from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill.losses import LossConfig
from jaxdistil.distill.terms import TermConfig
from jaxdistil.distributed import DistributedConfig
from jaxdistil.errors import UserError
from jaxdistil.models import COMPUTE_DTYPES, attention
from jaxdistil.models.configs import CONFIG_CLASSES, field_type
from jaxdistil.training.checkpoint import CheckpointConfig
from jaxdistil.training.optim import OptimConfig
from jaxdistil.training.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A frozen teacher (the ``teacher`` section, or an entry of the ``teachers:`` list).

    model: a Hugging Face model dir, a Flax model dir, a jaxdistil run dir or a hub id;
      None = no teacher: the student is trained with the MLM loss alone (pre-training).
    name: how terms name it (``terms: [{kind: ..., teacher: NAME}]``); the section's is "teacher".
    weight: its share in a soft-target mixture (a term naming several teachers mixes their
      probabilities with these weights, normalised over the teachers it names).
    cache: a teacher cache of this run (``jaxdistil cache-teacher``, docs/teacher-cache.md): the
      teacher's outputs are read from it, not computed (the section's teacher only; the model is
      still loaded, for the student's init and to check that the cache is of it).
    """

    model: str | None = None
    name: str = "teacher"
    weight: float = 1.0
    cache: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"teacher name {self.name!r} must be letters, digits, '-' or '_'")
        if not (self.weight > 0 and self.weight < float("inf")):
            raise UserError(f"teacher {self.name}: weight must be a number > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The model being trained.

    init: "teacher" (copy ``layers`` of the teacher, see jaxdistil.init_student), "random", or a
      path / hub id of a model to start from (Flax model dir, HF dir, run dir).
    layers: teacher layers the student keeps (init=teacher).
    model_type: "distilbert", "bert", "roberta" or "gpt2" (init=random; a teacher-initialised
      student has the teacher's architecture, DistilBERT for a BERT teacher).
    config: Hugging Face config.json fields. init=random: the student's shape (vocab_size and
      pad_token_id default to the data's tokenizer, other missing fields to transformers'
      defaults); init=teacher: non-shape fields such as dropout.
    vocab_transform: init=teacher copies the MLM head's transform: its dense layer and LayerNorm
      (the reference's --vocab_transform; false: both freshly initialised, as the reference).
    fold_token_types: init=teacher folds the teacher's token_type_embeddings[0] into the position
      embeddings (exact on token-type-0 input) instead of dropping them as the reference does.
    freeze_pos_embs: the position table gets no update and no optimizer state (the reference's
      --freeze_pos_embs; a DistilBERT config with sinusoidal_pos_embds freezes it too).
    freeze_token_type_embds: the same for the token-type table (students that have one: BERT).
    """

    init: str = "teacher"
    layers: tuple[int, ...] = (0, 2, 4, 7, 9, 11)
    model_type: str = "distilbert"
    config: dict = dataclasses.field(default_factory=dict)
    vocab_transform: bool = True
    fold_token_types: bool = True
    freeze_pos_embs: bool = False
    freeze_token_type_embds: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in CONFIG_CLASSES:
            raise UserError(f"student.model_type must be one of {', '.join(CONFIG_CLASSES)}, got {self.model_type!r}")
        cls = CONFIG_CLASSES[self.model_type]
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in self.config.items():
            if key not in known:
                raise UserError(
                    f"unknown config key 'student.config.{key}': not a {cls.__name__} field "
                    f"(known: {', '.join(sorted(known))})"
                )
            kind = field_type(known[key])  # the HF fields are plain int / float / str / bool
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise UserError(f"config key 'student.config.{key}' should be {kind.__name__}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Tokenised data written by ``jaxdistil prepare``.

    dir: the prepared data directory (its manifest, shards, token counts and tokenizer).
    """

    dir: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop.

    steps: optimizer updates; 0 = derive from ``epochs`` and the data size.
    epochs: passes over the training data when steps = 0.
    seed: seeds init, masking and dropout (the data order has its own ``loader.seed``).
    eval_every: held-out evaluation at step 0 (fresh runs), every N steps and at the end; 0 = at the
      end only; -1 = never. The teacher is evaluated once, at the first evaluation.
    eval_batches: held-out batches per evaluation; 0 = the whole held-out split.
    log_every: metrics (loss, lr, grad norm, tokens/s...) every N steps.
    dtype: compute dtype of both models (float32, bfloat16); params and optimizer state stay float32.
    attention: the attention implementation (jaxdistil.models.attention): auto (cuDNN's fused
      attention on a GPU in bf16, XLA's elsewhere), xla, cudnn or einsum; the run's config.yaml
      records what auto resolved to.
    remat: recompute each layer's activations in the backward pass (less memory, ~30% more compute).
    compile_cache: directory of JAX's persistent compilation cache (a restarted run loads its compiled
      step instead of compiling again); null = off.
    eval_mask_only: also score the held-out split with every chosen position replaced by [MASK]
      ("mask_accuracy") and the most-frequent-token baseline there ("mask_baseline").
    """

    steps: int = 0
    epochs: float = 3.0
    seed: int = 56
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 10
    dtype: str = "float32"
    attention: str = "auto"
    remat: bool = False
    compile_cache: str | None = None
    eval_mask_only: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0 or self.epochs <= 0 and self.steps == 0:
            raise UserError("train.steps must be >= 0 and, when it is 0, train.epochs must be > 0")
        if self.eval_every < -1 or self.eval_batches < 0 or self.log_every < 1:
            raise UserError("train.eval_every must be >= -1, train.eval_batches >= 0, train.log_every >= 1")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"train.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise UserError(f"train.attention must be one of {', '.join(attention.IMPLEMENTATIONS)}, "
                            f"got {self.attention!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``run_dir`` receives checkpoints, logs and the resolved config."""

    run_dir: str = "runs/default"
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    teachers: tuple[TeacherConfig, ...] = ()
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    terms: tuple[TermConfig, ...] = ()
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        names = [t.name for t in (self.teacher, *self.teachers)]
        if self.teachers and self.teacher.model is None:
            raise UserError("teachers: lists more teachers but teacher.model is not set; the teacher section is "
                            "the first teacher (the one the student is copied from): set teacher.model")
        for i, extra in enumerate(self.teachers):
            if extra.model is None:
                raise UserError(f"teachers[{i}] ({extra.name}) has no model; set its model: to a model dir or hub id")
            if extra.cache:
                raise UserError(f"teachers[{i}] ({extra.name}) has a cache; a teacher cache serves the teacher "
                                "section only: drop its cache")
        if self.teacher.cache and self.teacher.model is None:
            raise UserError("teacher.cache is set but teacher.model is not; set teacher.model to the teacher the "
                            "cache was made from (it initialises the student and proves the cache is of it)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"teacher name {dupes[0]!r} is used twice; give every teacher its own name")
        for i, term in enumerate(self.terms):
            unknown = [n for n in term.teacher if n not in names] if term.uses_teacher else []
            if unknown:
                raise UserError(f"terms[{i}] ({term.kind}) names teacher {unknown[0]!r}; the run's teachers are "
                                f"{', '.join(names)} (teacher.name and the names in teachers:)")
        if self.loss.normalize == "group" and self.loader.packed:
            # A group is loader.group_rows ROWS; packed, a row holds several sequences, so a group is no
            # longer the reference's micro-batch of group_rows sequences and its means are not the reference's.
            raise UserError("loss.normalize=group with loader.packed=true: a group of loader.group_rows packed rows "
                            "holds more sequences than the reference's micro-batch, so its means are not the "
                            "reference's; set loader.packed=false (or loss.normalize=batch to keep packing)")


def config_from_dict(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> RunConfig:
    """RunConfig from nested plain data plus ``key=value`` overrides."""
    data = apply_overrides(copy.deepcopy(dict(data)), overrides)
    return build_section(RunConfig, data)


def load_run_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Reads a run config (a YAML path or a shipped config's name; ``None`` = all defaults) and
    applies the overrides."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)


def dump_run_config(cfg: RunConfig, path: str | Path | None = None) -> str:
    """The config as YAML text (written to ``path`` when given); loads back to an equal config."""
    return dump_config(cfg, path)
