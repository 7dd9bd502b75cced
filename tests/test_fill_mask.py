"""`jaxdistil fill-mask` gives transformers' pipeline("fill-mask") top-k, on HF and Flax directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from families import hf_model, roberta_tokenizer

from jaxdistil import cli
from jaxdistil.errors import UserError
from jaxdistil.fill_mask import fill_mask, load_tokenizer
from jaxdistil.hf.export import export_hf
from jaxdistil.hf.load import load_model, save_flax_model
from jaxdistil.selfcheck import save_random_hf_model

torch = pytest.importorskip("torch", reason="the reference is transformers' PyTorch fill-mask pipeline")
transformers = pytest.importorskip("transformers")

WORDS = ("the of and to in is was a capital city france paris germany berlin river country "
         "large small old new north south east west king queen man woman student teacher model "
         "learns from big data . , ! ? it he she they we").split()
TEXTS = ["paris is the [MASK] of france .", "the [MASK] learns from the [MASK] teacher ."]


def make_tokenizer(directory):
    """A small WordPiece tokenizer (BertTokenizerFast) saved with save_pretrained."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *pieces]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(str(directory))
    assert len(tokenizer) == len(vocab) and tokenizer.tokenize("paris is big") == ["paris", "is", "big"]
    return len(vocab)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fill")
    vocab = make_tokenizer(root / "tok")
    out = {}
    for name, arch, cfg in [
        ("bert", "BertForMaskedLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48)),
        ("distilbert", "DistilBertForMaskedLM", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48)),
    ]:
        directory = save_random_hf_model(arch, root / name, seed=7, vocab_size=vocab,
                                         max_position_embeddings=32,
                                         initializer_range=0.3, **cfg)
        for f in (root / "tok").iterdir():
            (directory / f.name).write_bytes(f.read_bytes())
        out[name] = directory
    return out


def pipeline_top_k(directory, text, k=5):
    from transformers import pipeline

    result = pipeline("fill-mask", model=str(directory), device="cpu")(text, top_k=k)
    return result if isinstance(result[0], list) else [result]  # one list per mask


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_top5_equals_pipeline(models, kind):
    loaded = load_model(models[kind])
    tokenizer = load_tokenizer(loaded.tokenizer_dir, str(models[kind]))
    ours = fill_mask(loaded, tokenizer, TEXTS, top_k=5)
    for text, per_mask in zip(TEXTS, ours):
        theirs = pipeline_top_k(models[kind], text)
        assert len(per_mask) == len(theirs) == text.count("[MASK]")
        for a, b in zip(per_mask, theirs):
            assert [p["token"] for p in a] == [p["token"] for p in b]
            assert [p["token_str"] for p in a] == [p["token_str"] for p in b]
            assert [p["sequence"] for p in a] == [p["sequence"] for p in b]
            assert [p["score"] for p in a] == pytest.approx([p["score"] for p in b], rel=1e-4, abs=1e-6)
    assert max(p["score"] for p in ours[0][0]) > 2.0 / loaded.config.vocab_size  # a peaked, not flat, guess


@pytest.mark.slow
def test_cli_on_hf_and_flax_dirs(models, tmp_path, capsys):
    flax_dir = tmp_path / "flax"
    loaded = load_model(models["distilbert"])
    save_flax_model(loaded.config, loaded.params, flax_dir, tokenizer_dir=loaded.tokenizer_dir)
    reference = pipeline_top_k(models["distilbert"], TEXTS[0])[0]
    expected = [p["token_str"] for p in reference]
    for directory in (models["distilbert"], flax_dir):
        capsys.readouterr()
        assert cli.main(["fill-mask", "--model", str(directory), "--json", TEXTS[0]]) == 0
        result = json.loads(capsys.readouterr().out)
        assert [p["token_str"] for p in result[0]] == expected
    assert cli.main(["fill-mask", "--model", str(flax_dir), "--top-k", "3", TEXTS[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokenizer = load_tokenizer(loaded.tokenizer_dir, "x")
    shown = [p["token_str"] or tokenizer.convert_ids_to_tokens(p["token"]) for p in reference[:3]]
    assert lines[0] == TEXTS[0] and len(lines) == 4
    assert [line.split()[1] for line in lines[1:]] == shown
    assert float(lines[1].split()[2]) == pytest.approx(reference[0]["score"], abs=1e-4)


def test_errors(models, tmp_path, capsys):
    loaded = load_model(models["bert"])
    tokenizer = load_tokenizer(loaded.tokenizer_dir, "x")
    with pytest.raises(UserError, match=r"no \[MASK\] token"):
        fill_mask(loaded, tokenizer, "no mask here")
    directory = save_random_hf_model("BertModel", tmp_path / "enc", vocab_size=40, hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    assert cli.main(["fill-mask", "--model", str(directory), "a [MASK] b"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    with pytest.raises(UserError, match="no trained MLM head"):
        fill_mask(load_model(directory), tokenizer, TEXTS[0])


@pytest.mark.slow
def test_roberta_fill_mask_equals_the_pipeline(tmp_path):
    tok = roberta_tokenizer(tmp_path / "bpe")
    hf = hf_model("roberta", vocab=len(tok), std=0.5, pad_token_id=tok.pad_token_id)
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    export_hf(loaded.config, loaded.params, tmp_path / "out", tokenizer_dir=tmp_path / "hf")
    texts = ["The quick brown <mask> jumps over the lazy dog.", "A student learns from the <mask> targets."]
    pipe = transformers.pipeline("fill-mask", model=str(tmp_path / "out"), tokenizer=str(tmp_path / "out"),
                                 top_k=5, device="cpu")
    for text in texts:
        assert cli.main(["fill-mask", "--model", str(tmp_path / "out"), "--json", text]) == 0
    from jaxdistil.fill_mask import fill_mask, load_tokenizer

    ours = fill_mask(load_model(tmp_path / "out"), load_tokenizer(str(tmp_path / "out"), "out"), texts, top_k=5)
    for text, got in zip(texts, ours):
        want = pipe(text)
        assert [p["token"] for p in got[0]] == [p["token"] for p in want]
        assert [p["token_str"] for p in got[0]] == [p["token_str"] for p in want]
        assert [p["sequence"] for p in got[0]] == [p["sequence"] for p in want]
        np.testing.assert_allclose([p["score"] for p in got[0]], [p["score"] for p in want], rtol=1e-4)
