"""Configuration machinery: typed, nested dataclasses read from YAML, with ``key=value`` overrides.

Every run kind has one config dataclass made of sections, each defined next to the code that uses
it: the distillation run (``jaxdistil.distill.config.RunConfig``), the fine-tuning run
(``jaxdistil.finetune.config.FinetuneConfig``). This module turns plain data into them:

  build_section(cls, data)    the dataclass from nested dicts; unknown keys and values of the wrong
                              type raise ``UserError`` naming the key; a section's own
                              ``__post_init__`` checks run as the section is built
  apply_overrides(data, ["optim.learning_rate=1e-3"])   dotted paths, values parsed as YAML
  read_yaml(path_or_name)     a YAML file, or a config shipped with the package, found by name
  dump_config(cfg, path)      the resolved config as YAML that loads back to an equal object

Shipped configs live in ``configs/`` of the source tree and in the installed package
(``jaxdistil/configs``, package data): ``--config distilbert-base-uncased`` and
``--config configs/distilbert-base-uncased.yaml`` name the same file wherever the command runs.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxdistil.errors import UserError


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


def shipped_configs() -> Path:
    """The directory of the configs shipped with the package (``configs/`` of the source tree)."""
    try:
        return Path(str(importlib.resources.files("jaxdistil.configs")))
    except ModuleNotFoundError:  # the source tree on sys.path, not installed
        return Path(__file__).resolve().parents[1] / "configs"


def shipped_config_names() -> list[str]:
    """Names of the shipped configs (``tiny``, ``finetune/glue``, ...)."""
    root = shipped_configs()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """The YAML file a ``--config`` argument names: a file that exists, else a shipped config by
    name (``tiny``, ``finetune/glue``) or by its path in the source tree (``configs/tiny.yaml``)."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    name = str(path)
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    name = name[:-len(".yaml")] if name.endswith(".yaml") else name
    shipped = shipped_configs() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise UserError(f"config file {path} does not exist; pass a YAML file or a shipped config by name "
                    f"({', '.join(shipped_config_names())})")


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping at ``path`` or of the shipped config it names ({} for an empty file);
    one-line UserError when unusable."""
    path = resolve_config(path)
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


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """A config dataclass as YAML text (written to ``path`` when given); loads back to an equal config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text
