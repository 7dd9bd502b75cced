"""tensorflow-datasets builders that materialise local text and the built-in corpus as ArrayRecord.

With these, every source reaches the tokenizer as a tfds random-access data source, the same
interface as ``tfds.data_source("wikipedia/...")``. Each builder writes two splits, ``train`` and
``validation`` (held out by a hash of the document text, see ``corpus.split_of``); the held-out
split is left out when it would be empty, because tfds refuses empty splits.

Examples are ``{"text": <utf-8 bytes>}``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from jaxdistil.data import corpus
from jaxdistil.errors import UserError

_FEATURES = {"text": tfds.features.Text()}


class _TextCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A text corpus with a hash-based held-out split, from a re-iterable document stream."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds looks for a checksums file next to the builder's source; we download nothing, and
        # its lookup needs the optional ``importlib_resources`` package, so report no code path.
        return None

    def __init__(self, *, documents: Callable[[], Iterable[str]], holdout: float, description: str, **kwargs):
        # ``documents`` is called once per pass (a counting pass, then one pass per split), so
        # local files are streamed rather than held in memory.
        self._documents = documents
        self._holdout = holdout
        self._description = description
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=tfds.features.FeaturesDict(dict(_FEATURES)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        counts = {corpus.TRAIN: 0, corpus.HELDOUT: 0}
        for text in self._documents():
            counts[corpus.split_of(text, self._holdout)] += 1
        if counts[corpus.TRAIN] == 0:
            raise UserError(
                f"the corpus is empty ({self._description}: {counts[corpus.HELDOUT]} documents, "
                "none for training); give files with text or lower --holdout"
            )
        return {name: self._generate_examples(name) for name, n in counts.items() if n > 0}

    def _generate_examples(self, split: str = corpus.TRAIN) -> Iterator[tuple[str, dict]]:
        for index, text in enumerate(self._documents()):
            if corpus.split_of(text, self._holdout) == split:
                yield str(index), {"text": text}


class LocalTextCorpus(_TextCorpusBuilder):
    """Local text files: one document per line or per blank-line-separated block."""


class PythonDocsCorpus(_TextCorpusBuilder):
    """Docstrings and reference topics of the Python standard library on this machine."""


def _prepare(builder: tfds.core.GeneratorBasedBuilder) -> tfds.core.GeneratorBasedBuilder:
    tfds.display_progress_bar(False)  # prepare draws its own progress bar
    builder.download_and_prepare()
    return builder


def build_local_corpus(
    paths: Sequence[Path], data_dir: str | os.PathLike, *, doc_mode: str = "line", holdout: float = 0.05
) -> LocalTextCorpus:
    """Write local text files as the tfds dataset ``local_text_corpus`` under ``data_dir``."""
    paths = [Path(p) for p in paths]

    def documents() -> Iterator[str]:
        return corpus.iter_file_documents(paths, doc_mode)

    builder = LocalTextCorpus(
        documents=documents,
        holdout=holdout,
        description=f"{len(paths)} local text file(s), doc_mode={doc_mode}",
        data_dir=os.fspath(data_dir),
        file_format="array_record",
    )
    return _prepare(builder)


def build_python_docs(data_dir: str | os.PathLike, *, holdout: float = 0.05) -> PythonDocsCorpus:
    """Write the built-in corpus (``builtin:python-docs``) as a tfds dataset under ``data_dir``."""
    docs = [text for _, text in corpus.python_docs_documents()]  # ~2 MB: collect once, reuse per pass
    builder = PythonDocsCorpus(
        documents=lambda: iter(docs),
        holdout=holdout,
        description=f"Python standard library documentation ({corpus.python_docs_version()})",
        data_dir=os.fspath(data_dir),
        file_format="array_record",
    )
    return _prepare(builder)
