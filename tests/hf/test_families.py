"""RoBERTa and GPT-2 import / export, and a narrow student's run exported without its projection."""

from __future__ import annotations

import json
import random

import jax
import numpy as np
import pytest
from families import hf_model, ragged_batch

from jaxdistil.distill.objective import COS_PROJECTION
from jaxdistil.errors import UserError
from jaxdistil.hf import load_model
from jaxdistil.hf.export import export_hf
from jaxdistil.models import (
    BertConfig,
    build_model,
    init_params,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_export_round_trip_is_bit_exact(kind, tmp_path):
    from safetensors.numpy import load_file

    hf = hf_model(kind, std=0.1)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    report = export_hf(loaded.config, loaded.params, tmp_path / "out")
    assert report.verified and report.max_abs_diff <= 1e-4
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    tied = {"roberta": {"lm_head.decoder.weight", "lm_head.decoder.bias"}, "gpt2": {"lm_head.weight"}}[kind]
    assert set(ours) == set(theirs) - tied
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    # transformers reads it back as the same architecture, tied as it should be.
    back = transformers.AutoModelForMaskedLM if kind == "roberta" else transformers.AutoModelForCausalLM
    again = back.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again) is type(hf)
    ids, mask = ragged_batch(hf.config.vocab_size, 1 if kind == "roberta" else hf.config.eos_token_id)
    with torch.no_grad():
        a = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        b = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_narrow_student_run_exports_without_the_projection(tmp_path):
    """train() with a narrower random student and loss.cos_projection=linear: the checkpoint holds the
    projection, the export and load_model of the run do not."""
    from jaxdistil.data.corpus import SourceOptions
    from jaxdistil.data.manifest import load_manifest, tokenizer_dir
    from jaxdistil.data.prepare import PrepareConfig, prepare
    from jaxdistil.distill.config import config_from_dict
    from jaxdistil.hf import save_flax_model
    from jaxdistil.train import train

    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was by this be are from at".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(14, 30))) for _ in range(120))
    (tmp_path / "corpus.txt").write_text(text + "\n")
    prepare(PrepareConfig([str(tmp_path / "corpus.txt")], "train:200", tmp_path / "data", max_len=32, workers=1,
                          options=SourceOptions(holdout=0.1)), progress=False, log=lambda *a: None)
    manifest = load_manifest(tmp_path / "data")
    vocab = manifest["tokenizer"]["vocab_size"]
    t_cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=32)
    shapes = jax.eval_shape(lambda: init_params(build_model(t_cfg), jax.random.PRNGKey(0)))
    prng = np.random.default_rng(0)
    save_flax_model(t_cfg, jax.tree.map(lambda s: prng.normal(0, 0.1, s.shape).astype(s.dtype), shapes),
                    tmp_path / "teacher", tokenizer_dir=tokenizer_dir(manifest))
    raw = {
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(tmp_path / "teacher")},
        "student": {"init": "random", "config": {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64,
                                                  "max_position_embeddings": 32}},
        "data": {"dir": str(tmp_path / "data")},
        "loader": {"batch_size": 8, "max_len": 32, "buckets": [32], "read_threads": 1, "prefetch": 1},
        "loss": {"cos_projection": "linear"},
        "train": {"steps": 3, "eval_every": -1, "log_every": 1},
        "checkpoint": {"every": 0, "keep": 1, "keep_best": 0},
        "logging": {"progress": False, "peak_tflops": 1.0, "tensorboard": False},
    }
    train(config_from_dict(raw), log=lambda *a: None)
    loaded = load_model(tmp_path / "run")
    assert COS_PROJECTION not in loaded.params and loaded.config.hidden == 32
    report = export_hf(loaded.config, loaded.params, tmp_path / "out", tokenizer_dir=loaded.tokenizer_dir)
    assert report.verified
    # Resuming restores the projection too (the full train state), and the run goes on.
    raw["train"]["steps"] = 4
    result = train(config_from_dict(raw), log=lambda *a: None)
    assert result.step == 4
    # Without the projection, the same widths are a one-line error.
    raw["loss"] = {"cos_projection": "none"}
    raw["run_dir"] = str(tmp_path / "run2")
    with pytest.raises(UserError) as err:
        train(config_from_dict(raw), log=lambda *a: None)
    assert "64" in str(err.value) and "32" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("arch,labels", [("RobertaForSequenceClassification", 3), ("GPT2ForSequenceClassification", 1)],
                         ids=["roberta-3", "gpt2-regression"])
def test_classifier_import_export_round_trip(arch, labels, tmp_path, capsys):
    """A RoBERTa / GPT-2 classifier imported to a Flax directory and exported again: transformers'
    tensors bit for bit, its config fields (architectures, labels, problem type, GPT-2's pad id),
    verified in transformers and loaded by it as the same class with nothing missing."""
    import classifiers
    from safetensors.numpy import load_file

    from jaxdistil import cli

    extra = (dict(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}) if labels == 3
             else dict(problem_type="regression"))
    source = classifiers.hf_model(tmp_path / "hf", arch, num_labels=labels, **extra)
    assert cli.main(["import", "--model", str(source), "--output", str(tmp_path / "flax")]) == 0
    assert cli.main(["export", "--model", str(tmp_path / "flax"), "--output", str(tmp_path / "out")]) == 0
    assert "verified with transformers" in capsys.readouterr().out
    ours, theirs = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(source / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    want = json.loads((source / "config.json").read_text())
    for key in ("architectures", "id2label", "label2id", "pad_token_id"):
        assert config.get(key) == want.get(key), key
    # transformers leaves problem_type null until a loss is computed; we write what it then infers.
    assert config["problem_type"] == (want.get("problem_type") or "single_label_classification")
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True)
    assert type(model).__name__ == arch and not info["missing_keys"] and not info["unexpected_keys"]


def test_gpt2_classifier_without_a_pad_token_is_refused(tmp_path, capsys):
    import classifiers

    from jaxdistil import cli

    source = classifiers.hf_model(tmp_path / "hf", "GPT2ForSequenceClassification", num_labels=2)
    config = json.loads((source / "config.json").read_text())
    config.pop("pad_token_id")
    (source / "config.json").write_text(json.dumps(config))
    assert cli.main(["export", "--model", str(source), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no pad_token_id" in err[0] and '"pad_token_id"' in err[0], err
    assert not (tmp_path / "out").exists()
