"""The shard study: the same distillation step built on several meshes and measured side by side.

For every mesh (``data=8``, ``fsdp=8``, ``data=2,fsdp=2,tensor=2`` ...) the same step (same models,
init, batches and rules) is built by ``jaxdistil.distill.builder``, lowered, compiled and run; one
``StrategyResult`` row per mesh reports

  * per-device bytes of student params, optimizer state and teacher params (``study.memory``);
  * the compiler's memory analysis (argument / output / temp bytes) where the backend gives it;
  * collectives in the optimized HLO (``study.hlo``), ops inside loops weighted by trip counts;
  * FLOPs, compile time, median step time, tokens/s;
  * the loss after the same number of steps, and whether every strategy agrees within a tolerance;
  * what one step costs each device (``study.cost``: FLOPs, memory bytes, collective bytes by kind
    and mesh axis) and, for ``targets`` (``study.hardware``: H100, v5p-16, ...), the step time, MFU,
    memory fit and bound predicted from it (``study.predict``).

``steps=0`` compiles and analyses without placing or running anything (abstract arguments), for
shapes too large for this machine (the paper's 4K-sequence update).

``run_study`` is the entry point; ``study.report`` writes the table, CSV, JSON, Markdown and PNG.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistil import students
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.distill.builder import DistillStep, StepSpec, run_step_spec
from jaxdistil.errors import UserError
from jaxdistil.models import ConfigError, config_from_hf_dict, init_params, load_config
from jaxdistil.models.flops import train_flops_per_token
from jaxdistil.study import hardware
from jaxdistil.study.cost import step_cost
from jaxdistil.study.hlo import collective_stats, matmul_flops
from jaxdistil.study.memory import abstract_device_bytes, cost_flops, max_device_bytes, memory_analysis
from jaxdistil.study.predict import MODEL_DESCRIPTION, hardware_meta, predict_all
from jaxdistil.study.report import (
    StrategyResult,
    check_agreement,
    markdown_table,
    write_chart,
    write_csv,
    write_json,
)
from jaxdistil.training import sharding as shd

# Shapes of well-known hub models, so a study needs no download (it uses random weights anyway).
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {"model_type": "bert"},
    "bert-base-cased": {"model_type": "bert", "vocab_size": 28996},
    "bert-large-uncased": {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "intermediate_size": 4096},
    "distilbert-base-uncased": {"model_type": "distilbert"},
}
REMAT_WARNING = "Involuntary full rematerialization"


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """What every strategy shares: the step (models, recipe, rules), batch shape and seed.

    spec: the StepSpec; each strategy replaces its mesh sizes (rules stay). Weights are random from
      ``seed``, the same for every mesh (born sharded; JAX's partitionable PRNG draws the same
      values whatever the layout).
    batch, seq: global batch [batch, seq] of synthetic token ids, a different batch per step.
    """

    spec: StepSpec
    batch: int
    seq: int
    seed: int = 0

    @property
    def student(self) -> Any:
        return self.spec.student

    @property
    def teacher(self) -> Any:
        return self.spec.teacher


def model_config_for(source: str, what: str) -> Any:
    """A model config (shape only) from a model dir / config.json / run dir / preset hub id."""
    path = Path(source).expanduser()
    candidates = [path, path / "student"] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_file() or (candidate / "config.json").is_file():
            try:
                return load_config(candidate)
            except ConfigError as err:
                raise UserError(f"{what}: {err}") from None
    if source in PRESETS:
        return config_from_hf_dict(dict(PRESETS[source]), source)
    raise UserError(
        f"{what} {source!r}: no config.json there; the study needs only the model's shape: give a model "
        f"or run directory, a config.json, or one of {', '.join(PRESETS)}")


def setup_from_run_config(cfg: Any, batch: int | None, seq: int | None, seed: int | None,
                          rules: Iterable[str] = (), strict: bool = True, total_steps: int = 1) -> StudySetup:
    """A StudySetup from a RunConfig (jaxdistil.config): its teacher/student, loss, masking, optim,
    dtype and mesh rules (``rules``: extra overrides such as ``mlp=tensor``). With ``data.dir`` set,
    the vocabulary, pad and [MASK] ids are the data's; otherwise the models' (BERT's [MASK] is 103)."""
    teacher = None
    if cfg.teacher.model not in (None, "", "none"):
        teacher = model_config_for(cfg.teacher.model, "teacher.model")
    if cfg.data.dir:
        tok = manifest_lib.load_manifest(cfg.data.dir)["tokenizer"]
        vocab, pad = int(tok["vocab_size"]), int(tok["special_ids"]["pad"])
        mask = int(tok["special_ids"].get("mask", -1))  # none in causal-LM (GPT-2) data
    else:
        vocab = teacher.vocab_size if teacher is not None else int(cfg.student.config.get("vocab_size", 30522))
        pad, mask = 0, (103 if vocab > 103 else vocab - 1)  # BERT's ids; tiny vocabularies: the last
    init = cfg.student.init
    student = (students.student_shape(cfg, teacher, vocab, pad) if init in ("teacher", "random")
               else model_config_for(init, "student.init"))
    total = max(cfg.optim.total_steps, total_steps)
    spec = run_step_spec(cfg, student, teacher, mask, total, rules=tuple(rules), strict=strict)
    return StudySetup(spec=spec, batch=batch or cfg.loader.batch_size, seq=seq or cfg.loader.max_len,
                      seed=cfg.train.seed if seed is None else seed)


def synthetic_batches(setup: StudySetup, n: int) -> list[dict[str, Any]]:
    """``n`` host batches {input_ids, attention_mask} [batch, seq] int32 from ``setup.seed``:
    ``[CLS] random ids [SEP]`` with lengths between seq/2 and seq (so padding is exercised)."""
    rng = np.random.default_rng(setup.seed)
    vocab = setup.student.vocab_size
    low = 1000 if vocab > 2000 else min(5, vocab - 1)  # skip BERT's [unused]/special ids
    out = []
    for _ in range(n):
        ids = rng.integers(low, vocab, size=(setup.batch, setup.seq), dtype=np.int32)
        lengths = rng.integers(max(2, setup.seq // 2), setup.seq + 1, size=setup.batch)
        mask = (np.arange(setup.seq)[None, :] < lengths[:, None]).astype(np.int32)
        if vocab > 103:
            ids[:, 0] = 101
            ids[np.arange(setup.batch), lengths - 1] = 102
        out.append({"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask})
    return out


def token_weights(vocab: int) -> np.ndarray:
    """Masking weights [V] float32: uniform, 0 for padding and (BERT vocabularies) [CLS]/[SEP]/[MASK]."""
    weights = np.ones(vocab, np.float32)
    weights[0] = 0.0
    if vocab > 103:
        weights[[100, 101, 102, 103]] = 0.0
    return weights


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Captures what C++ code (XLA) writes to file descriptor 2; yields a list that holds the
    text after the block. XLA's SPMD warnings ("Involuntary full rematerialization") say where
    the partitioner had to replicate a tensor to reshard it, which the study reports per mesh."""
    out: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (some embedded interpreters): capture nothing
        yield out
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        failed = True
        try:
            yield out
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read()
            out.append(text.decode("utf-8", "replace"))
            if failed:  # the block raised: what XLA said may explain why, so show it
                os.write(2, text)


def _split_notes(caught: list) -> list[str]:
    """The sharding module's "does not divide ... replicated" warnings (strict=False), once each."""
    return list(dict.fromkeys(str(w.message) for w in caught if "does not divide" in str(w.message)))


def _build(setup: StudySetup, sizes: Mapping[str, int], devices: list,
           compiler_options: Mapping[str, Any] | None = None) -> tuple[DistillStep, list[str]]:
    """The step on one mesh (UserError naming the mesh when it cannot be built), and its notes."""
    label = shd.mesh_label(sizes)
    mesh_cfg = dataclasses.replace(setup.spec.mesh, **sizes)
    spec = dataclasses.replace(setup.spec, mesh=mesh_cfg, compiler_options=compiler_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            built = DistillStep(spec, devices)
            shd.check_batch(setup.batch, built.mesh, spec.step.grad_accum_steps)
        except UserError as err:
            raise UserError(f"mesh {label}: {err}") from None
    return built, _split_notes(caught)


def abstract_arguments(built: DistillStep, setup: StudySetup) -> tuple[Any, Any, dict[str, Any], Any]:
    """(state, teacher params, batch, consts) of the train step as ``jax.ShapeDtypeStruct`` s that
    carry their shardings: enough to lower and compile the step, nothing allocated."""
    def placed(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    def abstract_params(model, shardings):
        return placed(jax.eval_shape(lambda r: init_params(model, r), jax.random.PRNGKey(0)), shardings)

    teacher = None
    if built.teacher is not None:
        teacher = abstract_params(built.teacher, built.teacher_shardings)
    extra = tuple(abstract_params(m, s) for m, s in zip(built.extra_teachers, built.extra_teacher_shardings,
                                                        strict=True))
    rows = shd.batch_sharding(built.mesh)
    batch = {k: jax.ShapeDtypeStruct((setup.batch, setup.seq), np.int32, sharding=rows)
             for k in ("input_ids", "attention_mask")}
    weights = jax.ShapeDtypeStruct((setup.student.vocab_size,), np.float32, sharding=shd.replicated(built.mesh))
    return built.abstract_state, teacher, batch, {"teacher": teacher, "teachers": extra, "token_weights": weights}


def model_flops_per_step(setup: StudySetup) -> float:
    """Model FLOPs of one update over all devices (``models.flops``: what MFU divides)."""
    return train_flops_per_token(setup.student, setup.teacher, setup.seq) * setup.batch * setup.seq


def measure_strategy(setup: StudySetup, sizes: Mapping[str, int], devices: list, host_batches: list,
                     steps: int, warmup: int = 1, compiler_options: Mapping[str, Any] | None = None,
                     hlo_dir: Any = None, targets: list[hardware.Target] = ()) -> StrategyResult:
    """Builds, compiles and runs the step on one mesh; ``warmup + steps`` updates, the last
    ``steps`` timed. The loss reported is the step's loss at the last update. ``steps=0``: compiled
    from abstract arguments and analysed, nothing placed or run (no step time, no loss).

    hlo_dir: when given, the optimized HLO (``<mesh>.hlo.txt``) and XLA's compile log
    (``<mesh>.log``) are written there. targets: accelerators to predict the step on.
    """
    label = shd.mesh_label(sizes)
    built, notes = _build(setup, sizes, devices)
    if steps == 0:
        state, teacher_params, batch, consts = abstract_arguments(built, setup)
        batches = [batch]
        device_bytes = abstract_device_bytes
    else:
        key_student, key_teacher = jax.random.split(jax.random.PRNGKey(setup.seed))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = built.init_state(key_student)
            teacher_params = built.random_teacher(key_teacher) if built.teacher is not None else None
        notes += [n for n in _split_notes(caught) if n not in notes]
        batches = [built.shard_batch(b) for b in host_batches]
        extra = [built.random_teacher(k, i + 1) for i, k in
                 enumerate(jax.random.split(key_teacher, len(built.extra_teachers) + 1)[1:])]
        consts = built.consts(teacher_params, token_weights(setup.student.vocab_size), extra)
        device_bytes = max_device_bytes
    with captured_stderr() as xla_log:
        t0 = time.perf_counter()
        lowered = built.train_step.lower(state, batches[0], consts)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options=dict(compiler_options or {}) or None)
        except Exception as err:  # a bad --compiler-option is the usual cause
            if compiler_options and "compile option" in str(err):
                raise UserError(f"{str(err).splitlines()[0]}; check --compiler-option") from None
            raise
        t2 = time.perf_counter()
    log = "".join(xla_log)
    remats = log.count(REMAT_WARNING)
    if remats:
        notes.append(f"XLA: {remats} involuntary full rematerialization(s): the partitioner replicated a "
                     "tensor to reshard it (see the mesh's .log in hlo/)")
    hlo = compiled.as_text()
    if hlo_dir is not None:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        stem = label.replace(",", "_").replace("=", "")
        (Path(hlo_dir) / f"{stem}.hlo.txt").write_text(hlo)
        (Path(hlo_dir) / f"{stem}.log").write_text(log)
    memory = memory_analysis(compiled)
    cost = step_cost(hlo, built.mesh.shape, memory)
    result = StrategyResult(
        mesh=label, sizes=dict(built.mesh.shape), devices=built.mesh.size,
        student_param_bytes=device_bytes(state.params), opt_state_bytes=device_bytes(state.opt_state),
        teacher_param_bytes=device_bytes(teacher_params),
        memory=memory, collectives=collective_stats(hlo),
        flops=cost_flops(compiled), lower_s=t1 - t0, compile_s=t2 - t1,
        step_times_s=[], tokens_per_step=setup.batch * setup.seq, losses=[], notes=notes,
        matmul_flops=matmul_flops(hlo), cost=cost,
        predictions=predict_all(cost, list(targets), setup.batch * setup.seq, model_flops_per_step(setup),
                                setup.spec.step.dtype),
    )
    if result.collectives.trip_count_unknown:
        result.notes.append("a loop without a known trip count: its collectives count once")
    if result.collectives.conditionals:
        result.notes.append(
            f"{result.collectives.conditionals} conditional(s) with branches moving different collective "
            "bytes: the heaviest branch is counted (an upper bound)")
    if steps == 0:
        result.notes.append("compiled and analysed only (--steps 0): nothing ran")
        return result
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, consts)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            result.step_times_s.append(elapsed)
        result.losses.append(float(metrics["loss"]))
    del state, built
    return result


@dataclasses.dataclass
class StudyReport:
    results: list[StrategyResult]
    agree: bool
    tolerance: float
    meta: dict[str, Any]


def machine_info(devices: list | None = None) -> dict[str, Any]:
    """Where the figures come from: CPU model, load, JAX backend and devices, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = list(jax.devices() if devices is None else devices)
    try:
        load = round(os.getloadavg()[0], 2)  # other processes competing for the cores skew timings
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cpu_cores": os.cpu_count(), "load_average_1min": load, "backend": devices[0].platform,
        "device_kind": devices[0].device_kind, "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_study(setup: StudySetup, meshes: list[str | Mapping[str, int]], steps: int = 3, warmup: int = 1,
              tolerance: float = 1e-5, devices: list | None = None, log: Any = None,
              compiler_options: Mapping[str, Any] | None = None, hlo_dir: Any = None,
              targets: list[hardware.Target] | None = None) -> StudyReport:
    """Measures every mesh (``"data=2,fsdp=4"`` or a sizes dict, -1 allowed) on the same work.

    All meshes are validated first (device count, batch and parameter splits, abstractly), so a bad
    one fails in seconds, before any compilation. compiler_options: XLA options for the step's
    compile (``{"xla_backend_optimization_level": 0}``), the same for every mesh. log: a callable
    taking a progress line. steps=0: compile and analyse only. targets: accelerators to predict each
    mesh's step on (``hardware.parse_targets``); a ``cpu`` target is calibrated here, first.
    """
    if steps < 0 or warmup < 0:
        raise UserError(f"--steps and --warmup must be >= 0, got {steps} and {warmup}")
    devices = list(jax.devices() if devices is None else devices)
    start = machine_info(devices)
    targets, cpu_rates = hardware.calibrate_cpu(list(targets or []), devices[0])
    resolved = [
        shd.MeshConfig.parse(m).resolve(len(devices), m) if isinstance(m, str)
        else shd.MeshConfig(**m).resolve(len(devices)) for m in meshes
    ]
    labels = [shd.mesh_label(m) for m in resolved]
    dupes = [label for label, n in collections.Counter(labels).items() if n > 1]
    if dupes:
        raise UserError(f"mesh {dupes[0]} is given twice; list each strategy once")
    notes = {label: _build(setup, m, devices)[1] for label, m in zip(labels, resolved)}
    if log:
        log(f"shard-study on {len(devices)} {devices[0].platform} devices: {describe_models(setup)}")
    host_batches = synthetic_batches(setup, warmup + steps) if steps else []
    results = []
    for i, (label, sizes) in enumerate(zip(labels, resolved)):
        if log:
            log(f"[{i + 1}/{len(resolved)}] {label}: " + (f"compiling and running {warmup} + {steps} steps" if steps
                                                           else "compiling (--steps 0: nothing runs)"))
        res = measure_strategy(setup, sizes, devices, host_batches, steps, warmup, compiler_options, hlo_dir,
                               targets)
        for note in notes[label]:
            if note not in res.notes:
                res.notes.append(note)
        if log:
            log(f"    compile {res.compile_s:.1f} s" + (f", step {res.step_s * 1e3:.0f} ms, loss {res.loss:.6f}"
                                                       if steps else ""))
        results.append(res)
        gc.collect()
    agree = check_agreement(results, tolerance)
    meta = machine_info(devices)
    meta["load_average_1min"] = [start["load_average_1min"], meta["load_average_1min"]]  # start, end
    step = setup.spec.step
    meta.update(
        devices=len(devices), batch=setup.batch, seq=setup.seq, steps=steps, warmup=warmup,
        tolerance=tolerance, losses_agree=agree, rules=list(setup.spec.mesh.rules), strict=setup.spec.strict,
        compiler_options=dict(compiler_options or {}),
        seed=setup.seed, dtype=step.dtype, remat=step.remat, grad_accum_steps=step.grad_accum_steps,
        teacher=None if setup.teacher is None else setup.teacher.to_hf_dict(),
        student=setup.student.to_hf_dict(),
        model_flops_per_step=model_flops_per_step(setup),
    )
    if targets:
        meta.update(prediction_model=MODEL_DESCRIPTION, hardware=hardware_meta(targets),
                    cpu_calibration=None if cpu_rates is None else dataclasses.asdict(cpu_rates))
    return StudyReport(results, agree, tolerance, meta)


def describe_models(setup: StudySetup) -> str:
    def one(cfg: Any) -> str:
        return (f"{cfg.model_type} {cfg.layers}x{cfg.hidden} (heads {cfg.heads}, ffn {cfg.mlp}, "
                f"vocab {cfg.vocab_size})")

    teacher = "no teacher (MLM only)" if setup.teacher is None else f"teacher {one(setup.teacher)}"
    return f"{teacher}, student {one(setup.student)}, batch {setup.batch}x{setup.seq}, {setup.spec.step.dtype}"


def write_outputs(report: StudyReport, out_dir: Any, title: str = "") -> dict[str, Any]:
    """shard_study.csv / .json / .md / .png into ``out_dir``; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "shard_study.csv", "json": out / "shard_study.json",
             "markdown": out / "shard_study.md", "png": out / "shard_study.png"}
    write_csv(report.results, paths["csv"])
    write_json(report.results, report.meta, paths["json"])
    paths["markdown"].write_text((f"{title}\n\n" if title else "") + markdown_table(report.results))
    write_chart(report.results, paths["png"], title)
    return paths
