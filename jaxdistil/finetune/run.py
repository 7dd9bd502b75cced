"""``finetune(cfg)``: fine-tune an encoder on a task, evaluate it, keep the best checkpoint; resumable.

One batch walks forward: task examples (jaxdistil.finetune.tasks, tokenized once by .data) -> this
process's rows of the global batch (jaxdistil.data.global_batches) -> the classifier step
(jaxdistil.finetune.step) -> metrics.jsonl / TensorBoard (jaxdistil.metrics) -> evaluation on the
validation split(s), GLUE's metrics (jaxdistil.finetune.metrics) -> checkpoint (jaxdistil.checkpoint,
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
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
from transformers import AutoTokenizer

from jaxdistil import distributed, rundir, students
from jaxdistil.checkpoint import RunCheckpointer
from jaxdistil.config import dump_run_config
from jaxdistil.data.global_batches import ShardedBatches
from jaxdistil.distill import sharding as shd
from jaxdistil.errors import UserError
from jaxdistil.finetune.config import FinetuneConfig
from jaxdistil.finetune.data import ArrayBatches, encode
from jaxdistil.finetune.metrics import task_metrics, task_score
from jaxdistil.finetune.step import build_classifier_step
from jaxdistil.finetune.tasks import Task, load_task
from jaxdistil.hf.files import copy_tokenizer_files
from jaxdistil.metrics import MetricsWriter, TrainLog, measure_peak_flops
from jaxdistil.models import BertConfig, ConfigError, save_config
from jaxdistil.models.classification import ClassifierHead, build_classifier, family_of, fresh_head
from jaxdistil.models.flops import forward_flops_per_token
from jaxdistil.stopping import StopSignal

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


def predictions(step, params, arrays: dict[str, np.ndarray], rows: int, regression: bool,
                data_shards: int, mesh) -> np.ndarray:
    """The classifier's predictions (class ids, or values) for every example of ``arrays``."""
    n = len(arrays["weight"])
    per_shard = -(-n // data_shards)
    batches = ShardedBatches(
        lambda i, c: ArrayBatches(arrays, rows // data_shards, i, c, train=False,
                                  min_batches=-(-per_shard // (rows // data_shards))),
        data_shards, rows // data_shards, shd.batch_sharding(mesh))
    values, weights = [], []
    for host in batches:
        out = jax.device_get(step.eval_step(params, shd.shard_batch(host, mesh)))
        values.append(out["logits"][:, 0] if regression else out["logits"].argmax(-1))
        weights.append(out["weight"])
    # A global batch is one block of rows per data shard, and shard s holds examples s, s + S, ...:
    # regroup the rows by shard, drop the padding rows (weight 0), put the examples back in order.
    per_batch = rows // data_shards
    by_shard = [np.stack(x).reshape(-1, data_shards, per_batch).transpose(1, 0, 2).reshape(data_shards, -1)
                for x in (values, weights)]
    out = np.empty(n, by_shard[0].dtype)
    for s in range(data_shards):
        out[s::data_shards] = by_shard[0][s][by_shard[1][s] > 0]
    return out


def evaluate(step, params, task: Task, arrays: dict[str, dict], rows: int, data_shards: int, mesh) -> dict:
    """{metrics..., "score"} of the task on its validation split(s)."""
    preds = {name: predictions(step, params, a, rows, task.regression, data_shards, mesh) for name, a in arrays.items()}
    labels = {name: a["label"] for name, a in arrays.items()}
    values = task_metrics(task.metrics, preds, labels)
    return {**values, "score": task_score(values)}


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
    loaded = students.load_model_arg(cfg.model)
    try:
        family_of(loaded.config)
    except ConfigError as err:
        raise UserError(f"{cfg.model}: {err}") from None
    if loaded.tokenizer_dir is None:
        raise UserError(f"{cfg.model} has no tokenizer files; fine-tuning tokenizes the task with the model's "
                        "tokenizer: copy tokenizer.json / vocab.txt next to its config.json")
    tokenizer = AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
    max_len = min(cfg.train.max_len, loaded.config.max_tokens)
    types = isinstance(loaded.config, BertConfig)
    train_arrays = encode(tokenizer, task.train, max_len, types)
    eval_arrays = {name: encode(tokenizer, ex, max_len, types) for name, ex in task.validation.items()}
    head = ClassifierHead(num_labels=task.num_labels, problem_type=task.problem_type, labels=task.label_names)
    run_dir = Path(cfg.run_dir).expanduser().absolute()
    with rundir.hold(run_dir, force_unlock):
        return _run(cfg, run_dir, task, loaded, head, train_arrays, eval_arrays, tokenizer, say)


def _run(cfg, run_dir, task, loaded, head, train_arrays, eval_arrays, tokenizer, say) -> FinetuneResult:
    data_shards = distributed.num_data_shards(cfg.distributed)
    batch = cfg.train.batch_size * data_shards
    per_epoch = -(-len(task.train) // batch)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    epochs = max(1, math.ceil(total / per_epoch)) + 1  # the iterator never runs dry before `total`
    optim = dataclasses.replace(cfg.optim, total_steps=total)
    step = build_classifier_step(loaded.config, head, optim, cfg.mesh, cfg.train.dtype)
    shd.check_batch(batch, step.mesh)

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
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_run_config(cfg, run_dir / "config.yaml")
        save_config(loaded.config, run_dir / "model")
        model_json = run_dir / "model" / "config.json"
        data = json.loads(model_json.read_text())
        data.update(head.to_hf_dict(), architectures=[
            "BertForSequenceClassification" if isinstance(loaded.config, BertConfig)
            else "DistilBertForSequenceClassification"])
        model_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (run_dir / "tokenizer").mkdir(exist_ok=True)
        copy_tokenizer_files(loaded.tokenizer_dir, run_dir / "tokenizer")
    say(f"task {task.name}: {len(task.train):,} training examples, "
        + ", ".join(f"{k} {len(v):,}" for k, v in task.validation.items())
        + f"; {head.num_labels} labels ({head.problem_type}); {total} steps of {batch}")

    train_iter = ShardedBatches(
        lambda i, n: ArrayBatches(train_arrays, cfg.train.batch_size, i, n, seed=cfg.train.seed, epochs=epochs),
        data_shards, cfg.train.batch_size, shd.batch_sharding(step.mesh))
    if restored is not None and restored.data_states is not None:
        train_iter.set_state(restored.data_states)
    peak = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else measure_peak_flops(
        step.model.dtype)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, start if restored else None,
                           distributed.is_main_process())
    log = TrainLog(writer, total, start, lambda t: 3 * forward_flops_per_token(loaded.config, t, mlm_head=False),
                   peak * jax.device_count(), cfg.logging.progress)
    last: dict[str, float] = {}
    best = (None, -math.inf)

    def run_eval(at: int) -> None:
        nonlocal last, best
        last = evaluate(step, state.params, task, eval_arrays, batch, data_shards, step.mesh)
        writer.write(at, "eval", last)
        if last["score"] > best[1]:
            best = (at, last["score"])
        say(f"step {at}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
        log.restart_clock()

    current, stop = start, StopSignal()
    try:
        with stop:
            while current < total and not stop.check(current):
                host = next(train_iter)
                with jax.transfer_guard("disallow"):
                    state, metrics = step.train_step(state, step.shard_batch(host))
                current += 1
                if distributed.agreed_stop(current):
                    stop.signum = signal.SIGTERM
                log.add(metrics, host)
                if current % cfg.train.log_every == 0 or current == total:
                    log.flush(current)
                evaluated = current == total or (cfg.train.eval_every and current % cfg.train.eval_every == 0)
                if evaluated:
                    log.flush(current)
                    run_eval(current)
                every = cfg.checkpoint.every
                if (every and current % every == 0) or current == total or stop.signum is not None or evaluated:
                    ckpt.save(state, train_iter.get_state(), metric=last["score"] if evaluated else None)
            log.flush(current)
            if stop.signum is not None:
                ckpt.save(state, train_iter.get_state())
                say(f"\n{signal.Signals(stop.signum).name} received: saved a checkpoint at step {current}; "
                    "run the same command to resume")
    finally:
        log.close()
        ckpt.close()
    if restored is not None:  # earlier evaluations of this run are in its metrics
        for record in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()):
            if record["kind"] == "eval" and record["score"] > best[1]:
                best = (record["step"], record["score"])
    return FinetuneResult(run_dir, task.name, current, total, stop.signum, last, last.get("score", math.nan),
                          best[0], best[1], task.majority_baseline(), origin, state)


def format_result(result: FinetuneResult) -> str:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items() if k != "score")
    line = f"{result.task}: score {result.score:.2f} ({metrics}) after {result.step} steps"
    if not math.isnan(result.majority):
        line += f"; majority-class baseline accuracy {result.majority:.4f}"
    if result.best_step is not None:
        line += f"; best {result.best_score:.2f} at step {result.best_step}"
    return line
