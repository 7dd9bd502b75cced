"""``cache_teacher(cfg, output)``: a run's teacher outputs, update by update, into a teacher cache.

The format, the reader and the choice of soft targets are ``jaxdistil.distill.teacher_cache``'s. The
writer builds what ``train`` builds from the same run config (teacher, student shape, the step's
masking, the mesh, ``train.run_batches``) and, for every update s, masks the batch with the key of
update s exactly as the step does (``objective.step_masks``, ``training.state.step_key``), runs the
teacher on it (deterministic, ``train.dtype``) and keeps this process's rows of its top-k logits
and, when the run's terms read them, its last hidden states.

Resumable: chunks of ``chunk_steps`` updates are written whole (a temporary name, then renamed) and
listed in the rows' index.json with their sha256; a rerun keeps the finished chunks, reads the data
stream past them and computes the rest, and ``--steps`` larger than before extends a cache.
Multi-process: each process writes the rows its devices hold (``rows-<lo>-<hi>/``); process 0 writes
the manifest. A cache of another run at ``output`` is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistil import distributed, students
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.distill.builder import DistillStep, run_step_spec
from jaxdistil.distill.config import RunConfig
from jaxdistil.distill.objective import MODEL_INPUTS, step_masks
from jaxdistil.distill.teacher_cache import (
    FORMAT,
    STORE_DTYPES,
    TeacherCache,
    check_one_teacher,
    contiguous_steps,
    check_terms,
    file_sha256,
    identity_mismatch,
    params_sha256,
    run_identity,
    term_layers,
)
from jaxdistil.errors import UserError
from jaxdistil.train import local_rows, run_batches, total_steps_for
from jaxdistil.training import sharding as shd
from jaxdistil.training.state import base_rng, step_key


@dataclasses.dataclass
class CacheResult:
    """What ``cache_teacher`` returns: where, how many updates, what it wrote and at what cost."""

    path: Path
    steps: int
    computed: int  # updates whose teacher pass ran now (the others were in the cache already)
    top_k: int
    bytes: int  # this process's chunk files
    tokens: int  # real tokens of the ``steps`` updates (this process's rows)
    seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def needs_hidden(step: Any) -> bool:
    """Whether the run reads the teacher's last hidden states outside its terms (the loss section's
    L_cos); the terms' per-layer outputs are ``teacher_cache.term_layers``."""
    return step.loss.alpha_cos > 0


def _local(x: jax.Array, rows: slice) -> np.ndarray:
    """This process's rows [rows] of a global array sharded over its first axis only."""
    if x.is_fully_addressable:
        return np.asarray(x)[rows]
    parts: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        parts.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([parts[k] for k in sorted(parts)])


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


_KIND = ("top_k", "dtype", "hidden", "outputs")  # what a cache holds, besides whose run it is


def _prepare_output(out: Path, header: dict) -> None:
    """Refuses an ``out`` that holds something else than a cache of this run (or nothing)."""
    if (out / "manifest.json").is_file():
        have = TeacherCache(out).manifest
        mismatch = identity_mismatch(have["identity"], header["identity"]) or identity_mismatch(
            {k: have.get(k) for k in _KIND}, {k: json.loads(json.dumps(header[k])) for k in _KIND})
        if mismatch:
            raise UserError(f"{out} holds a teacher cache of another run or kind ({mismatch.replace('the run', 'this one')}); "
                            "choose another --output or delete it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a teacher cache; choose a new or empty --output")


def cache_teacher(cfg: RunConfig, output: str | Path, top_k: int = 32, steps: int | None = None,
                  dtype: str = "bfloat16", chunk_steps: int = 64, log=print, progress: bool = True) -> CacheResult:
    """Writes (or completes, or extends) the teacher cache of run config ``cfg`` at ``output``.

    top_k: logits kept per position (0 or >= the vocabulary: all of them, the online run's exact
    targets with dtype="float32"); steps: updates to cover (default: the run's, train.steps or
    train.epochs); dtype: storage of logits and hidden states (one of ``STORE_DTYPES``).
    """
    if dtype not in STORE_DTYPES:
        raise UserError(f"cache dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    if chunk_steps < 1 or top_k < 0 or (steps is not None and steps < 1):
        raise UserError("--chunk-steps and --steps must be >= 1 and --top-k >= 0")
    distributed.initialize(cfg.distributed)
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=None))  # it makes, not reads
    if cfg.teacher.model is None:
        raise UserError("the run config has no teacher (teacher.model is null); a cache stores a teacher's outputs")
    check_one_teacher([t.name for t in cfg.teachers])  # before any model is loaded
    if not cfg.data.dir:
        raise UserError("data.dir is not set; prepare data with `jaxdistil prepare` and pass data.dir=DIR")
    manifest = manifest_lib.load_manifest(cfg.data.dir)
    teacher = students.resolve_teacher(cfg, manifest)
    student_cfg, _ = students.resolve_student(cfg, teacher, manifest)
    total = total_steps_for(cfg, manifest)
    steps = steps or total
    mask_id = manifest_lib.mask_token_id(manifest, causal=student_cfg.causal)
    spec = run_step_spec(cfg, student_cfg, teacher.config, mask_id, total)
    vocab = int(teacher.config.vocab_size)
    k = vocab if top_k == 0 or top_k >= vocab else int(top_k)
    hidden = needs_hidden(spec.step)
    outputs = term_layers(spec.step, teacher.config.layers)
    check_terms(spec.step, k, vocab, hidden)
    built = DistillStep(spec)
    rows = local_rows(cfg, built)
    out = Path(output).expanduser().absolute()
    header = {"format": FORMAT, "identity": run_identity(cfg, manifest, params_sha256(teacher.params), spec.step),
              "top_k": k, "dtype": dtype, "hidden": hidden, "outputs": outputs, "vocab_size": vocab,
              "global_rows": cfg.loader.batch_size * distributed.num_data_shards(cfg.distributed),
              "teacher": {"model": cfg.teacher.model, "config": dataclasses.asdict(teacher.config)},
              "data_dir": str(manifest["data_dir"])}
    _prepare_output(out, header)  # every process checks (the same files) before any of them writes
    distributed.barrier("cache-teacher:checked")
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "manifest.json", header)
    distributed.barrier("cache-teacher:manifest")
    block = out / f"rows-{rows.start}-{rows.stop}"
    block.mkdir(exist_ok=True)
    index_path = block / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"rows": [rows.start, rows.stop],
                                                                              "chunks": []}
    done = contiguous_steps(index["chunks"])
    index["chunks"] = [c for c in index["chunks"] if c["last"] < done]
    _write_json(index_path, index)

    store = jnp.dtype(dtype)
    id_dtype = jnp.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else jnp.int32
    rng = base_rng(jax.random.PRNGKey(cfg.train.seed))
    step_cfg = spec.step
    requested = tuple(f for f in outputs if f != "hidden_states")  # (hidden states are always returned)

    def teacher_outputs(t_params, batch, token_weights, step):
        with shd.activation_rules(built.mesh, built.rules):
            inputs, _ = step_masks(batch, token_weights, step_key(rng, step), step_cfg, student_cfg.vocab_size)
            variables = {"params": t_params}
            kwargs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
            enc = built.teacher.apply(variables, inputs["input_ids"], deterministic=True, method="encode",
                                      outputs=requested, **kwargs)
            logits = built.teacher.apply(variables, enc.last_hidden_state, method="mlm_logits").astype(jnp.float32)
            values, ids = jax.lax.top_k(logits, k)
            got = {"top_k_ids": ids.astype(id_dtype), "top_k_logits": values.astype(store)}
            if hidden:
                got["hidden"] = enc.last_hidden_state.astype(store)
            for field, layers in outputs.items():  # [L(+1), B, ...] -> the layers used, rows first
                got[field] = jnp.moveaxis(getattr(enc, field)[jnp.asarray(layers)], 0, 1).astype(store)
            return got

    run = jax.jit(teacher_outputs, out_shardings=shd.batch_sharding(built.mesh))
    t_params = built.place_teacher(teacher.params)
    weights = built.replicate(manifest_lib.token_weights(manifest, cfg.masking.mlm_smoothing))
    batches = run_batches(cfg, manifest, built)
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=min(done, steps), unit="update", desc="cache-teacher",
               disable=not (progress and distributed.is_main_process()))
    buffer: dict[str, np.ndarray] = {}
    first, tokens, t0 = None, 0, time.perf_counter()
    if done >= steps:
        log(f"{out} already holds {done} updates of rows {rows.start}..{rows.stop - 1}; nothing to compute")
    for step in range(steps):
        try:
            host = next(batches)
        except StopIteration:
            raise UserError(f"the data ran out after {step} updates; lower --steps or raise loader.num_epochs") from None
        tokens += int(np.asarray(host["attention_mask"]).sum())
        if step < done:
            continue  # in the cache already: only the data stream moves on
        got = jax.device_get({n: _local(v, rows) for n, v in
                              run(t_params, built.shard_batch(host), weights, jnp.int32(step)).items()})
        buffer[f"{step}/input_ids"] = np.asarray(host["input_ids"])
        buffer.update({f"{step}/{n}": np.asarray(v) for n, v in got.items()})
        first = step if first is None else first
        if (step + 1) % chunk_steps == 0 or step == steps - 1:
            index["chunks"].append(_write_chunk(block, buffer, first, step))
            _write_json(index_path, index)
            buffer, first = {}, None
        bar.update(1)
    bar.close()
    written = sum(c["bytes"] for c in index["chunks"] if c["last"] < steps)
    return CacheResult(out, steps, max(0, steps - done), k, written, tokens, time.perf_counter() - t0)


def _write_chunk(block: Path, arrays: dict[str, np.ndarray], first: int, last: int) -> dict[str, Any]:
    from safetensors.numpy import save_file

    name = f"chunk-{first:07d}-{last:07d}.safetensors"
    tmp = block / (name + ".tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, block / name)
    return {"file": name, "first": first, "last": last, "bytes": (block / name).stat().st_size,
            "sha256": file_sha256(block / name)}
