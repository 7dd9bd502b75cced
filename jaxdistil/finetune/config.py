"""The fine-tuning run config: typed sections + YAML (``configs/finetune/*.yaml``) + ``key=value``.

The defaults are transformers' ``run_glue`` recipe: AdamW (lr 2e-5, betas 0.9 / 0.999, eps 1e-8,
weight decay 0), gradient clipping at 1.0, linear decay to 0 (``warmup_prop`` 0), 3 epochs,
batch 32, max length 128, seed 42. Sections shared with distillation (optim, mesh, checkpoint,
logging, distributed) are the same dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jaxdistil.config import LoggingConfig, apply_overrides, build_section, read_yaml
from jaxdistil.distributed import DistributedConfig
from jaxdistil.errors import UserError
from jaxdistil.finetune.tasks import TaskConfig
from jaxdistil.models import COMPUTE_DTYPES, attention
from jaxdistil.training.checkpoint import CheckpointConfig
from jaxdistil.training.optim import OptimConfig
from jaxdistil.training.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class FinetuneTrainConfig:
    """The loop.

    epochs / steps: passes over the training split, or a number of updates (steps > 0 wins).
    batch_size: examples per update on this host; max_len: tokens per example (padded, truncated).
    seed: the head's init, dropout and the data order. eval_every: evaluate every N updates (and at
    the end); 0 = at the end only. log_every: metrics every N updates. dtype: compute dtype.
    attention: the attention implementation (jaxdistil.models.attention: auto, xla, cudnn, einsum).
    """

    epochs: float = 3.0
    steps: int = 0
    batch_size: int = 32
    max_len: int = 128
    seed: int = 42
    eval_every: int = 0
    log_every: int = 10
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise UserError("train.steps must be >= 0 and, when it is 0, train.epochs must be > 0")
        if self.batch_size < 1 or self.max_len < 4 or self.eval_every < 0 or self.log_every < 1:
            raise UserError("train.batch_size >= 1, train.max_len >= 4, train.eval_every >= 0 and "
                            "train.log_every >= 1 are required")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"train.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise UserError(f"train.attention must be one of {', '.join(attention.IMPLEMENTATIONS)}, "
                            f"got {self.attention!r}")


RUN_GLUE_OPTIM = OptimConfig(learning_rate=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                             max_grad_norm=1.0, warmup_prop=0.0)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; ``run_dir`` receives checkpoints, logs and the config.

    model: the model to fine-tune (a jaxdistil run dir, a Flax model dir, a HF dir or hub id of a
    BERT, DistilBERT, RoBERTa or GPT-2); a sequence classifier's own head is kept when it fits the
    task, else a fresh head is drawn.
    model_config: config.json fields of the model changed for this run, ones that shape no tensor
    (dropouts, GPT-2's ``pad_token_id``, which its classifier needs), e.g. {pad_token_id: 50256}.
    """

    run_dir: str = "runs/finetune"
    model: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train: FinetuneTrainConfig = dataclasses.field(default_factory=FinetuneTrainConfig)
    optim: OptimConfig = RUN_GLUE_OPTIM
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(
        default_factory=lambda: CheckpointConfig(every=0, keep=1, keep_best=1))
    logging: LoggingConfig = dataclasses.field(default_factory=lambda: LoggingConfig(tensorboard=True))
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


def finetune_config_from_dict(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> FinetuneConfig:
    return build_section(FinetuneConfig, apply_overrides(copy.deepcopy(dict(data)), overrides))


def load_finetune_config(path: str | Path | None, overrides: Iterable[str] = ()) -> FinetuneConfig:
    """A fine-tuning config YAML (None = the run_glue defaults) with ``key=value`` overrides."""
    return finetune_config_from_dict(read_yaml(path) if path is not None else {}, overrides)
