"""Text sources for ``jaxdistil prepare``: local files, tensorflow-datasets, the built-in corpus.

Every source ends up as one or two random-access *text data sources* (``len`` + ``__getitem__``
returning an example dict), one per split:

* ``builtin:python-docs``: docstrings of the Python standard library installed on this machine
  plus the language-reference topics of ``pydoc_data``; offline, deterministic, a few MB.
* local files or globs (``corpus/*.txt``; optional ``file:`` prefix): one document per line, or
  documents separated by blank lines (``doc_mode="blank"``).
* ``tfds:NAME`` (``tfds:wikipedia/20230601.en``, ``tfds:c4/en``), read with ``tfds.data_source``
  (ArrayRecord random access, no TensorFlow).

The first two are materialised by the tensorflow-datasets builders of ``jaxdistil.data.builders``,
so the tokenizer reads every source through the same tfds data-source interface. Held-out documents
are picked by a hash of their text, so the split does not depend on file order and duplicated
documents never straddle it.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import hashlib
import inspect
import os
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxdistil.errors import UserError

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
TRAIN, HELDOUT = "train", "validation"

# Standard-library folders without documentation worth learning from.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_MIN_DOC_CHARS = 40  # one-word docstrings ("Return self.") teach nothing


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source``: kind is ``builtin``, ``files`` or ``tfds``."""

    kind: str
    name: str  # builtin corpus name, tfds dataset name (with config), or ""
    patterns: tuple[str, ...] = ()  # for kind == "files"

    def describe(self) -> str:
        if self.kind == "files":
            return " ".join(self.patterns)
        return f"{self.kind}:{self.name}"


# "kind:" at the start of a --source value (two letters at least: "C:" is a Windows drive).
_SOURCE_KIND = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def parse_source(spec: str | Sequence[str]) -> SourceSpec:
    """Parse ``--source`` values: ``builtin:python-docs``, ``tfds:NAME[/CONFIG]``, or file globs."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or any(not s.strip() for s in specs):
        raise UserError("empty --source; pass builtin:python-docs, tfds:NAME or text files/globs")
    first = specs[0].strip()
    if first.startswith(("builtin:", "tfds:")):
        if len(specs) > 1:
            raise UserError(f"--source {first} cannot be combined with other sources; pass one")
        kind, name = first.split(":", 1)
        if kind == "builtin":
            if first != BUILTIN_PYTHON_DOCS:
                raise UserError(
                    f"unknown built-in corpus {first!r}; the built-in corpus is {BUILTIN_PYTHON_DOCS}"
                )
            return SourceSpec("builtin", "python-docs")
        if not name:
            raise UserError("--source tfds: needs a dataset name, e.g. tfds:wikipedia/20230601.en")
        return SourceSpec("tfds", name)
    patterns = tuple(s.strip().removeprefix("file:") for s in specs)
    for p in patterns:
        if p.startswith(("builtin:", "tfds:")):
            raise UserError(f"--source {p} cannot be combined with local files; pass one kind of source")
        kind = _SOURCE_KIND.match(p)
        if kind and not glob.glob(os.path.expanduser(p)):  # "files:x.txt" is not a kind (a file of that name is fine)
            raise UserError(f"--source {p}: unknown source kind '{kind.group(1)}:'; pass text files or globs "
                            "('corpus/*.txt', optionally file:PATH), builtin:python-docs or tfds:NAME")
    return SourceSpec("files", "", patterns)


def expand_files(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths/globs (``**`` recursive), sorted and de-duplicated; directories expand to
    the files below them. Raises UserError when nothing matches."""
    found: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found.update(p for p in path.rglob("*") if p.is_file())
            elif path.is_file():
                found.add(path)
    if not found:
        raise UserError(f"no files match --source {' '.join(patterns)}; check the path or quote the glob")
    return sorted(p.resolve() for p in found)


def iter_file_documents(paths: Sequence[Path], doc_mode: str = "line") -> Iterator[str]:
    """Documents of text files, in file order: one per non-empty line (``line``) or one per
    blank-line-separated paragraph block (``blank``)."""
    if doc_mode not in ("line", "blank"):
        raise UserError(f"unknown document mode {doc_mode!r}; use 'line' or 'blank'")
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            if doc_mode == "line":
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
            else:
                block: list[str] = []
                for line in f:
                    if line.strip():
                        block.append(line.rstrip("\n"))
                    elif block:
                        yield "\n".join(block).strip()
                        block = []
                if block:
                    yield "\n".join(block).strip()


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk's order (and so the corpus) deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.If, ast.Try, ast.With, ast.For, ast.While)


def _documented_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Module, class and function nodes in source order, visiting statements only.

    Docstrings live only on these nodes, so skipping expressions makes this several times faster
    than ``ast.walk``; definitions nested in if/try/with/loop blocks are still found.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED):
            yield node
        children: list[ast.AST] = []
        for field in ("body", "orelse", "finalbody", "handlers"):
            children.extend(getattr(node, field, ()) or ())
        stack.extend(
            c for c in reversed(children) if isinstance(c, (*_DOCUMENTED, *_BLOCKS, ast.ExceptHandler))
        )


def python_docs_documents() -> Iterator[tuple[str, str]]:
    """The built-in corpus: (unique key, text) pairs in a fixed order.

    Docstrings of every module, class and function of the standard library (found by walking its
    source tree in sorted order and parsing with ``ast``, so nothing is imported), then the
    language-reference topics shipped in ``pydoc_data``. Takes a few seconds.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are templates or fail on this Python; skip them
        rel = path.relative_to(root).as_posix()
        for node in _documented_nodes(tree):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOC_CHARS:
                yield f"{rel}:{getattr(node, 'lineno', 0)}:{getattr(node, 'name', '')}", doc
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped-down Python builds drop pydoc_data
        topics = {}
    for name in sorted(topics):
        text = inspect.cleandoc(topics[name])
        if len(text) >= _MIN_DOC_CHARS:
            yield f"pydoc_data.topics:{name}", text


def python_docs_version() -> str:
    """Which Python the built-in corpus came from (recorded in the manifest)."""
    return f"{sys.implementation.name}-{sys.version.split()[0]}"


def heldout_score(text: str) -> float:
    """A uniform number in [0, 1) from the text's hash: documents below ``holdout`` are held out."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_of(text: str, holdout: float) -> str:
    return HELDOUT if heldout_score(text) < holdout else TRAIN


def text_of(example: Any, field: str = "text") -> str:
    """The document text of one data-source example; bytes (tfds' default) or str both work."""
    value = example
    if isinstance(example, dict):
        if field not in example:
            raise UserError(
                f"examples have no text field {field!r} (fields: {', '.join(sorted(example))}); "
                "pass --text-field NAME"
            )
        value = example[field]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise UserError(f"text field {field!r} holds {type(value).__name__}, not text; pass --text-field NAME")


@dataclasses.dataclass
class TextSplit:
    """One split to tokenize: a random-access source and which of its documents belong to it.

    keep: None keeps every document; ``(split, holdout)`` keeps those whose hash routes them to
    ``split`` (used when a tfds dataset has no held-out split of its own).
    """

    name: str
    source: Any  # len() and __getitem__ -> example
    field: str = "text"
    keep: tuple[str, float] | None = None

    def texts(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        stop = len(self.source) if stop is None else stop
        for i in range(start, stop):
            text = text_of(self.source[i], self.field)
            if self.keep is None or split_of(text, self.keep[1]) == self.keep[0]:
                yield text


def open_tfds(name: str, split: str, data_dir: str | None = None, download: bool = True):
    """``tfds.data_source(name, split)`` with errors turned into one-line UserErrors."""
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"unknown tensorflow-datasets dataset {name!r}; see https://www.tensorflow.org/datasets/catalog"
            " for names (e.g. tfds:wikipedia/20230601.en)"
        ) from None
    except (ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read split {split!r} of tfds dataset {name!r}: {first}") from None
    except Exception as err:  # download/preparation failures come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot open tfds dataset {name!r} ({type(err).__name__}: {first}); prepare it with "
            "file_format=array_record or pass --tfds-data-dir where it is prepared"
        ) from None


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How a source is read into splits.

    holdout: fraction of documents held out for evaluation, chosen by text hash (when the source has
      no held-out split of its own).
    doc_mode: local files: one document per line ("line") or per blank-line-separated block ("blank").
    text_field: tfds: the feature holding the text. tfds_split / tfds_eval_split: tfds splits (slicing
    allowed, e.g. "train[:10%]"); tfds_data_dir: where datasets live; download: may tfds download.
    """

    holdout: float = 0.05
    doc_mode: str = "line"
    text_field: str = "text"
    tfds_split: str = "train"
    tfds_eval_split: str | None = None
    tfds_data_dir: str | None = None
    download: bool = True


def open_text_splits(
    spec: SourceSpec, work_dir: str | os.PathLike, options: SourceOptions = SourceOptions()
) -> tuple[list[TextSplit], dict[str, Any]]:
    """The splits to tokenize for a source, and a description for the manifest.

    Local files and the built-in corpus are first written as a tfds dataset (ArrayRecord) under
    ``work_dir``. Returns ([train, held-out (when non-empty)], info).
    """
    from jaxdistil.data import builders  # here: builders imports this module (split_of)

    o = options
    if not 0.0 <= o.holdout < 1.0:
        raise UserError(f"--holdout must be in [0, 1), got {o.holdout}")
    info: dict[str, Any] = {"spec": spec.describe(), "kind": spec.kind, "holdout": o.holdout}
    if spec.kind in ("files", "builtin"):
        if spec.kind == "files":
            paths = expand_files(spec.patterns)
            builder = builders.build_local_corpus(paths, work_dir, doc_mode=o.doc_mode, holdout=o.holdout)
            info.update(files=[str(p) for p in paths], doc_mode=o.doc_mode)
        else:
            builder = builders.build_python_docs(work_dir, holdout=o.holdout)
            info.update(python=python_docs_version())
        sources = builder.as_data_source()
        info["tfds"] = {"name": builder.name, "data_dir": str(builder.data_dir)}
        splits = [TextSplit(name, sources[name]) for name in (TRAIN, HELDOUT) if name in sources]
        return splits, info

    source = open_tfds(spec.name, o.tfds_split, o.tfds_data_dir, o.download)
    info.update(tfds={"name": spec.name, "split": o.tfds_split, "eval_split": o.tfds_eval_split},
                text_field=o.text_field)
    if o.tfds_eval_split:
        heldout = open_tfds(spec.name, o.tfds_eval_split, o.tfds_data_dir, o.download)
        return [TextSplit(TRAIN, source, o.text_field), TextSplit(HELDOUT, heldout, o.text_field)], info
    if o.holdout == 0:
        return [TextSplit(TRAIN, source, o.text_field)], info
    return [
        TextSplit(TRAIN, source, o.text_field, keep=(TRAIN, o.holdout)),
        TextSplit(HELDOUT, source, o.text_field, keep=(HELDOUT, o.holdout)),
    ], info
