"""Data preparation: corpus -> tokenizer -> tokenized ArrayRecord shards + manifest (``jaxdistil prepare``).

  prepare(PrepareConfig("builtin:python-docs", "train:8000", "data/pydocs", max_len=128))
  (command: jaxdistil prepare --source builtin:python-docs --tokenizer train:8000 --output data/pydocs)

Steps: read the source as tfds data sources (``corpus.open_text_splits``), load or train the tokenizer
and save it beside the data, then tokenize every split in parallel worker processes. Each worker
turns a block of documents into sequences as the reference does (``[CLS] ... [SEP]``, documents
longer than ``max_len`` cut into chunks each re-wrapped, sequences of <= 11 tokens and those at least
half [UNK] dropped) and writes them to its own ArrayRecord shard; the main process sums the counts.
The manifest (``manifest.py``) is written last.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from jaxdistil.data import corpus, tokenization
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.errors import UserError

MAX_SHORT = 11  # the reference drops sequences of 11 tokens or fewer
UNK_LIMIT = 0.5  # ... and those with at least half [UNK]
# What prepare writes in the output directory; only these are replaced by --force.
OWN_ENTRIES = (
    manifest_lib.MANIFEST_NAME,
    "tokenizer",
    "token_counts.npy",
    corpus.TRAIN,
    corpus.HELDOUT,
    "text",
)
RECORD_OPTIONS = "group_size:1,uncompressed"  # group_size 1: cheap random access for shuffling
STAT_KEYS = ("documents", "long_documents", "chunks", "dropped_short", "dropped_unk", "sequences", "tokens")


def make_sequences(
    ids: Sequence[int], max_len: int, cls_id: int, sep_id: int, unk_id: int, stats: dict[str, int]
) -> list[np.ndarray]:
    """One document's ids (no special tokens) -> kept ``[CLS] ... [SEP]`` sequences (int64 [L]).

    As the reference does (``lm_seqs_dataset.py: divide_into_chunks``): the document is wrapped as
    ``[CLS] ids [SEP]`` first; when that is longer than ``max_len`` it is cut into pieces of
    ``max_len - 2`` tokens and each piece gets the [CLS] / [SEP] it lacks (so the first piece keeps
    its [CLS] and the last its [SEP]: 40 ids at max_len 16 give lengths 15, 16, 15).
    ``stats`` counts long documents, chunks, and the sequences dropped as short or mostly [UNK].
    """
    seq = np.concatenate([[cls_id], np.asarray(ids, dtype=np.int64), [sep_id]]).astype(np.int64)
    if seq.shape[0] > max_len:
        stats["long_documents"] += 1
        body = max_len - 2
        pieces = []
        for start in range(0, seq.shape[0], body):
            piece = seq[start : start + body]
            if piece[0] != cls_id:
                piece = np.concatenate([[cls_id], piece])
            if piece[-1] != sep_id:
                piece = np.concatenate([piece, [sep_id]])
            pieces.append(piece)
    else:
        pieces = [seq]
    kept = []
    for piece in pieces:
        stats["chunks"] += 1
        if piece.shape[0] <= MAX_SHORT:
            stats["dropped_short"] += 1
        elif np.count_nonzero(piece == unk_id) >= UNK_LIMIT * piece.shape[0]:
            stats["dropped_unk"] += 1
        else:
            kept.append(piece)
    return kept


@dataclasses.dataclass
class ShardTask:
    """A block of documents for one worker, and where its shard goes."""

    split: str
    index: int
    texts: list[str]
    read: int  # source examples consumed for this block (progress; >= len(texts) with routing)
    path: str
    tokenizer_file: str
    max_len: int
    special: dict[str, int]
    vocab_size: int
    dtype: str
    count_tokens: bool


_TOKENIZERS: dict[str, Any] = {}
_ENCODE_BLOCK = 256  # documents per encode call: bounds the memory held by Encoding objects


def _worker_init() -> None:
    # Parallelism comes from the worker processes; the tokenizer's own thread pool would fight them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        tok = Tokenizer.from_file(path)
        tok.no_truncation()  # tokenizer.json files often carry a max_length (e.g. 128) and padding
        tok.no_padding()
        _TOKENIZERS[path] = tok
    return _TOKENIZERS[path]


def tokenize_shard(task: ShardTask) -> dict[str, Any]:
    """Worker: tokenize a block of documents and write its kept sequences to one ArrayRecord file.

    Returns {"split", "index", "path" (None when nothing was kept), "stats", "counts" ([V] int64 or
    None), "read"}.
    """
    tok = _tokenizer(task.tokenizer_file)
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["documents"] = len(task.texts)
    sp = task.special
    seqs: list[np.ndarray] = []
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips character offsets
    for start in range(0, len(task.texts), _ENCODE_BLOCK):
        for enc in encode(task.texts[start : start + _ENCODE_BLOCK], add_special_tokens=False):
            seqs.extend(make_sequences(enc.ids, task.max_len, sp["cls"], sp["sep"], sp["unk"], stats))
    counts = None
    path: str | None = None
    if seqs:
        path = task.path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        writer = ArrayRecordWriter(path, RECORD_OPTIONS)
        try:
            for seq in seqs:
                writer.write(seq.astype(task.dtype).tobytes())
        finally:
            writer.close()
        flat = np.concatenate(seqs)
        if flat.max() >= task.vocab_size:
            raise RuntimeError(f"token id {flat.max()} >= vocab size {task.vocab_size}")
        stats["sequences"] = len(seqs)
        stats["tokens"] = int(flat.shape[0])
        if task.count_tokens:
            counts = np.bincount(flat, minlength=task.vocab_size).astype(np.int64)
    return {
        "split": task.split,
        "index": task.index,
        "path": path,
        "stats": stats,
        "counts": counts,
        "read": task.read,
    }


def _claim_output(out: Path, force: bool, log: Callable[[str], None]) -> None:
    """Refuse a directory that already holds data unless --force; --force replaces only what
    prepare writes and leaves anything else there untouched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a directory path")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            if not force:
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise UserError(
                    f"output directory {out} already holds data ({shown}); choose an empty directory "
                    "or pass --force to replace it"
                )
            for name in OWN_ENTRIES:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            others = [e for e in entries if e not in OWN_ENTRIES]
            log(
                f"--force: replacing the prepared data in {out}"
                + (f" (keeping {len(others)} other entries)" if others else "")
            )
    out.mkdir(parents=True, exist_ok=True)


def _docs_per_shard(n_examples: int) -> int:
    # Up to 64 shards keep the workers busy and the progress bar moving; at least 256 documents
    # keep files from being tiny, at most 20k keep a worker's block of text small in memory. Not a
    # function of the worker count, so the output is the same on any machine.
    return int(min(20_000, max(256, -(-n_examples // 64))))


def _tasks(splits: Sequence[corpus.TextSplit], out: Path, template: dict[str, Any]) -> Iterator[ShardTask]:
    for split in splits:
        block = _docs_per_shard(len(split.source))
        n = len(split.source)
        for index, start in enumerate(range(0, n, block)):
            stop = min(n, start + block)
            texts = list(split.texts(start, stop))
            yield ShardTask(
                split=split.name,
                index=index,
                texts=texts,
                read=stop - start,
                path=str(out / split.name / f"{split.name}-{index:05d}.array_record"),
                count_tokens=split.name == corpus.TRAIN,
                **template,
            )


def _run_tasks(tasks: Iterator[ShardTask], workers: int, on_result: Callable[[dict], None]) -> None:
    """Run tasks inline (workers == 1) or in a spawn pool with a bounded number in flight, so a
    corpus larger than memory streams through."""
    if workers <= 1:
        for task in tasks:
            on_result(tokenize_shard(task))
        return
    # spawn, not fork: the parent may hold JAX or tokenizer threads, which fork would corrupt.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(tokenize_shard, (task,)))
            while len(pending) >= 2 * workers:
                on_result(pending.popleft().get())
        while pending:
            on_result(pending.popleft().get())


def _describe(split: str, s: dict[str, int], shards: int) -> str:
    return (
        f"{split}: {s['documents']:,} documents -> {s['sequences']:,} sequences, {s['tokens']:,} tokens in "
        f"{shards} shards ({s['long_documents']:,} long documents cut into chunks; "
        f"{s['chunks']:,} candidate sequences, dropped {s['dropped_short']:,} of <= {MAX_SHORT} tokens and "
        f"{s['dropped_unk']:,} at least half [UNK])"
    )


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What ``prepare`` reads, how it tokenizes, and where it writes.

    source: ``builtin:python-docs``, ``tfds:NAME[/CONFIG]`` or text files/globs (a list for several).
    tokenizer: a Hugging Face tokenizer directory (a teacher's model directory, a prepared data or
      run directory with a ``tokenizer/`` folder) or hub id, or ``train:N`` (WordPiece of N tokens).
    output: the directory to write; refused when it already holds data unless ``force``.
    max_len: longest sequence; longer documents are chunked as the reference does.
    workers: tokenizer processes (default: the CPU count). With more than one, the worker processes
      are *spawned*, so a script calling ``prepare`` must guard its entry point with
      ``if __name__ == "__main__":`` (the ``jaxdistil`` command does).
    lowercase / tokenizer_sample: ``train:N`` only: lower-case the text, documents to train on.
    options: how the source is split (held-out fraction, document mode, tfds splits...).
    """

    source: str | Sequence[str]
    tokenizer: str
    output: str | os.PathLike
    max_len: int = 512
    force: bool = False
    workers: int | None = None
    lowercase: bool = True
    tokenizer_sample: int = 1_000_000
    options: corpus.SourceOptions = corpus.SourceOptions()


def prepare(cfg: PrepareConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize a corpus into ``cfg.output`` (see the module doc); returns the manifest.

    log: where the report lines go (``print`` by default); ``progress`` draws a bar on stderr.
    Raises UserError for bad input (no files match, empty corpus, unknown tfds name, tokenizer
    without vocabulary, output holding data...).
    """
    source, tokenizer, max_len, force = cfg.source, cfg.tokenizer, cfg.max_len, cfg.force
    if max_len < MAX_SHORT + 2:
        raise UserError(f"--max-len must be at least {MAX_SHORT + 2}, got {max_len}")
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, 16))
    spec = corpus.parse_source(source)
    train_size = tokenization.parse_train_spec(tokenizer)
    if spec.kind == "files":
        corpus.expand_files(spec.patterns)  # fail before touching --output when nothing matches
    tok = None if train_size else tokenization.load_tokenizer(tokenizer)  # fail fast on a bad tokenizer
    out = Path(cfg.output).expanduser()

    def open_splits():
        return corpus.open_text_splits(spec, out / "text", cfg.options)

    # A tfds source is opened before --output is touched (a bad name leaves nothing behind); local
    # files and the built-in corpus are written into it, so they come after the check.
    if spec.kind == "tfds":
        splits, source_info = open_splits()
        _claim_output(out, force, log)
    else:
        _claim_output(out, force, log)
        splits, source_info = open_splits()
    train_split = splits[0]
    if len(train_split.source) == 0:
        raise UserError(f"the corpus is empty: {spec.describe()} has no training documents")
    log(f"source {spec.describe()}: " + ", ".join(f"{s.name} {len(s.source):,} examples" for s in splits))

    if train_size:
        n_sample = min(len(train_split.source), cfg.tokenizer_sample)
        log(f"training a WordPiece tokenizer of {train_size:,} tokens on {n_sample:,} documents")
        sample = itertools.islice(train_split.texts(0, n_sample), n_sample)
        tok = tokenization.train_wordpiece(sample, train_size, lowercase=cfg.lowercase, length=n_sample)
    tok_dir = tokenization.save_tokenizer(tok, out / "tokenizer", max_len=max_len)
    tok_info = tokenization.tokenizer_info(tok, tokenizer)
    vocab_size = tok_info["vocab_size"]
    log(f"tokenizer {tokenizer}: {vocab_size:,} tokens ({tok_info['hash'][:19]}), saved to {tok_dir}")
    dtype = "<u2" if vocab_size <= 2**16 else "<i4"

    template = dict(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        max_len=max_len,
        special=tok_info["special_ids"],
        vocab_size=vocab_size,
        dtype=dtype,
    )
    stats = {s.name: dict.fromkeys(STAT_KEYS, 0) for s in splits}
    files: dict[str, dict[int, str]] = {s.name: {} for s in splits}
    counts = np.zeros(vocab_size, np.int64)
    bar = None
    if progress:
        bar = tqdm(
            total=sum(len(s.source) for s in splits),
            desc="tokenize",
            unit="doc",
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def on_result(result: dict[str, Any]) -> None:
        name = result["split"]
        for k, v in result["stats"].items():
            stats[name][k] += v
        if result["path"]:
            files[name][result["index"]] = os.path.relpath(result["path"], out)
        if result["counts"] is not None:
            counts[:] += result["counts"]
        if bar is not None:
            bar.update(result["read"])

    try:
        _run_tasks(_tasks(splits, out, template), workers, on_result)
    finally:
        if bar is not None:
            bar.close()

    if stats[corpus.TRAIN]["sequences"] == 0:
        s = stats[corpus.TRAIN]
        raise UserError(
            f"the corpus is empty after filtering: {s['documents']:,} training documents gave no sequence "
            f"longer than {MAX_SHORT} tokens with under half [UNK]; give more text"
        )
    np.save(out / "token_counts.npy", counts)
    split_entries = {}
    for s in splits:
        log(_describe(s.name, stats[s.name], len(files[s.name])))
        if stats[s.name]["sequences"]:
            split_entries[s.name] = {
                "files": [files[s.name][i] for i in sorted(files[s.name])],
                **stats[s.name],
            }
    manifest = {
        "format": manifest_lib.FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source_info,
        "tokenizer": tok_info,
        "tokenizer_dir": "tokenizer",
        "max_len": max_len,
        "dtype": dtype,
        "filters": {"drop_max_tokens": MAX_SHORT, "drop_unk_fraction": UNK_LIMIT},
        "token_counts": "token_counts.npy",
        "splits": split_entries,
    }
    tmp = out / (manifest_lib.MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / manifest_lib.MANIFEST_NAME)  # atomic: a manifest is always complete
    log(f"wrote {out}")
    manifest["data_dir"] = str(out)
    return manifest
