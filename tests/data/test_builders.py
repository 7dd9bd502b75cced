"""The tfds builders of local text: every document lands in exactly one split, by a hash of its
text (the same document always in the same split), readable through tfds' random-access source."""

from __future__ import annotations

import pytest

from jaxdistil.data import corpus
from jaxdistil.data.builders import build_local_corpus
from jaxdistil.errors import UserError


def test_local_corpus_splits_by_hash(tmp_path):
    docs = [f"document number {i} with a few words" for i in range(200)]
    (tmp_path / "a.txt").write_text("\n".join(docs[:120]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(docs[120:]) + "\n\n")
    builder = build_local_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "tfds", holdout=0.2)
    got = {}
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        got[split] = [source[i]["text"].decode() for i in range(len(source))]
    assert sorted(got["train"] + got["validation"]) == sorted(docs)
    assert all(corpus.split_of(t, 0.2) == corpus.HELDOUT for t in got["validation"])
    assert 20 <= len(got["validation"]) <= 60  # ~20% of 200


def test_empty_corpus_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="the corpus is empty"):
        build_local_corpus([tmp_path / "empty.txt"], tmp_path / "tfds")
