"""Held-out masked-LM evaluation: loss, perplexity and accuracy of any model on prepared data.

The held-out split of a prepared data directory is masked as BERT's MLM metric is usually reported:
15% of the real tokens chosen uniformly (no frequency smoothing: training's ``max(count, 1) ** -0.7``
weights would pick almost only rare words), then 80/10/10 [MASK] / random / kept. Each batch uses a
fixed key, so every evaluation of every model sees the same masked positions and scores are
comparable across steps, runs and models.

  jaxdistil evaluate --model RUN_DIR|FLAX_DIR|HF_DIR|HUB_ID --data DATA_DIR

``evaluate_params`` is the loop; ``HeldOut`` scores a run's models during training on every
process's share of the same batches; ``HeldOutEvaluator`` is the training loop's evaluator
(``jaxdistil.training.hooks.Evaluator``) of a distillation run: the student's scores at every
evaluation, the teacher's once; ``evaluate_model`` scores a saved model (``jaxdistil evaluate``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxdistil.data import loader as loader_lib
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.data.global_batches import ShardedBatches
from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill.builder import DistillStep, StepSpec
from jaxdistil.distill.objective import StepConfig
from jaxdistil.errors import UserError
from jaxdistil.hf import load_model
from jaxdistil.training import sharding as shd

EVAL_SEED = 1234  # masks of held-out batch i: fold_in(PRNGKey(EVAL_SEED), i), the same for every model
EVAL_SMOOTHING = 0.0  # uniform choice of the masked positions among real, non-special tokens
SCORES = ("loss", "perplexity", "accuracy")  # the held-out figures of a training run's "eval" lines


def eval_masking() -> MaskingConfig:
    """The held-out masking: BERT's 15% with 80/10/10, whatever the run trains with."""
    return MaskingConfig(mlm_smoothing=EVAL_SMOOTHING)


def mask_only_masking() -> MaskingConfig:
    """15% of the real tokens, chosen uniformly, every one replaced by [MASK] (no kept or random
    tokens to copy): accuracy there measures what the model infers from the context."""
    return MaskingConfig(mlm_smoothing=EVAL_SMOOTHING, word_mask=1.0, word_keep=0.0, word_rand=0.0)


def most_frequent_token(manifest: dict) -> int:
    """The most frequent non-special token of the training split: the no-context baseline's guess."""
    counts = manifest_lib.token_counts(manifest).astype(np.int64).copy()
    counts[list(manifest["tokenizer"]["special_ids"].values())] = -1
    return int(np.argmax(counts))


def eval_token_weights(manifest: dict) -> np.ndarray:
    """Masking weights [V] of held-out evaluation: 1 for every token, 0 for the special ones."""
    return manifest_lib.token_weights(manifest, EVAL_SMOOTHING)


def eval_loader_config(batch_size: int, max_len: int, read_threads: int = 4) -> loader_lib.LoaderConfig:
    """Held-out batches: unpacked rows padded to ``max_len`` (one compiled shape), in file order, so
    the first N batches are a fair sample (length grouping would put the shortest, hardest to
    predict sequences first)."""
    return loader_lib.LoaderConfig(batch_size=batch_size, max_len=max_len, buckets=(max_len,), group_window=1,
                                   prefetch=0, read_threads=read_threads)


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sums over batches (mlm_sum, mlm_rows, mlm_correct, tokens) -> loss, perplexity, accuracy."""
    rows = float(sums["mlm_rows"])
    if rows <= 0:
        raise UserError("the held-out data has no maskable token; prepare a held-out split with text in it")
    loss = float(sums["mlm_sum"]) / rows
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": float(sums["mlm_correct"]) / rows,
        "masked_tokens": rows,
        "tokens": float(sums["tokens"]),
        **({"baseline_accuracy": float(sums["baseline_correct"]) / rows} if "baseline_correct" in sums else {}),
    }


def evaluate_params(
    eval_step: Callable[..., dict[str, jax.Array]],
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    token_weights: jax.Array,
    shard_batch: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
    max_batches: int = 0,
    seed: int = EVAL_SEED,
) -> dict[str, float]:
    """Runs ``eval_step`` (``DistillStep.eval_step``) over held-out batches.

    batches: host batches {input_ids, attention_mask[, segment_ids, position_ids]} [B, T];
    shard_batch: places one on the mesh; max_batches: 0 = all.
    Batch i is masked with ``fold_in(PRNGKey(seed), i)``. Returns ``metrics_from_sums``.
    """
    base = jax.random.PRNGKey(seed)
    totals: dict[str, Any] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        key = jax.device_put(jax.random.fold_in(base, i), token_weights.sharding)
        sums = eval_step(params, shard_batch(batch), token_weights, key)
        # Add on device (no sync per batch); fetch once at the end.
        totals = sums if not totals else {k: totals[k] + sums[k] for k in totals}
    if not totals:
        raise UserError("the held-out split gave no batch; prepare the data with --holdout > 0")
    return metrics_from_sums({k: float(v) for k, v in jax.device_get(totals).items()})


class HeldOut:
    """A run's held-out split, scored on every process's share of the same batches and masks.

    built: the run's DistillStep (its mesh and eval steps); max_batches: 0 = the whole split.
    """

    def __init__(self, manifest: dict, loader_cfg: loader_lib.LoaderConfig, data_shards: int, built: DistillStep,
                 max_batches: int = 0):
        self.manifest, self.built, self.data_shards, self.max_batches = manifest, built, data_shards, max_batches
        self.cfg = eval_loader_config(loader_cfg.batch_size, loader_cfg.max_len, loader_cfg.read_threads)
        self.weights = built.replicate(eval_token_weights(manifest))
        self.pad = {"input_ids": int(manifest["tokenizer"]["special_ids"]["pad"])}

    def score(self, params: Any, which: str = "student", mask_only: bool = False) -> dict[str, float]:
        """``metrics_from_sums`` of the "student" or "teacher" params: BERT's 80/10/10 masks, or
        with ``mask_only`` [MASK] everywhere (plus the most-frequent-token baseline's accuracy)."""
        batches = ShardedBatches(
            lambda i, n: loader_lib.eval_batches(self.manifest, self.cfg, shard_index=i, shard_count=n),
            self.data_shards, self.cfg.batch_size, shd.batch_sharding(self.built.mesh), self.pad)
        if mask_only:
            step = self.built.eval_step(which, mask_only_masking(), most_frequent_token(self.manifest))
        else:
            step = self.built.eval_step(which, eval_masking())
        return evaluate_params(step, params, batches, self.weights, self.built.shard_batch, self.max_batches)


class HeldOutEvaluator:
    """A distillation run's evaluator: ``evaluator(state) -> {"student_loss", "student_perplexity",
    "student_accuracy", ...}``, with the teacher's ``teacher_*`` scores at the first call (its
    params do not change). mask_only: also the [MASK]-only accuracy ("*_mask_accuracy") and its
    most-frequent-token baseline ("*_mask_baseline").
    """

    def __init__(self, held_out: HeldOut, teacher_params: Any = None, mask_only: bool = False):
        self.held_out, self.teacher_params, self.mask_only = held_out, teacher_params, mask_only
        self.teacher: dict[str, float] = {}
        self.student: dict[str, float] = {}
        self.names = SCORES + (("mask_accuracy", "mask_baseline") if mask_only else ())

    def score(self, params: Any, which: str) -> dict[str, float]:
        out = self.held_out.score(params, which)
        if self.mask_only:
            masked = self.held_out.score(params, which, mask_only=True)
            out.update(mask_accuracy=masked["accuracy"], mask_baseline=masked["baseline_accuracy"])
        return out

    def __call__(self, state: Any) -> dict[str, float]:
        values = {}
        if self.teacher_params is not None and not self.teacher:  # once per process run
            self.teacher = self.score(self.teacher_params, "teacher")
            values.update({f"teacher_{k}": self.teacher[k] for k in self.names})
        self.student = self.score(state.params, "student")
        values.update({f"student_{k}": self.student[k] for k in self.names})
        return values

    def report(self, step: int, values: dict[str, float]) -> str:
        """The console line of an evaluation."""
        e = self.student
        return (f"step {step}: held-out MLM loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}, accuracy "
                f"{e['accuracy']:.4f}" + (f" (teacher {self.teacher['accuracy']:.4f})" if self.teacher else ""))


def evaluate_model(
    model: str,
    data_dir: str,
    *,
    batch_size: int = 32,
    max_len: int | None = None,
    max_batches: int = 0,
    dtype: str = "float32",
    split: str = "validation",
    step: int | None = None,
    seed: int = EVAL_SEED,
    mask_only: bool = False,
) -> dict[str, Any]:
    """MLM loss / perplexity / accuracy of ``model`` on the held-out split of ``data_dir``
    (``mask_only``: every chosen position replaced by [MASK], with the most-frequent-token baseline).

    model: a jaxdistil run dir (latest or ``step`` checkpoint), a Flax model dir, a HF dir or hub id.
    The batch is spread over all devices (data parallel); ``batch_size`` is rounded up to a multiple
    of the device count. Returns the metrics plus "model", "params" and "step".
    """
    manifest = manifest_lib.load_manifest(data_dir)
    loaded = load_model(model, step=step)
    if not loaded.has_mlm_head:
        raise UserError(
            f"{model} has no trained MLM head (an encoder-only checkpoint); masked-LM "
            "evaluation needs a *ForMaskedLM model"
        )
    manifest_lib.check_model_vocab(manifest, loaded, what=f"the model {model}")
    causal = loaded.config.causal
    if causal and mask_only:
        raise UserError(f"{model} is a causal LM: --mask-only applies to masked LMs; evaluate it without it")
    lm = {"alpha_mlm": 0.0, "alpha_clm": 1.0} if causal else {}
    spec = StepSpec(student=loaded.config, teacher=None, step=StepConfig(
        loss=dataclasses.replace(StepConfig().loss, alpha_ce=0.0, alpha_cos=0.0, **lm),
        optim=dataclasses.replace(StepConfig().optim, total_steps=1),
        masking=mask_only_masking() if mask_only else eval_masking(),
        mask_id=manifest_lib.mask_token_id(manifest, causal), dtype=dtype, causal=causal))
    built = DistillStep(spec)
    n = shd.batch_divisor(built.mesh)
    batch_size = -(-batch_size // n) * n
    max_len = min(max_len or int(manifest["max_len"]), loaded.config.max_tokens)
    params = shd.shard_params(loaded.params, built.state_shardings.params)
    batches = loader_lib.eval_batches(manifest, eval_loader_config(batch_size, max_len), split=split)
    baseline = most_frequent_token(manifest) if mask_only else None
    out = evaluate_params(built.eval_step("student", baseline_id=baseline), params, batches,
                          built.replicate(eval_token_weights(manifest)), built.shard_batch, max_batches, seed)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(loaded.params))
    return {"model": str(model), "step": loaded.step, "params": n_params, **out}
