"""``train(cfg)``: distil (or MLM-pretrain) a model from a run config, and resume it exactly.

The loop follows one batch forward through the library, each hop one call into the next room:

  loader (jaxdistil.data.loader, .global_batches)   this process's rows of the global batch
  -> the step (jaxdistil.distill.builder)           masking, teacher, student, losses, AdamW update
  -> metrics (jaxdistil.metrics)                    losses, tokens/s, MFU -> metrics.jsonl, TensorBoard
  -> evaluation (jaxdistil.evaluation)              held-out MLM loss / perplexity / accuracy
  -> checkpoint (jaxdistil.checkpoint)              TrainState + the loader's state, asynchronously

Before the loop: join the job (jaxdistil.distributed), lock the run dir (jaxdistil.rundir), read
the data's manifest, resolve teacher and student (jaxdistil.students), build the step, then the
state: resume the run's own checkpoint > initialise from the teacher's layers / a given model >
random init, every array born sharded.

Exact resume: the step key is ``fold_in(rng, step)``, the data iterator state is saved with the
params, and a resumed run drops the logged lines past its checkpoint, so an interrupted run (even
SIGKILLed) continued from its last checkpoint logs the same per-step losses, bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistil import distributed, rundir, students
from jaxdistil.checkpoint import RunCheckpointer
from jaxdistil.config import RunConfig
from jaxdistil.data import loader as loader_lib
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.data.global_batches import ShardedBatches
from jaxdistil.distill import sharding as shd
from jaxdistil.distill.builder import DistillStep, run_step_spec
from jaxdistil.errors import UserError
from jaxdistil.evaluation import HeldOut
from jaxdistil.metrics import MetricsWriter, TrainLog, measure_peak_flops
from jaxdistil.models.flops import train_flops_per_token
from jaxdistil.stopping import StopSignal

SCORES = ("loss", "perplexity", "accuracy")  # held-out figures logged per evaluation


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns."""

    run_dir: Path
    step: int  # optimizer steps done (the last checkpoint's step)
    total_steps: int
    interrupted: int | None  # the signal that stopped the run, None when it finished
    last_train: dict[str, float]
    last_eval: dict[str, float]
    teacher_eval: dict[str, float]
    student_config: Any
    state: Any = None  # the final TrainState (params on the mesh)


def total_steps_for(cfg: RunConfig, manifest: dict) -> int:
    """train.steps, or enough updates for train.epochs passes over the training split."""
    if cfg.train.steps:
        return cfg.train.steps
    split = manifest["splits"]["train"]
    rows = cfg.loader.batch_size * distributed.num_data_shards(cfg.distributed)
    if cfg.loader.packed:  # estimate: rows of max_len tokens, packed nearly full
        per_epoch = split["tokens"] / (rows * cfg.loader.max_len)
    else:
        per_epoch = split["sequences"] / rows
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def check_student(cfg: RunConfig, student_cfg: Any, manifest: dict) -> None:
    """UserError when the student cannot read the data (vocabulary, sequence length)."""
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if student_cfg.vocab_size != vocab:
        raise UserError(f"the student's vocabulary ({student_cfg.vocab_size}) differs from the data's "
                        f"({vocab}); drop student.config.vocab_size")
    if cfg.loader.max_len > student_cfg.max_tokens:
        raise UserError(f"loader.max_len {cfg.loader.max_len} exceeds the student's "
                        f"{student_cfg.max_tokens} positions; lower loader.max_len")


def train(cfg: RunConfig, log=print, force_unlock: bool = False) -> TrainResult:
    """Runs (or resumes) the training described by ``cfg`` (see the module doc).

    The run directory is locked for the whole run (``jaxdistil.rundir``): a second process on it
    stops with a one-line error; ``force_unlock`` takes over a lock recorded by another host.
    """
    distributed.initialize(cfg.distributed)  # before any other JAX call
    if cfg.train.compile_cache:
        # Restarts (a resume after preemption, the demo's second run) load the compiled step instead
        # of compiling it again; the executable is the same, so resumed runs stay bit-exact.
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.train.compile_cache).expanduser()))
    run_dir = Path(cfg.run_dir).expanduser().absolute()
    if not cfg.data.dir:
        raise UserError("data.dir is not set; prepare data with `jaxdistil prepare` and pass data.dir=DIR")
    manifest = manifest_lib.load_manifest(cfg.data.dir)
    with rundir.hold(run_dir, force_unlock):
        return _run(cfg, run_dir, manifest, log if distributed.is_main_process() else (lambda *a, **k: None))


def _run(cfg: RunConfig, run_dir: Path, manifest: dict, say) -> TrainResult:
    # ---- models and the step
    teacher = students.resolve_teacher(cfg, manifest)
    student_cfg, initial_params = students.resolve_student(cfg, teacher, manifest)
    check_student(cfg, student_cfg, manifest)
    rundir.check_run_dir(run_dir, cfg, student_cfg)
    data_shards = distributed.num_data_shards(cfg.distributed)
    total_steps = total_steps_for(cfg, manifest)
    special = manifest["tokenizer"]["special_ids"]
    mask_id = manifest_lib.mask_token_id(manifest, causal=student_cfg.causal)
    spec = run_step_spec(cfg, student_cfg, teacher.config if teacher else None, mask_id, total_steps)
    built = DistillStep(spec)
    shd.check_batch(cfg.loader.batch_size * data_shards, built.mesh, cfg.optim.grad_accum_steps)

    # ---- state: resume own checkpoint > teacher layers / given model > random
    ckpt = RunCheckpointer(run_dir, cfg.checkpoint)
    restored = ckpt.restore(built.abstract_state) if ckpt.all_steps() else None
    if restored is not None:
        state = restored.state
        say(f"resumed {run_dir} from step {restored.step}")
    else:
        params, origin = initial_params() if initial_params else (None, "random init")
        state = built.init_state(jax.random.PRNGKey(cfg.train.seed), params)
        say(f"model: {rundir.shape_summary(student_cfg)}, from {origin}")
    start_step = restored.step if restored else 0
    teacher_params = built.place_teacher(teacher.params) if teacher is not None else None
    rundir.write_run_files(run_dir, cfg, student_cfg, manifest)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(built.abstract_state.params))
    say(f"{n_params / 1e6:.2f}M student params; mesh {dict(built.mesh.shape)}; {total_steps} steps of "
        f"{cfg.loader.batch_size * data_shards} sequences; run dir {run_dir}")

    # ---- data (after the state: a resumed run continues the saved iterator)
    # Global batch = one loader batch from each data shard; this process reads the shards whose
    # rows its devices hold, all processes pad to one length (jaxdistil.data.global_batches).
    train_iter = ShardedBatches(
        lambda i, n: loader_lib.make_loader(manifest, "train", cfg.loader, shard_index=i, shard_count=n),
        data_shards, cfg.loader.batch_size, shd.batch_sharding(built.mesh), {"input_ids": int(special["pad"])})
    if restored is not None and restored.data_states is not None:
        train_iter.set_state(restored.data_states)
    held_out = None
    if "validation" in manifest["splits"] and cfg.train.eval_every >= 0:
        held_out = HeldOut(manifest, cfg.loader, data_shards, built, cfg.train.eval_batches)
    token_weights = built.replicate(manifest_lib.token_weights(manifest, cfg.masking.mlm_smoothing))

    # ---- the loop: step -> log -> evaluate -> checkpoint; SIGTERM / Ctrl-C save and stop
    peak = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else measure_peak_flops(spec.step.compute_dtype)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, start_step if restored else None,
                           distributed.is_main_process())
    log = TrainLog(writer, total_steps, start_step, lambda t: train_flops_per_token(student_cfg, spec.teacher, t),
                   peak * jax.device_count(), cfg.logging.progress)
    evals: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}

    def score(params, which: str) -> dict[str, float]:
        out = held_out.score(params, which)
        if cfg.train.eval_mask_only:
            masked = held_out.score(params, which, mask_only=True)
            out.update(mask_accuracy=masked["accuracy"], mask_baseline=masked["baseline_accuracy"])
        return out

    scores = SCORES + (("mask_accuracy", "mask_baseline") if cfg.train.eval_mask_only else ())

    def evaluate(step: int) -> None:
        values = {}
        if teacher is not None and teacher.has_mlm_head and not evals["teacher"]:  # once per process run
            evals["teacher"] = score(teacher_params, "teacher")
            values.update({f"teacher_{k}": evals["teacher"][k] for k in scores})
        evals["student"] = score(state.params, "student")
        values.update({f"student_{k}": evals["student"][k] for k in scores})
        writer.write(step, "eval", values)
        e = evals["student"]
        say(f"step {step}: held-out MLM loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}, accuracy "
            f"{e['accuracy']:.4f}" + (f" (teacher {evals['teacher']['accuracy']:.4f})" if evals["teacher"] else ""))
        log.restart_clock()

    step, stop = start_step, StopSignal()
    try:
        with stop:
            if restored is None and held_out is not None and cfg.train.eval_every > 0:
                evaluate(0)  # where the student starts (e.g. right after copying teacher layers)
            while step < total_steps and not stop.check(step):
                try:
                    host_batch = next(train_iter)
                except StopIteration:
                    say(f"the training data ran out after {step} steps (loader.num_epochs={cfg.loader.num_epochs})")
                    break
                batch = built.shard_batch(host_batch)
                with jax.transfer_guard("disallow"):  # any implicit host<->device copy is a bug
                    state, metrics = built.train_step(state, teacher_params, batch, token_weights)
                step += 1
                if distributed.agreed_stop(step):  # multi-process: SIGTERM seen by any process
                    stop.signum = signal.SIGTERM
                log.add(metrics, host_batch)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    log.flush(step)
                evaluated = held_out is not None and (
                    step == total_steps or cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0)
                if evaluated:
                    log.flush(step)
                    evaluate(step)
                every = cfg.checkpoint.every
                if ((every and step % every == 0) or step == total_steps or stop.signum is not None
                        or (evaluated and cfg.checkpoint.keep_best)):
                    ckpt.save(state, train_iter.get_state(), metric=evals["student"]["loss"] if evaluated else None)
            log.flush(step)
            if stop.signum is not None:
                ckpt.save(state, train_iter.get_state())
                name = signal.Signals(stop.signum).name
                say(f"\n{name} received: saved a checkpoint at step {step}; run the same command to resume")
    finally:
        log.close()
        ckpt.close()
    return TrainResult(run_dir, step, total_steps, stop.signum, log.last, evals["student"], evals["teacher"],
                       student_cfg, state)
