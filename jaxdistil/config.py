"""Run configuration: one typed, nested dataclass read from YAML, with ``key=value`` overrides.

Each concept owns its section, defined next to the code that uses it:

  teacher, student, data, train, logging   here (what a run is made of)
  loader       jaxdistil.data.loader.LoaderConfig        batch size, max length, buckets, packing
  masking      jaxdistil.data.masking.MaskingConfig      MLM masking proportions and smoothing
  loss         jaxdistil.distill.losses.LossConfig       temperature and the alphas
  optim        jaxdistil.distill.optim.OptimConfig       AdamW, clipping, schedule, accumulation
  mesh         jaxdistil.distill.sharding.MeshConfig     data / fsdp / tensor sizes
  checkpoint   jaxdistil.checkpoint.CheckpointConfig     save interval, how many to keep
  distributed  jaxdistil.distributed.DistributedConfig   multi-process runs (``distributed: auto``)

``load_run_config("configs/tiny.yaml", ["train.steps=20", "optim.learning_rate=1e-3"])`` reads the
YAML, applies the overrides (dotted paths; values parsed as YAML), and builds the dataclasses.
Unknown keys and values of the wrong type raise ``UserError`` naming the key; a section's own
``__post_init__`` checks (e.g. masking fractions summing to 1) run as the section is built.
``dump_run_config`` writes the resolved config back as YAML that loads to the same object.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxdistil.checkpoint import CheckpointConfig
from jaxdistil.data.loader import LoaderConfig
from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill.losses import LossConfig
from jaxdistil.distill.optim import OptimConfig
from jaxdistil.distill.sharding import MeshConfig
from jaxdistil.distributed import DistributedConfig
from jaxdistil.errors import UserError
from jaxdistil.models import COMPUTE_DTYPES
from jaxdistil.models.configs import CONFIG_CLASSES


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher.

    model: a Hugging Face model dir, a Flax model dir, a jaxdistil run dir or a hub id;
      None = no teacher: the student is trained with the MLM loss alone (pre-training).
    """

    model: str | None = None


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
    vocab_transform: init=teacher copies the MLM head's transform dense (else random).
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
            kind = type(known[key].default)  # the HF fields are plain int / float / str / bool
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


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """What the run reports (only process 0 writes).

    progress: a tqdm progress bar on stderr.
    tensorboard: event files in RUN/tb (RUN/metrics.jsonl is always written).
    peak_tflops: the device's peak for MFU; 0 = measure a matmul at start-up.
    """

    progress: bool = True
    tensorboard: bool = True
    peak_tflops: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``run_dir`` receives checkpoints, logs and the resolved config."""

    run_dir: str = "runs/default"
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the field type ``tp``, or UserError naming ``key``."""

    def bad() -> UserError:
        return UserError(
            f"config key '{key}' should be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) == 1:
            return _coerce(value, rest[0], key)
        for option in rest:
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        raise bad()
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "mode" in {f.name for f in dataclasses.fields(tp)}:
            value = {"mode": value}  # `distributed: auto` is short for `distributed: {mode: auto}`
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise UserError(f"config key '{key}' is a section; give a mapping of its keys, got {value!r}")
        return build_section(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            # "0,2,4" for int tuples; a lone string is a one-item tuple (mesh rules contain commas).
            value = [value] if item is str else [v.strip() for v in value.split(",") if v.strip()]
            if item is int:
                try:
                    value = [int(v) for v in value]
                except ValueError:
                    raise bad() from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        raise bad()
    if tp is Any:
        return value
    raise UserError(f"config key '{key}' has an unsupported field type {_type_name(tp)}")


def build_section(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiates dataclass ``cls`` from ``data``; unknown keys / wrong types -> UserError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise UserError(
                f"unknown config key '{key}'; valid keys{' of ' + prefix if prefix else ''}: "
                f"{', '.join(sorted(fields))}"
            )
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except UserError as err:
        message = str(err)
        raise UserError(message if not prefix or prefix in message else f"{prefix}: {message}") from None
    except (TypeError, ValueError) as err:
        raise UserError(f"config section '{prefix or cls.__name__}': {err}") from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML-friendly data (tuples -> lists) of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# --------------------------------------------------------------------------- YAML and overrides


def parse_value(text: str) -> Any:
    """An override's value as YAML (``3`` int, ``true`` bool, ``null`` None, ``[1, 2]`` list)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Sets ``a.b.c=value`` items into the nested dict ``data`` (in place; returns it)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"override key {key!r} is malformed; use dotted names like optim.learning_rate")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or isinstance(child, str) and part == "distributed":
                child = {} if child is None else {"mode": child}
                node[part] = child
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise UserError(f"override {key!r}: '{where}' is not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return data


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping at ``path`` ({} for an empty file); one-line UserError when unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass e.g. --config configs/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(
            f"config file {path} is not valid YAML{line}: {getattr(err, 'problem', err)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def config_from_dict(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> RunConfig:
    """RunConfig from nested plain data plus ``key=value`` overrides."""
    data = apply_overrides(copy.deepcopy(dict(data)), overrides)
    return build_section(RunConfig, data)


def load_run_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Reads a run config YAML (``None`` = all defaults) and applies the overrides."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)


def dump_run_config(cfg: RunConfig, path: str | Path | None = None) -> str:
    """The config as YAML text (written to ``path`` when given); loads back to an equal config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text
