"""``finetune(cfg)``: fine-tune an encoder on a task, evaluate it, keep the best checkpoint; resumable.

One batch walks forward: task examples (jaxdistil.finetune.tasks, tokenized once by .data) -> this
process's rows of the global batch (jaxdistil.data.global_batches) -> the classifier step
(jaxdistil.finetune.step) -> metrics.jsonl / TensorBoard (jaxdistil.training.metrics) -> evaluation on the
validation split(s), GLUE's metrics (jaxdistil.finetune.metrics) -> checkpoint (jaxdistil.training.checkpoint,
ranked by the task score: ``checkpoint.keep_best`` keeps the best).

Run directory: RUN/config.yaml, RUN/model/config.json (the classifier, HF format with id2label),
RUN/tokenizer/, RUN/checkpoints/<step>/, RUN/metrics.jsonl, RUN/tb/, locked while the run uses it.
A run killed at any point and started again resumes from its last checkpoint with the same
per-step losses (the data order is saved with the params, dropout keys are fold_in(rng, step)).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax

from jaxdistil import distributed
from jaxdistil.config import dump_config
from jaxdistil.data.global_batches import ShardedBatches
from jaxdistil.errors import UserError
from jaxdistil.finetune.config import FinetuneConfig
from jaxdistil.finetune.data import ArrayBatches, classifier_tokenizer, encode
from jaxdistil.finetune.evaluation import TaskEvaluator
from jaxdistil.finetune.step import build_classifier_step
from jaxdistil.finetune.tasks import load_task
from jaxdistil.hf.files import copy_tokenizer_files
from jaxdistil.hf.load import LoadedModel, load_model_arg
from jaxdistil.hf.names import classifier_architecture, flax_shapes
from jaxdistil.models import COMPUTE_DTYPES, ConfigError, attention, config_from_hf_dict, save_config
from jaxdistil.models.classification import (
    ClassifierHead,
    build_classifier,
    check_classifier_config,
    fresh_head,
    token_types,
)
from jaxdistil.models.flops import forward_flops_per_token
from jaxdistil.training import loop, rundir
from jaxdistil.training import sharding as shd
from jaxdistil.training.checkpoint import RunCheckpointer
from jaxdistil.training.hooks import Checkpoint, Evaluate, Log
from jaxdistil.training.metrics import MetricsWriter, TrainLog, measure_peak_flops

SCORE = "eval_score"  # the checkpoints' ranking metric: the task score, higher is better


@dataclasses.dataclass
class FinetuneResult:
    """What ``finetune`` returns; scores in percent, metrics as fractions."""

    run_dir: Path
    task: str
    step: int
    total_steps: int
    interrupted: int | None
    last_eval: dict[str, float]  # the task's metrics at the end
    score: float  # the task score at the end
    best_step: int | None
    best_score: float
    majority: float  # accuracy of always predicting the training split's most frequent label
    head_origin: str
    state: Any = None


def _initial_params(loaded, head: ClassifierHead, seed: int) -> tuple[dict, str]:
    """Encoder from the loaded model; its own head when it fits the task, else a fresh one."""
    if loaded.head is not None and (loaded.head.num_labels, loaded.head.problem_type) == (head.num_labels,
                                                                                          head.problem_type):
        return loaded.classifier_params(), "the model's own classification head"
    model = build_classifier(loaded.config, head)
    params = {"embeddings": loaded.params["embeddings"], "encoder": loaded.params["encoder"],
              **jax.device_get(fresh_head(model, jax.random.PRNGKey(seed)))}
    return params, "a freshly initialised classification head (transformers' init)"


def finetune(cfg: FinetuneConfig, log=print, force_unlock: bool = False) -> FinetuneResult:
    """Runs (or resumes) the fine-tuning of ``cfg.model`` on ``cfg.task`` (see the module doc)."""
    distributed.initialize(cfg.distributed)
    if not cfg.model:
        raise UserError("no model given; pass --model DIR (a run, Flax, HF directory or hub id)")
    say = log if distributed.is_main_process() else (lambda *a, **k: None)
    task = load_task(cfg.task)
    loaded = with_model_config(load_model_arg(cfg.model), cfg.model_config)
    try:
        check_classifier_config(loaded.config)
    except ConfigError as err:
        raise UserError(f"{cfg.model}: {err}") from None
    if loaded.tokenizer_dir is None:
        raise UserError(f"{cfg.model} has no tokenizer files; fine-tuning tokenizes the task with the model's "
                        "tokenizer: copy tokenizer.json / vocab.txt next to its config.json")
    tokenizer = classifier_tokenizer(loaded.tokenizer_dir, loaded.config)
    max_len = min(cfg.train.max_len, loaded.config.max_tokens)
    types = token_types(loaded.config)
    train_arrays = encode(tokenizer, task.train, max_len, types)
    eval_arrays = {name: encode(tokenizer, ex, max_len, types) for name, ex in task.validation.items()}
    head = ClassifierHead(num_labels=task.num_labels, problem_type=task.problem_type, labels=task.label_names)
    run_dir = Path(cfg.run_dir).expanduser().absolute()
    impl = attention.resolve(cfg.train.attention, COMPUTE_DTYPES[cfg.train.dtype])  # recorded in config.yaml
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, attention=impl))
    with rundir.hold(run_dir, force_unlock):
        return _run(cfg, run_dir, task, loaded, head, train_arrays, eval_arrays, tokenizer, say)


def with_model_config(loaded: LoadedModel, fields: dict[str, Any]) -> LoadedModel:
    """``loaded`` with the ``model_config`` fields of its config.json changed; a field that the model
    does not have, or one that would change a tensor's shape, is a UserError."""
    if not fields:
        return loaded
    cfg = loaded.config
    known = {f.name: f for f in dataclasses.fields(cfg)}
    for key in fields:
        if key not in known:
            raise UserError(f"unknown config key 'model_config.{key}': not a {type(cfg).__name__} field "
                            f"(known: {', '.join(sorted(known))})")

    def changed(**update):
        try:
            return config_from_hf_dict({**dataclasses.asdict(cfg), "model_type": cfg.model_type, **update},
                                       "model_config")
        except ConfigError as err:
            raise UserError(str(err)) from None

    for key, value in fields.items():
        if flax_shapes(changed(**{key: value}), False) != flax_shapes(cfg, False):
            raise UserError(f"model_config.{key} changes the shape of the model's tensors, which fine-tuning "
                            "the loaded weights cannot do; remove it")
    return dataclasses.replace(loaded, config=changed(**fields))


def write_run_files(run_dir: Path, cfg: FinetuneConfig, loaded, head: ClassifierHead) -> None:
    """RUN/config.yaml, RUN/model/config.json (the classifier, HF format with id2label) and
    RUN/tokenizer/ (process 0 only)."""
    if not distributed.is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    save_config(loaded.config, run_dir / "model")
    model_json = run_dir / "model" / "config.json"
    data = json.loads(model_json.read_text())
    data.update(head.to_hf_dict(), architectures=[classifier_architecture(loaded.config)])
    model_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (run_dir / "tokenizer").mkdir(exist_ok=True)
    copy_tokenizer_files(loaded.tokenizer_dir, run_dir / "tokenizer")


def best_evaluation(run_dir: Path) -> tuple[int | None, float]:
    """(step, score) of the best "eval" line in RUN/metrics.jsonl ((None, -inf) when there is none)."""
    best: tuple[int | None, float] = (None, -math.inf)
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for record in (json.loads(x) for x in lines if x.strip()):
        if record["kind"] == "eval" and record["score"] > best[1]:
            best = (record["step"], record["score"])
    return best


def _run(cfg, run_dir, task, loaded, head, train_arrays, eval_arrays, tokenizer, say) -> FinetuneResult:
    data_shards = distributed.num_data_shards(cfg.distributed)
    batch = cfg.train.batch_size * data_shards
    per_epoch = -(-len(task.train) // batch)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    epochs = max(1, math.ceil(total / per_epoch)) + 1  # the iterator never runs dry before `total`
    optim = dataclasses.replace(cfg.optim, total_steps=total)
    step = build_classifier_step(loaded.config, head, optim, cfg.mesh, cfg.train.dtype, cfg.train.attention)
    shd.check_batch(batch, step.mesh, optim.grad_accum_steps)

    # ---- state: resume own checkpoint > the loaded model (+ a fresh head when its own does not fit)
    ckpt = RunCheckpointer(run_dir, cfg.checkpoint, metric=SCORE, higher_is_better=True)
    restored = ckpt.restore(step.abstract_state) if ckpt.all_steps() else None
    if restored is not None:
        state, origin = restored.state, "its checkpoint"
        say(f"resumed {run_dir} from step {restored.step}")
    else:
        params, origin = _initial_params(loaded, head, cfg.train.seed)
        state = step.init_state(jax.random.PRNGKey(cfg.train.seed), params)
        say(f"note: {cfg.model}: encoder loaded, {origin}")
    start = restored.step if restored else 0
    write_run_files(run_dir, cfg, loaded, head)
    say(f"task {task.name}: {len(task.train):,} training examples, "
        + ", ".join(f"{k} {len(v):,}" for k, v in task.validation.items())
        + f"; {head.num_labels} labels ({head.problem_type}); {total} steps of {batch}")

    # ---- data
    train_iter = ShardedBatches(
        lambda i, n: ArrayBatches(train_arrays, cfg.train.batch_size, i, n, seed=cfg.train.seed, epochs=epochs),
        data_shards, cfg.train.batch_size, shd.batch_sharding(step.mesh))
    if restored is not None and restored.data_states is not None:
        train_iter.set_state(restored.data_states)

    # ---- the loop: log -> evaluate (the task's metrics) -> checkpoint (ranked by the task score)
    peak = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else measure_peak_flops(step.model.dtype)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, start if restored else None,
                           distributed.is_main_process())
    train_log = TrainLog(writer, total, start,
                         lambda t: 3 * forward_flops_per_token(loaded.config, t, mlm_head=False),
                         peak * jax.device_count(), cfg.logging.progress, combine=step.objective.combine,
                         totals=step.objective.totals)
    evaluator = TaskEvaluator(step, task, eval_arrays, batch, data_shards)
    hooks = [Log(train_log, cfg.train.log_every),
             Evaluate(evaluator, cfg.train.eval_every, writer, lambda s, v: say(evaluator.report(s, v))),
             Checkpoint(ckpt, cfg.checkpoint.every, train_iter.get_state, metric="score", save_on_eval=True)]
    result = loop.run(step.train_step, state, train_iter, step.shard_batch, start_step=start, total_steps=total,
                      hooks=hooks, resumed=restored is not None, say=say)
    best = best_evaluation(run_dir) if distributed.is_main_process() else (None, -math.inf)
    if best[0] is None and result.evaluation:
        best = (result.step, result.evaluation["score"])
    last = result.evaluation
    return FinetuneResult(run_dir, task.name, result.step, total, result.interrupted, last,
                          last.get("score", math.nan), best[0], best[1], task.majority_baseline(), origin,
                          result.state)


def format_result(result: FinetuneResult) -> str:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items() if k != "score")
    line = f"{result.task}: score {result.score:.2f} ({metrics}) after {result.step} steps"
    if not math.isnan(result.majority):
        line += f"; majority-class baseline accuracy {result.majority:.4f}"
    if result.best_step is not None:
        line += f"; best {result.best_score:.2f} at step {result.best_step}"
    return line
