"""Issue 7 acceptance 2: a model trained by `jaxdistil train` for a few steps exports, loads with
transformers' AutoModelForMaskedLM and pipeline("fill-mask"), its logits match the Flax model within
1e-4, and the `fill-mask` CLI's top-5 equals the pipeline's top-5 on the same directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxdistil import cli
from jaxdistil.data import prepare
from jaxdistil.hf import files
from jaxdistil.hf.load import load_model
from jaxdistil.hf.load import restore_run_params as restore_params
from jaxdistil.hf.verify import compare_with_transformers, sample_inputs

torch = pytest.importorskip("torch", reason="the exported model is checked with transformers' PyTorch models")

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the a model data token learns from teacher student layer attention mask word sentence small large "
         "fast slow python function class module returns value list string number file path open read write "
         "paris france capital city river").split()
TEXT = "the student [MASK] from the teacher"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step MLM run of a tiny DistilBERT, checkpointed at steps 2 and 4."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, rng.integers(12, 30))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    prepare.prepare(prepare.PrepareConfig(str(root / "corpus.txt"), "train:200", root / "data", max_len=32,
                                          workers=1), progress=False, log=lambda msg: None)
    run = root / "run"
    assert cli.main([
        "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run_dir={run}", f"data.dir={root / 'data'}",
        "train.steps=4", "checkpoint.every=2", "checkpoint.keep=3", "train.eval_every=0", "train.log_every=2",
        "loader.batch_size=8", "loader.max_len=32", "loader.buckets=[32]",
        "student.config={dim: 32, n_layers: 2, n_heads: 4, hidden_dim: 48, max_position_embeddings: 32}",
    ]) == 0
    return run


@pytest.mark.slow
def test_trained_run_exports_and_matches(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    capsys.readouterr()
    assert cli.main(["export", "--run", str(trained_run), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified with transformers: max |logits diff|" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["architectures"] == ["DistilBertForMaskedLM"]
    assert "vocab_projector.weight" not in files.read_state_dict(out)  # tied: transformers re-ties it

    step, cfg, params = restore_params(trained_run)
    assert step == 4
    diffs = compare_with_transformers(out, cfg, params, sample_inputs(out, cfg), mlm=True)
    assert diffs["logits"] <= 1e-4, diffs

    from transformers import pipeline

    reference = pipeline("fill-mask", model=str(out), device="cpu")(TEXT, top_k=5)
    for model_dir in (out, trained_run):  # the exported directory and the run itself
        capsys.readouterr()
        assert cli.main(["fill-mask", "--model", str(model_dir), "--json", TEXT]) == 0
        ours = json.loads(capsys.readouterr().out)[0]
        assert [p["token"] for p in ours] == [p["token"] for p in reference]
        assert [p["token_str"] for p in ours] == [p["token_str"] for p in reference]
        expected = [p["score"] for p in reference]
        assert [p["score"] for p in ours] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_export_an_earlier_step(trained_run, tmp_path):
    assert cli.main(["export", "--run", str(trained_run), "--step", "2", "--output", str(tmp_path / "s2"),
                     "--dtype", "bf16"]) == 0
    _, _, params = restore_params(trained_run, 2)
    loaded = load_model(tmp_path / "s2")
    for a, b in zip(_leaves(loaded.params), _leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b).astype("bfloat16").astype(np.float32))
    assert load_model(trained_run, step=2).step == 2
    args = ["export", "--run", str(trained_run), "--step", "3", "--output", str(tmp_path / "s3")]
    assert cli.main(args) == 2
    assert not (tmp_path / "s3").exists()


def _leaves(tree):
    for key in sorted(tree):
        value = tree[key]
        yield from (_leaves(value) if isinstance(value, dict) else [np.asarray(value)])
