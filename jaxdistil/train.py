"""``train(cfg)``: distil (or MLM-pretrain) a model from a run config, and resume it exactly.

A wiring of library parts, in the order one run meets them:

  join the job, lock the run dir      jaxdistil.distributed, jaxdistil.training.rundir
  teacher and student                 jaxdistil.students (teacher layers copied into the student)
  the step                            jaxdistil.distill.builder: the distillation objective on the
                                      step template, the mesh, the rules, the optimizer
  the state                           resume the run's own checkpoint > initialise from the teacher's
                                      layers / a given model > random init, every array born sharded
  the data                            jaxdistil.data.loader + .global_batches (after the state: a
                                      resumed run continues the saved iterator)
  the loop and its hooks              jaxdistil.training.loop: log (metrics.jsonl, TensorBoard,
                                      tokens/s, MFU), evaluate (held-out MLM scores,
                                      jaxdistil.distill.evaluation), checkpoint (TrainState + the
                                      loader's state, asynchronously)

Exact resume: the step key is ``fold_in(rng, step)``, the data iterator state is saved with the
params, and a resumed run drops the logged lines past its checkpoint, so an interrupted run (even
SIGKILLed) continued from its last checkpoint logs the same per-step losses, bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax

from jaxdistil import distributed, students
from jaxdistil.data import loader as loader_lib
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.data.global_batches import ShardedBatches, process_rows
from jaxdistil.distill import run_files
from jaxdistil.distill.builder import DistillStep, run_step_spec
from jaxdistil.distill.config import RunConfig
from jaxdistil.distill.evaluation import HeldOut, HeldOutEvaluator
from jaxdistil.distill.teacher_cache import CachedBatches, TeacherCache, check_terms, params_sha256, run_identity
from jaxdistil.errors import UserError
from jaxdistil.models import COMPUTE_DTYPES, attention
from jaxdistil.models.flops import forward_flops_per_token, train_flops_per_token
from jaxdistil.training import loop, rundir
from jaxdistil.training import sharding as shd
from jaxdistil.training.checkpoint import RunCheckpointer
from jaxdistil.training.hooks import Checkpoint, Evaluate, Log
from jaxdistil.training.metrics import MetricsWriter, TrainLog, measure_peak_flops
from jaxdistil.training.state import param_count


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


def run_batches(cfg: RunConfig, manifest: dict, built: DistillStep) -> ShardedBatches:
    """The run's training batches: one loader batch from each data shard; this process reads the
    shards whose rows its devices hold, all processes pad to one length
    (``jaxdistil.data.global_batches``). A teacher cache iterates the same batches."""
    special = manifest["tokenizer"]["special_ids"]
    return ShardedBatches(
        lambda i, n: loader_lib.make_loader(manifest, "train", cfg.loader, shard_index=i, shard_count=n),
        distributed.num_data_shards(cfg.distributed), cfg.loader.batch_size, shd.batch_sharding(built.mesh),
        {"input_ids": int(special["pad"])})


def local_rows(cfg: RunConfig, built: DistillStep) -> slice:
    """The rows of every global batch that this process supplies (and a teacher cache holds for it)."""
    global_rows = cfg.loader.batch_size * distributed.num_data_shards(cfg.distributed)
    return process_rows(shd.batch_sharding(built.mesh), global_rows)


def train(cfg: RunConfig, log=print, force_unlock: bool = False) -> TrainResult:
    """Runs (or resumes) the training described by ``cfg`` (see the module doc).

    The run directory is locked for the whole run (``jaxdistil.training.rundir``): a second process
    on it stops with a one-line error; ``force_unlock`` takes over a lock recorded by another host.
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
    impl = attention.resolve(cfg.train.attention, COMPUTE_DTYPES[cfg.train.dtype])  # recorded in config.yaml
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, attention=impl))
    with rundir.hold(run_dir, force_unlock):
        return _run(cfg, run_dir, manifest, log if distributed.is_main_process() else (lambda *a, **k: None))


def _run(cfg: RunConfig, run_dir: Path, manifest: dict, say) -> TrainResult:
    # ---- models and the step
    teacher = students.resolve_teacher(cfg, manifest)
    extra_teachers = students.resolve_extra_teachers(cfg, manifest)
    student_cfg, initial_params = students.resolve_student(cfg, teacher, manifest)
    check_student(cfg, student_cfg, manifest)
    run_files.check_run_dir(run_dir, cfg, student_cfg)
    data_shards = distributed.num_data_shards(cfg.distributed)
    total_steps = total_steps_for(cfg, manifest)
    mask_id = manifest_lib.mask_token_id(manifest, causal=student_cfg.causal)
    cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    spec = run_step_spec(cfg, student_cfg, teacher.config if teacher else None, mask_id, total_steps,
                         extra_teachers=[t.config for t in extra_teachers],
                         cached_layers=cache.outputs if cache else None)
    built = DistillStep(spec)
    shd.check_batch(cfg.loader.batch_size * data_shards, built.mesh, cfg.optim.grad_accum_steps)
    if cache is not None:  # checked before anything is written: a cache of another run is refused
        cache.check(run_identity(cfg, manifest, params_sha256(teacher.params), spec.step), total_steps,
                    local_rows(cfg, built))
        check_terms(spec.step, cache.top_k, student_cfg.vocab_size, cache.has_hidden, cache.outputs,
                    teacher.config.layers)

    # ---- state: resume own checkpoint > teacher layers / given model > random
    ckpt = RunCheckpointer(run_dir, cfg.checkpoint)
    restored = ckpt.restore(built.abstract_state) if ckpt.all_steps() else None
    if restored is not None:
        state = restored.state
        say(f"resumed {run_dir} from step {restored.step}")
    else:
        params, origin = initial_params() if initial_params else (None, "random init")
        state = built.init_state(jax.random.PRNGKey(cfg.train.seed), params)
        say(f"model: {run_files.shape_summary(student_cfg)}, from {origin}")
    start_step = restored.step if restored else 0
    teacher_params = built.place_teacher(teacher.params) if teacher is not None else None
    run_files.write_run_files(run_dir, cfg, student_cfg, manifest)
    say(f"{param_count(built.abstract_state.params) / 1e6:.2f}M student params; mesh {dict(built.mesh.shape)}; "
        f"{total_steps} steps of {cfg.loader.batch_size * data_shards} sequences; run dir {run_dir}")

    # ---- data (run_batches); with teacher.cache, each batch with its update's cached teacher outputs
    train_iter = run_batches(cfg, manifest, built)
    if restored is not None and restored.data_states is not None:
        train_iter.set_state(restored.data_states)
    if cache is not None:
        train_iter = CachedBatches(train_iter, cache, local_rows(cfg, built), start_step)
        say(f"teacher: read from the cache {cache.path} (top {cache.top_k} logits), not run")
    consts = built.consts(None if cfg.teacher.cache else teacher_params,
                          manifest_lib.token_weights(manifest, cfg.masking.mlm_smoothing),
                          built.place_extra_teachers([t.params for t in extra_teachers]))

    # ---- the loop: log -> evaluate -> checkpoint after every step; SIGTERM / Ctrl-C save and stop
    peak = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else measure_peak_flops(spec.step.compute_dtype)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, start_step if restored else None,
                           distributed.is_main_process())
    run_teacher = None if cache is not None else spec.teacher  # a cached teacher runs no forward (MFU)
    train_log = TrainLog(writer, total_steps, start_step,
                         lambda t: train_flops_per_token(student_cfg, run_teacher, t)
                         + sum(forward_flops_per_token(c, t) for c in spec.extra_teachers), peak * jax.device_count(),
                         cfg.logging.progress, combine=built.objective.combine, totals=built.objective.totals)
    hooks: list[Any] = [Log(train_log, cfg.train.log_every)]
    evaluator = None
    if "validation" in manifest["splits"] and cfg.train.eval_every >= 0:
        held_out = HeldOut(manifest, cfg.loader, data_shards, built, cfg.train.eval_batches)
        with_teacher = teacher is not None and teacher.has_mlm_head
        evaluator = HeldOutEvaluator(held_out, teacher_params if with_teacher else None, cfg.train.eval_mask_only)
        hooks.append(Evaluate(evaluator, cfg.train.eval_every, writer, lambda s, v: say(evaluator.report(s, v)),
                              at_start=cfg.train.eval_every > 0))
    hooks.append(Checkpoint(ckpt, cfg.checkpoint.every, train_iter.get_state, metric="student_loss",
                            save_on_eval=cfg.checkpoint.keep_best > 0))
    result = loop.run(lambda s, b: built.train_step(s, b, consts), state, train_iter, built.shard_batch,
                      start_step=start_step, total_steps=total_steps, hooks=hooks, resumed=restored is not None,
                      say=say, ran_out_hint=f" (loader.num_epochs={cfg.loader.num_epochs})")
    return TrainResult(run_dir, result.step, total_steps, result.interrupted, train_log.last,
                       evaluator.student if evaluator else {}, evaluator.teacher if evaluator else {},
                       student_cfg, result.state)
