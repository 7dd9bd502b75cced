"""A teacher cache: a run's teacher outputs, computed once and read back by many students.

DistilBERT's teacher reads the *masked* input. The masks of update s are a pure function of the
batch the loader yields at s and of the update's key (``training.state.step_key``: the run's seed
and s), so with the same data, loader settings and seed the teacher's outputs of every update can
be computed ahead (``jaxdistil cache-teacher``, ``jaxdistil.cache_teacher``), stored, and read in
place of the teacher's forward pass (``teacher.cache: CACHE``).

Per update, a cache holds this process's rows of:
  input_ids      [b, T] the loader's (unmasked) ids: a run reading the cache checks its own batch
                 against them, so a cache can never be read out of step with the data
  top_k_ids      [b, T, K] the teacher's K largest logits at every position, ids (uint16 when the
  top_k_logits   vocabulary fits, else int32) and values (the store dtype)
  hidden         [b, T, D] the teacher's last hidden states (only when L_cos reads them)
  hidden_states, attentions, scores, queries, keys, values
                 [b, n, ...] the per-layer outputs the terms read, for the n teacher layers they use
                 (``term_layers``; listed in the manifest's "outputs")

Soft targets from a top-k cache are the teacher's distribution renormalised over its top k:
p_i = exp(t_i / T) / sum_(j in top k) exp(t_j / T) on the top k, 0 elsewhere (``expand_top_k``
writes the other logits as ``FILL``, whose exp is 0, so the logits engine is unchanged). With
K = the vocabulary and float32 storage the targets are the online teacher's exactly. Divergences that
divide by the teacher's probabilities (reverse KL) and logits MSE need every logit: K < V refuses them.

Files: CACHE/manifest.json (what the cache is of: ``identity``, and what it holds), and per
process's rows [lo, hi) CACHE/rows-<lo>-<hi>/index.json (its chunks, each with its sha256) and
chunk-<first>-<last>.safetensors (the updates first..last, one tensor per update and field:
``"<step>/<field>"``). safetensors reads no code and maps files lazily.

  TeacherCache(path)            the reader: ``check`` refuses a run the cache is not of, or one it
                                does not cover, in one line; ``rows(step, lo, hi)``; a chunk's sha256
                                is checked when it is first opened (truncated / corrupt: one line)
  CachedBatches(batches, ...)   the loader's batches with the cache's arrays of their update added,
                                counting updates from the run's (resumed) step
  expand_top_k(x, vocab)        [N, 2K] (ids, logits) -> [N, V] logits for the logits engine
  check_terms(cfg, k, vocab, ...)  what a cache can serve: soft targets (kl, jsd; every kind with
                                K = V), hard targets, and the hidden-state, attention and relation
                                terms whose teacher layers it stores
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistil.errors import UserError

FORMAT = 1
# The logits off the top k: exp((FILL - max) / T) is exactly 0 in float32 for any T the configs allow,
# and FILL stays finite, so p log p = 0 there without a NaN.
FILL = -1e9
# The EncoderOutput fields a term can read from a teacher, stored for the layers the terms use.
OUTPUT_FIELDS = ("hidden_states", "attentions", "scores", "queries", "keys", "values")
FIELDS = ("input_ids", "top_k_ids", "top_k_logits", "hidden", *OUTPUT_FIELDS)
STORE_DTYPES = ("float32", "bfloat16", "float16")
# Soft-target kinds a top-k cache (K < V) serves: those whose value only reads the teacher's
# probabilities where they are > 0 (KL(teacher || student), JSD's mixture).
TOP_K_SOFT = ("kl", "jsd")


def expand_top_k(x: jax.Array, vocab: int) -> jax.Array:
    """[N, 2K] float32 (K ids, then their K logits) -> [N, vocab] float32 logits, ``FILL`` elsewhere.
    The ids travel as float32 (exact below 2^24)."""
    k = x.shape[-1] // 2
    ids, values = x[:, :k].astype(jnp.int32), x[:, k:].astype(jnp.float32)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.full((x.shape[0], vocab), FILL, jnp.float32).at[rows, ids].set(values)


def params_sha256(params: Any) -> str:
    """sha256 of a params tree: every leaf's path, dtype, shape and bytes, in path order."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def term_layers(cfg: Any, teacher_layers: int) -> dict[str, tuple[int, ...]]:
    """EncoderOutput field -> the teacher layers (non-negative, sorted) that a StepConfig's non-logit
    terms read from the loss section's teacher (``hidden_states`` has ``teacher_layers + 1``
    entries, the per-layer attention fields ``teacher_layers``): what a cache of the run stores."""
    from jaxdistil.distill import terms as terms_lib

    out: dict[str, set[int]] = {}
    for term in cfg.terms:
        if term.on_logits or not term.uses_teacher:
            continue
        for name in terms_lib.TERMS[term.kind].inputs:
            field = terms_lib.MODEL_OUTPUTS.get(name)
            if field is None:
                continue
            n = teacher_layers + (field == "hidden_states")
            pairs = [(-1, -1)] if term.layers is None else term.layers
            out.setdefault(field, set()).update(p[1] % n for p in pairs)
    return {field: tuple(sorted(v)) for field, v in out.items()}


def check_one_teacher(extra_names: Sequence[str]) -> None:
    """UserError when the run has teachers besides the loss section's (``teachers:``): a cache holds one."""
    if extra_names:
        raise UserError(f"a teacher cache holds the loss section's teacher; this run also has "
                        f"{', '.join(extra_names)} (teachers:): distil from several teachers online")


def check_terms(cfg: Any, top_k: int, vocab: int, has_hidden: bool,
                stored: Mapping[str, Any] | None = None, teacher_layers: int = 0) -> None:
    """UserError (one line) for the first part of a StepConfig's objective that a cache of the loss
    section's teacher cannot serve: ``top_k`` logits of ``vocab``, ``has_hidden`` (its last hidden
    states), ``stored`` (field -> layers of ``term_layers``; None: whatever the terms need)."""
    from jaxdistil.distill import terms as terms_lib

    full = top_k >= vocab
    check_one_teacher([n for n, _ in cfg.teachers][1:])
    loss = cfg.loss
    if loss.alpha_mse > 0 and not full:
        raise UserError(f"loss.alpha_mse > 0 needs every teacher logit; the cache has the top {top_k} of {vocab}: "
                        "make a cache with --top-k 0 (all) or set loss.alpha_mse=0")
    if loss.alpha_cos > 0 and not has_hidden:
        raise UserError("loss.alpha_cos > 0 needs the teacher's hidden states; the cache has none: make it "
                        "for this run's config (cache-teacher stores them when a term reads them)")
    for i, term in enumerate(cfg.terms):
        what = f"terms[{i}] ({term.kind})"
        if term.kind in terms_lib.HARD_TERMS:
            continue
        if term.kind in terms_lib.SOFT_TERMS:
            if not full and term.kind not in TOP_K_SOFT:
                raise UserError(f"{what} needs every teacher logit; the cache has the top {top_k} of {vocab}: use "
                                f"kind {' or '.join(TOP_K_SOFT)}, or a cache with --top-k 0 (all)")
            continue
        if stored is None:
            continue
        have = {f: set(v) for f, v in stored.items()}
        for field, layers in term_layers(dataclasses.replace(cfg, terms=(term,)), teacher_layers).items():
            missing = sorted(set(layers) - have.get(field, set()))
            if missing:
                raise UserError(f"{what} reads the teacher's {field} of layer {missing[0]}, which the cache does not "
                                "store; make the cache with this run's terms (cache-teacher stores what they read)")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent} has no {path.name}: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err.__class__.__name__}); remake the cache with "
                        "jaxdistil cache-teacher") from None


# Loader settings that change no batch (threads, prefetching; epochs only end the stream).
_LOADER_NOT_IN_IDENTITY = ("read_threads", "prefetch", "num_epochs")


def run_identity(cfg: Any, manifest: Mapping[str, Any], teacher_sha256: str, step: Any) -> dict[str, Any]:
    """What a cache must share with a run (a ``RunConfig``, its data ``manifest``, its teacher's
    ``params_sha256`` and its ``StepConfig``) to hold that run's teacher outputs: the teacher's
    weights and compute dtype, the data (its manifest file's sha256), every loader setting that
    changes a batch, the data shards, the seed, the masking and its grouping."""
    from jaxdistil import distributed
    from jaxdistil.config import to_dict
    from jaxdistil.data.manifest import MANIFEST_NAME

    loader = {k: v for k, v in to_dict(cfg.loader).items() if k not in _LOADER_NOT_IN_IDENTITY}
    return {"teacher_sha256": teacher_sha256, "teacher_dtype": step.dtype,
            "data_sha256": file_sha256(Path(manifest["data_dir"]) / MANIFEST_NAME), "loader": loader,
            "data_shards": distributed.num_data_shards(cfg.distributed), "seed": cfg.train.seed,
            "masking": to_dict(step.masking), "mask_id": step.mask_id, "normalize": step.loss.normalize,
            "group_rows": step.group_rows if step.loss.normalize == "group" else 0, "causal": step.causal}


def identity_mismatch(have: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """The first key whose value differs between two identities, as 'KEY is A in the cache, B in the run'."""
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            return f"{key} is {json.dumps(have.get(key))} in the cache, {json.dumps(want.get(key))} in the run"
    return None


class TeacherCache:
    """A teacher cache on disk (see the module doc), opened for reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise UserError(f"teacher cache {self.path} does not exist; make it with jaxdistil cache-teacher "
                            "--config RUN.yaml --output DIR")
        self.manifest = _read_json(self.path / "manifest.json",
                                   "not a teacher cache (make one with jaxdistil cache-teacher)")
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"teacher cache {self.path} has format {self.manifest.get('format')}, this jaxdistil "
                            f"reads {FORMAT}; remake it with jaxdistil cache-teacher")
        self.top_k = int(self.manifest["top_k"])
        self.has_hidden = bool(self.manifest["hidden"])
        self.outputs = {f: tuple(v) for f, v in self.manifest.get("outputs", {}).items()}  # field -> layers
        self.blocks: list[tuple[int, int, dict]] = []  # (lo, hi, index) of each process's rows
        for d in sorted(self.path.glob("rows-*")):
            index = _read_json(d / "index.json", "the cache's rows were never written (an interrupted "
                               "cache-teacher: run it again to finish)")
            self.blocks.append((int(index["rows"][0]), int(index["rows"][1]), index))
        self._open: dict[Path, Any] = {}

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["identity"]

    def steps_covered(self, lo: int, hi: int) -> int:
        """Updates 0..n-1 that the cache holds for every row of [lo, hi)."""
        covered = None
        for r in range(lo, hi):
            best = 0
            for b_lo, b_hi, index in self.blocks:
                if b_lo <= r < b_hi:
                    best = max(best, contiguous_steps(index["chunks"]))
            covered = best if covered is None else min(covered, best)
        return covered or 0

    def check(self, identity: Mapping[str, Any], steps: int, rows: slice) -> None:
        """UserError when the cache is not of this run (``identity``, see ``cache_teacher.run_identity``)
        or does not hold ``steps`` updates of the rows [rows.start, rows.stop)."""
        mismatch = identity_mismatch(self.identity, identity)
        if mismatch:
            raise UserError(f"teacher cache {self.path} is not of this run: {mismatch}; make a cache for this "
                            "run's config with jaxdistil cache-teacher")
        have = self.steps_covered(rows.start, rows.stop)
        if have < steps:
            raise UserError(f"teacher cache {self.path} holds {have} updates of rows {rows.start}..{rows.stop - 1}, "
                            f"the run needs {steps}; extend it: jaxdistil cache-teacher ... --steps {steps}")

    def _chunk(self, step: int, row: int) -> tuple[Any, int, int]:
        for b_lo, b_hi, index in self.blocks:
            if b_lo <= row < b_hi:
                for c in index["chunks"]:
                    if c["first"] <= step <= c["last"]:
                        return self._opened(self.path / f"rows-{b_lo}-{b_hi}" / c["file"], c), b_lo, b_hi
        raise UserError(f"teacher cache {self.path} has no update {step} for row {row}; extend it with "
                        "jaxdistil cache-teacher")

    def _opened(self, path: Path, entry: Mapping[str, Any]):
        if path not in self._open:
            from safetensors import SafetensorError, safe_open

            if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                raise UserError(f"teacher cache chunk {path} is missing, truncated or corrupt (its sha256 or size "
                                "differs from the index); remake the cache with jaxdistil cache-teacher")
            try:
                self._open[path] = safe_open(str(path), "np")
            except (SafetensorError, OSError) as err:
                raise UserError(f"teacher cache chunk {path} is unreadable ({err}); remake the cache") from None
        return self._open[path]

    def rows(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """The cache's arrays of update ``step`` for the rows [lo, hi) (possibly from several blocks)."""
        parts: list[dict[str, np.ndarray]] = []
        row = lo
        while row < hi:
            f, b_lo, b_hi = self._chunk(step, row)
            stop = min(hi, b_hi)
            names = [n for n in FIELDS if f"{step}/{n}" in f.keys()]
            parts.append({n: f.get_slice(f"{step}/{n}")[row - b_lo:stop - b_lo] for n in names})
            row = stop
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def contiguous_steps(chunks: list[Mapping[str, Any]]) -> int:
    """n such that the chunks hold the updates 0..n-1 without a gap."""
    n = 0
    for c in sorted(chunks, key=lambda c: c["first"]):
        if c["first"] != n:
            break
        n = c["last"] + 1
    return n


def batch_arrays(cached: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cache's arrays of a batch as the step reads them (``objective.CACHE_INPUTS``, float32)."""
    ids = cached["top_k_ids"].astype(np.float32)
    out = {"teacher_top_k": np.concatenate([ids, cached["top_k_logits"].astype(np.float32)], axis=-1)}
    if "hidden" in cached:
        out["teacher_hidden"] = cached["hidden"].astype(np.float32)
    for field in OUTPUT_FIELDS:
        if field in cached:  # [b, layers stored, ...]
            out[f"teacher_{field}"] = cached[field].astype(np.float32)
    return out


class CachedBatches:
    """The host batches of a run, each with its update's teacher outputs from a ``TeacherCache``.

    batches: the run's iterator of this process's rows (e.g. ``ShardedBatches``); rows: which rows of
    the global batch those are; start_step: the update the next batch is for (the resumed step).
    Loader state (``get_state`` / ``set_state``) is the wrapped iterator's: the update count is the
    step the run restores, so a resumed run reads the cache where it left off.
    """

    def __init__(self, batches: Any, cache: TeacherCache, rows: slice, start_step: int):
        self.batches, self.cache, self.rows, self.step = batches, cache, rows, start_step

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.batches))
        cached = self.cache.rows(self.step, self.rows.start, self.rows.stop)
        ids = np.asarray(batch["input_ids"])
        if cached["input_ids"].shape != ids.shape or not np.array_equal(cached["input_ids"].astype(ids.dtype), ids):
            raise UserError(f"the loader's batch of update {self.step} differs from the one teacher cache "
                            f"{self.cache.path} was made from (same data, loader and seed expected); remake the "
                            "cache for this run")
        batch.update(batch_arrays(cached))
        self.step += 1
        return batch

    def get_state(self) -> Any:
        return self.batches.get_state()

    def set_state(self, state: Any) -> None:
        self.batches.set_state(state)
