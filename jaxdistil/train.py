"""``jaxdistil train --config configs/NAME.yaml [key=value ...]``: distil (or MLM-pretrain) a model.

``train(cfg)`` reads top to bottom in phases, each one call into a library module:

  1. processes and run dir   jax.distributed (multi-host), RUN/ checks, resolved config saved
  2. data                    manifest, masking weights, the grain loader (jaxdistil.data)
  3. models                  teacher (jaxdistil.hf.load_model) and the student's config
  4. mesh and optimizer      (data, fsdp, tensor) mesh + rules, AdamW + schedule (jaxdistil.distill)
  5. state                   resume own checkpoint > init from the teacher's layers / a given model
                             > random init; every array born sharded on the mesh
  6. step functions          the jitted train step and eval steps (jaxdistil.distill.step)
  7. loop                    step -> log -> evaluate -> checkpoint; SIGTERM / Ctrl-C save and stop

Run directory: RUN/config.yaml (resolved config), RUN/student/config.json, RUN/tokenizer/,
RUN/checkpoints/<step>/, RUN/metrics.jsonl (every logged metric, one JSON object per line),
RUN/tb/ (TensorBoard). Only process 0 writes files; every process takes part in checkpoints.

Exact resume: the step key is ``fold_in(rng, step)``, the data iterator state is saved with the
params, and a resumed run drops the logged lines past its checkpoint, so an interrupted run (even
SIGKILLed) continued from its last checkpoint logs the same per-step losses, bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistil import distributed
from jaxdistil.config import RunConfig, dump_run_config, load_run_config, to_dict
from jaxdistil.errors import UserError

# Metrics of the train step that are averaged over a logging interval (the rest: last value).
MEAN_KEYS = ("loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse", "mlm_accuracy", "grad_norm")


# --------------------------------------------------------------------------- phase 1: processes, run dir


def _shape_summary(model_cfg) -> str:
    return (
        f"{type(model_cfg).__name__} {model_cfg.layers} layers x {model_cfg.hidden} hidden, "
        f"{model_cfg.heads} heads, FFN {model_cfg.mlp}, vocab {model_cfg.vocab_size}, "
        f"{model_cfg.max_position_embeddings} positions"
    )


def check_run_dir(run_dir: Path, cfg: RunConfig, student_cfg) -> None:
    """UserError when RUN was made for a student of another shape; warns about other changes."""
    from jaxdistil.models import load_config

    saved = run_dir / "student" / "config.json"
    if saved.is_file():
        old = load_config(saved)

        def shape(c):
            return (type(c).__name__, c.layers, c.hidden, c.heads, c.mlp, c.vocab_size,
                    c.max_position_embeddings, c.token_types, c.sinusoidal)

        if shape(old) != shape(student_cfg):
            raise UserError(
                f"run dir {run_dir} was made by another config (its student: {_shape_summary(old)}; this "
                f"config's: {_shape_summary(student_cfg)}); use a new run_dir or the config that made it"
            )
    old_yaml = run_dir / "config.yaml"
    if old_yaml.is_file() and jax.process_index() == 0:
        import yaml

        before = _flatten(yaml.safe_load(old_yaml.read_text()) or {})
        after = _flatten(to_dict(cfg))
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            print(
                f"note: resuming {run_dir} with changed settings: {', '.join(changed[:8])}"
                + (" ..." if len(changed) > 8 else ""),
                file=sys.stderr,
            )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


# --------------------------------------------------------------------------- phase 3: models


def load_teacher(cfg: RunConfig, manifest: dict):
    """The teacher (``LoadedModel``) or None for MLM-only runs; checked against the data's vocab."""
    if cfg.teacher.model is None:
        return None
    from jaxdistil.data import manifest as manifest_lib
    from jaxdistil.data.tokenization import tokenizer_hash_of_dir
    from jaxdistil.hf import load_model
    from jaxdistil.init_student import load_teacher as _load

    teacher = _load(cfg.teacher.model, load_model)
    tok_hash = tokenizer_hash_of_dir(teacher.tokenizer_dir) if teacher.tokenizer_dir else None
    manifest_lib.check_vocab(
        manifest, teacher.config.vocab_size, tok_hash, what=f"the teacher {cfg.teacher.model}"
    )
    if not teacher.has_mlm_head and cfg.loss.alpha_ce > 0:
        print(
            f"warning: the teacher {cfg.teacher.model} has no MLM head (encoder-only checkpoint); its "
            "logits are meaningless, so L_ce teaches noise: set loss.alpha_ce=0",
            file=sys.stderr,
        )
    return teacher


def student_config(cfg: RunConfig, teacher, manifest: dict):
    """The student's model config, and a function giving its initial params (None = random).

    student.init: "teacher" -> teacher layers ``student.layers``; "random" -> ``student.config``
    shape (vocab and pad id default to the data's tokenizer); anything else -> a model path / hub id.
    """
    from jaxdistil.models import config_from_hf_dict
    from jaxdistil.models.configs import ConfigError

    s = cfg.student
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if s.init == "teacher":
        if teacher is None:
            raise UserError(
                "student.init=teacher needs a teacher (teacher.model); set student.init=random for "
                "MLM-only training"
            )
        from jaxdistil.init_student import check_layers, student_config_from_teacher, student_from_teacher

        # The config now (cheap); the params only when there is no checkpoint to resume from.
        layers = check_layers(s.layers, teacher.config.layers)
        model_cfg = student_config_from_teacher(teacher.config, len(layers), s.config)

        def make_params():
            _, params, notes = student_from_teacher(
                teacher.config,
                teacher.params
                if teacher.has_mlm_head
                else {k: v for k, v in teacher.params.items() if k != "mlm_head"},
                layers,
                vocab_transform=s.vocab_transform,
                fold_token_types=s.fold_token_types,
                seed=cfg.train.seed,
                overrides=s.config,
            )
            return params, f"teacher layers {list(layers)}" + "".join(f"; {n}" for n in notes)

        return model_cfg, make_params
    if s.init == "random":
        fields = {
            "vocab_size": vocab,
            "pad_token_id": int(manifest["tokenizer"]["special_ids"]["pad"]),
            **s.config,
        }
        try:
            model_cfg = config_from_hf_dict({"model_type": s.model_type, **fields}, "student.config")
        except ConfigError as err:
            raise UserError(str(err)) from None
        return model_cfg, None
    from jaxdistil.hf import load_model
    from jaxdistil.init_student import load_teacher as _load

    loaded = _load(s.init, load_model)

    def from_model():
        return loaded.params, f"the model {s.init}"

    return loaded.config, from_model


# --------------------------------------------------------------------------- phase 5: state


def abstract_train_state(model, optimizer, mesh, rules, seed: int):
    """(abstract TrainState with shardings, TrainState of NamedShardings), nothing allocated.

    The same boxed init as ``step.init_train_state`` under ``jax.eval_shape``: the shardings come
    from the logical axis names, the abstract arrays carry them (restore targets).
    """
    import flax.linen as nn

    from jaxdistil.distill import sharding as shd
    from jaxdistil.distill.step import TrainState

    ids = jnp.zeros((1, 8), jnp.int32)

    def boxed_state(rng):
        init_key, state_key = jax.random.split(rng)
        boxed = model.init(init_key, ids)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=boxed, opt_state=optimizer.init(boxed), rng=state_key
        )

    boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(seed))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


# --------------------------------------------------------------------------- measurements


def model_flops_per_token(model_cfg, length: int, train: bool) -> float:
    """Matmul FLOPs per token of one forward (x3 with the backward pass when ``train``).

    Per layer: Q/K/V/out projections 4*D^2, FFN 2*D*F, attention scores and mixing 2*T*D; plus the
    MLM head (transform D^2, vocabulary projection D*V) on every row; 2 FLOPs per multiply-add.
    """
    d, f, v = model_cfg.hidden, model_cfg.mlp, model_cfg.vocab_size
    per_layer = 4 * d * d + 2 * d * f + 2 * length * d
    forward = 2.0 * (model_cfg.layers * per_layer + d * d + d * v)
    return forward * (3.0 if train else 1.0)


def measure_peak_flops(dtype) -> float:
    """Matmul FLOP/s of one device in ``dtype`` (best of a few runs; the MFU denominator)."""
    device = jax.local_devices()[0]
    n = 1024 if device.platform == "cpu" else 8192
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def memory_gb() -> tuple[float, str]:
    """Peak memory: the accelerator's peak bytes in use, or the host process's peak RSS on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "host"


class MetricsWriter:
    """RUN/metrics.jsonl (+ TensorBoard); process 0 only. ``resume_step`` drops later lines."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Lines past the checkpoint belong to steps that are about to be redone.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(
                str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update(
            {
                k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                for k, v in values.items()
            }
        )
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f"{kind}/{k}", float(v), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class StopSignal:
    """SIGTERM / SIGINT set a flag that the loop checks after each step (save, then stop).

    A second Ctrl-C stops immediately (KeyboardInterrupt) in case saving hangs. Multi-process runs
    keep JAX's own SIGTERM notifier instead and stop where all processes agree
    (``jaxdistil.distributed.agreed_stop``), so that every process joins the same final save.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def check(self, step: int) -> bool:
        """True when the loop must stop after ``step`` (the loop sets ``signum`` from
        ``distributed.agreed_stop`` in multi-process runs)."""
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if jax.process_count() > 1:
                # SIGTERM belongs to jax.distributed's notifier: every process stops at one agreed step
                # (distributed.agreed_stop); Ctrl-C is passed on to it as a SIGTERM.
                self._old[signal.SIGINT] = signal.signal(
                    signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM)
                )
                return self
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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


# --------------------------------------------------------------------------- train


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


def train(cfg: RunConfig, log=print, force_unlock: bool = False) -> TrainResult:
    """Runs (or resumes) the training described by ``cfg``; see the module doc for the phases.

    The run directory is locked for the whole run (``jaxdistil.rundir``): a second process on it
    stops with a one-line error; ``force_unlock`` takes over a lock recorded by another host.
    """
    # ---- 1. processes and run dir
    distributed.initialize(cfg.distributed)  # before any other JAX call
    from jaxdistil import rundir

    with rundir.hold(Path(cfg.run_dir).expanduser().absolute(), force_unlock):
        return _train(cfg, log)


def _train(cfg: RunConfig, log=print) -> TrainResult:
    if cfg.train.compile_cache:
        # Restarts (a resume after preemption, the demo's second run) load the compiled step instead
        # of compiling it again; the executable is the same, so resumed runs stay bit-exact.
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.train.compile_cache).expanduser()))
    from jaxdistil import checkpoint as ckpt_lib
    from jaxdistil.data import loader as loader_lib
    from jaxdistil.data import manifest as manifest_lib
    from jaxdistil.distill import optim as optim_lib
    from jaxdistil.distill import sharding as shd
    from jaxdistil.distill import step as step_lib
    from jaxdistil.evaluate import eval_masking, eval_token_weights, evaluate_params
    from jaxdistil.hf.files import copy_tokenizer_files
    from jaxdistil.models import save_config

    writer = jax.process_index() == 0
    say = log if writer else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir).expanduser().absolute()

    # ---- 2. data
    if not cfg.data.dir:
        raise UserError("data.dir is not set; prepare data with `jaxdistil prepare` and pass data.dir=DIR")
    manifest = manifest_lib.load_manifest(cfg.data.dir)
    special = manifest["tokenizer"]["special_ids"]
    token_weights_np = manifest_lib.token_weights(manifest, cfg.masking.mlm_smoothing)

    # ---- 3. models
    teacher = load_teacher(cfg, manifest)
    student_cfg, initial_params = student_config(cfg, teacher, manifest)
    if student_cfg.vocab_size != int(manifest["tokenizer"]["vocab_size"]):
        raise UserError(
            f"the student's vocabulary ({student_cfg.vocab_size}) differs from the data's "
            f"({manifest['tokenizer']['vocab_size']}); drop student.config.vocab_size"
        )
    if cfg.loader.max_len > student_cfg.max_position_embeddings:
        raise UserError(
            f"loader.max_len {cfg.loader.max_len} exceeds the student's "
            f"{student_cfg.max_position_embeddings} positions; lower loader.max_len"
        )
    check_run_dir(run_dir, cfg, student_cfg)

    # ---- 4. mesh and optimizer
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.make_rules(cfg.mesh.rules)
    shd.check_batch(
        cfg.loader.batch_size * distributed.num_data_shards(cfg.distributed), mesh, cfg.optim.grad_accum_steps
    )
    total_steps = total_steps_for(cfg, manifest)
    optim_cfg = dataclasses.replace(cfg.optim, total_steps=total_steps)
    frozen = optim_lib.frozen_param_paths(
        student_cfg, cfg.student.freeze_pos_embs, cfg.student.freeze_token_type_embds
    )
    step_cfg = step_lib.StepConfig(
        loss=cfg.loss,
        masking=cfg.masking,
        optim=optim_cfg,
        mask_id=int(special["mask"]),
        dtype=cfg.train.dtype,
        remat=cfg.train.remat,
        group_rows=cfg.loader.group_rows,
        frozen=frozen,
    )
    student, teacher_model = step_lib.build_models(step_cfg, student_cfg, teacher.config if teacher else None)
    optimizer, schedule = optim_lib.make_optimizer(optim_cfg, model_cfg=student_cfg, frozen=frozen)

    # ---- 5. state: resume own checkpoint > teacher layers / given model > random
    ckpt = ckpt_lib.RunCheckpointer(run_dir, cfg.checkpoint)
    abstract, shardings = abstract_train_state(student, optimizer, mesh, rules, cfg.train.seed)
    restored = ckpt.restore(abstract.params, abstract.opt_state) if ckpt.all_steps() else None
    if restored is not None:
        state = step_lib.TrainState(
            step=jax.device_put(np.int32(restored.step), shardings.step),
            params=restored.params,
            opt_state=restored.opt_state,
            rng=jax.device_put(restored.rng, shardings.rng),
        )
        say(f"resumed {run_dir} from step {restored.step}")
    else:
        params, origin = initial_params() if initial_params else (None, "random init")
        state, _ = step_lib.init_train_state(
            student, jax.random.PRNGKey(cfg.train.seed), optimizer, mesh, rules, params=params
        )
        say(f"model: {_shape_summary(student_cfg)}, from {origin}")
    start_step = int(restored.step) if restored else 0
    teacher_params = teacher_shardings = None
    if teacher is not None:
        teacher_params, teacher_shardings = step_lib.shard_teacher(teacher_model, teacher.params, mesh, rules)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_run_config(cfg, run_dir / "config.yaml")
        save_config(student_cfg, run_dir / "student")
        (run_dir / "tokenizer").mkdir(exist_ok=True)
        copy_tokenizer_files(manifest_lib.tokenizer_dir(manifest), run_dir / "tokenizer")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    say(
        f"{n_params / 1e6:.2f}M student params; mesh {dict(mesh.shape)}; {total_steps} steps of "
        f"{cfg.loader.batch_size * distributed.num_data_shards(cfg.distributed)} sequences; run dir {run_dir}"
    )

    # ---- data iterators (after the state: a resumed run continues the saved iterator)
    # Global batch = one loader batch from each of the data shards; this process reads the shards
    # whose rows its devices hold, all processes pad to one length (jaxdistil.distributed).
    data_shards = distributed.num_data_shards(cfg.distributed)
    pad_values = {"input_ids": int(special["pad"])}
    train_iter = distributed.ShardedBatches(
        lambda i, n: loader_lib.make_loader(manifest, "train", cfg.loader, shard_index=i, shard_count=n),
        data_shards,
        cfg.loader.batch_size,
        shd.batch_sharding(mesh),
        pad_values,
    )
    if restored is not None and restored.data_state is not None:
        train_iter.set_state(restored.data_state)
    has_eval = "validation" in manifest["splits"] and cfg.train.eval_every >= 0
    # Held-out batches as `jaxdistil evaluate` makes them (same masks, same numbers): unpacked rows
    # padded to max_len, in file order, so the first train.eval_batches of them are a fair sample
    # (length grouping would put the shortest, hardest-to-predict sequences first).
    eval_loader_cfg = dataclasses.replace(
        cfg.loader, packed=False, buckets=(cfg.loader.max_len,), group_window=1, prefetch=0
    )

    # ---- 6. step functions
    train_step = step_lib.make_train_step(
        student, teacher_model, step_cfg, optimizer, schedule, mesh, rules, shardings, teacher_shardings
    )
    eval_cfg = dataclasses.replace(
        step_cfg, masking=eval_masking()
    )  # the standard metric, not the run's masking
    eval_student = step_lib.make_eval_step(student, eval_cfg, mesh, rules, shardings.params)
    eval_teacher = (
        step_lib.make_eval_step(teacher_model, eval_cfg, mesh, rules, teacher_shardings)
        if teacher is not None and teacher.has_mlm_head
        else None
    )
    token_weights = jax.device_put(token_weights_np, shd.replicated(mesh))
    eval_weights = jax.device_put(eval_token_weights(manifest), shd.replicated(mesh))

    def evaluate(params, eval_step) -> dict[str, float]:
        batches = distributed.ShardedBatches(
            lambda i, n: loader_lib.eval_batches(manifest, eval_loader_cfg, shard_index=i, shard_count=n),
            data_shards,
            eval_loader_cfg.batch_size,
            shd.batch_sharding(mesh),
            pad_values,
        )
        return evaluate_params(
            eval_step,
            params,
            batches,
            eval_weights,
            lambda b: shd.shard_batch(b, mesh),
            cfg.train.eval_batches,
        )

    # ---- 7. loop
    peak = (
        cfg.logging.peak_tflops * 1e12
        if cfg.logging.peak_tflops
        else measure_peak_flops(step_cfg.compute_dtype)
    )
    peak *= jax.device_count()
    metrics_out = MetricsWriter(run_dir, cfg.logging.tensorboard, start_step if restored else None, writer)
    bar = None
    if writer and cfg.logging.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            desc="train",
        )
    teacher_eval: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_train: dict[str, float] = {}
    pending: list[dict[str, jax.Array]] = []  # step metrics not fetched yet (no sync per step)
    interval = {"tokens": 0.0, "flops": 0.0, "start": time.perf_counter()}
    step = start_step
    seen_shapes: set[tuple[int, int]] = set()

    def flush_logs(step: int) -> None:
        nonlocal pending, last_train
        if not pending:
            return
        values = jax.device_get(pending)
        elapsed = max(time.perf_counter() - interval["start"], 1e-9)
        out = {k: float(np.mean([v[k] for v in values])) for k in MEAN_KEYS if k in values[0]}
        out["lr"] = float(values[-1]["lr"])
        out["param_norm"] = float(values[-1]["param_norm"])
        out["tokens"] = float(sum(v["tokens"] for v in values))
        out["masked_tokens"] = float(sum(v["masked_tokens"] for v in values))
        if interval["tokens"]:
            out["tokens_per_s"] = interval["tokens"] / elapsed
            out["mfu"] = interval["flops"] / elapsed / peak
        out["memory_gb"], _ = memory_gb()
        last_train = out
        metrics_out.write(step, "train", out)
        if bar is not None:
            bar.set_postfix(
                loss=f"{out['loss']:.4f}", tok_s=f"{out.get('tokens_per_s', 0):.0f}", refresh=False
            )
        pending = []
        interval.update(tokens=0.0, flops=0.0, start=time.perf_counter())

    def run_eval(step: int) -> dict[str, float]:
        nonlocal teacher_eval, last_eval
        values = {}
        if eval_teacher is not None and not teacher_eval:
            teacher_eval = evaluate(teacher_params, eval_teacher)
            values.update(
                {
                    f"teacher_{k}": v
                    for k, v in teacher_eval.items()
                    if k in ("loss", "perplexity", "accuracy")
                }
            )
        last_eval = evaluate(state.params, eval_student)
        values.update(
            {f"student_{k}": v for k, v in last_eval.items() if k in ("loss", "perplexity", "accuracy")}
        )
        metrics_out.write(step, "eval", values)
        say(
            f"step {step}: held-out MLM loss {last_eval['loss']:.4f}, "
            f"perplexity {last_eval['perplexity']:.2f}, accuracy {last_eval['accuracy']:.4f}"
            + (f" (teacher {teacher_eval['accuracy']:.4f})" if teacher_eval else "")
        )
        interval.update(tokens=0.0, flops=0.0, start=time.perf_counter())
        return last_eval

    stop = StopSignal()
    try:
        with stop:
            if restored is None and has_eval and cfg.train.eval_every > 0:
                run_eval(0)  # where the student starts (e.g. right after copying teacher layers)
            while step < total_steps and not stop.check(step):
                try:
                    host_batch = next(train_iter)
                except StopIteration:
                    say(f"the training data ran out after {step} steps "
                        f"(loader.num_epochs={cfg.loader.num_epochs})")
                    break
                batch = shd.shard_batch(host_batch, mesh)
                with jax.transfer_guard("disallow"):  # any implicit host<->device copy is a bug
                    state, metrics = train_step(state, teacher_params, batch, token_weights)
                step += 1
                if distributed.agreed_stop(step):  # multi-process: SIGTERM seen by any process
                    stop.signum = signal.SIGTERM
                pending.append(metrics)
                b, t = host_batch["input_ids"].shape
                b *= jax.process_count()
                if (b, t) not in seen_shapes:
                    # The first step of each batch shape compiles: keep it out of the throughput figures.
                    seen_shapes.add((b, t))
                    jax.block_until_ready(metrics)
                    interval.update(tokens=0.0, flops=0.0, start=time.perf_counter())
                else:
                    interval["tokens"] += float(np.sum(host_batch["attention_mask"])) * jax.process_count()
                    interval["flops"] += (
                        b
                        * t
                        * (
                            model_flops_per_token(student_cfg, t, True)
                            + (
                                model_flops_per_token(teacher.config, t, False)
                                if teacher is not None
                                else 0.0
                            )
                        )
                    )
                if bar is not None:
                    bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    flush_logs(step)
                evaluated = False
                if has_eval and (
                    step == total_steps or cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0
                ):
                    flush_logs(step)
                    run_eval(step)
                    evaluated = True
                every = cfg.checkpoint.every
                if (
                    (every and step % every == 0)
                    or step == total_steps
                    or stop.signum is not None
                    or (evaluated and cfg.checkpoint.keep_best)
                ):
                    ckpt.save(
                        step,
                        state.params,
                        state.opt_state,
                        state.rng,
                        train_iter.get_state(),
                        eval_loss=last_eval["loss"] if evaluated else None,
                    )
            flush_logs(step)
            if stop.signum is not None:
                ckpt.save(step, state.params, state.opt_state, state.rng, train_iter.get_state())
                name = signal.Signals(stop.signum).name
                say(f"\n{name} received: saved a checkpoint at step {step}; run the same command to resume")
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        metrics_out.close()
    return TrainResult(
        run_dir, step, total_steps, stop.signum, last_train, last_eval, teacher_eval, student_cfg, state
    )


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with dotted paths, e.g. train.steps=100 optim.learning_rate=1e-4",
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over the run dir's lock when it was left by a process on another host",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    result = train(cfg, force_unlock=args.force_unlock)
    if result.interrupted is not None:
        return 128 + int(result.interrupted)
    return 0
