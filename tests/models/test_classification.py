"""Sequence classifiers (models.classification) equal transformers' Bert / DistilBert / Roberta / GPT2
ForSequenceClassification: classification and regression, padded rows, sentence pairs (BERT's
token types), GPT-2's last non-padding token under right and left padding."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from classifiers import hf_model, ragged

from jaxdistil.hf import export_model, files, load_model
from jaxdistil.hf.verify import flax_classifier_logits, torch_classifier_logits
from jaxdistil.models import ConfigError, GPT2Config
from jaxdistil.models.classification import ClassifierHead, build_classifier, family_of, last_token

torch = pytest.importorskip("torch")


CASES = [
    ("BertForSequenceClassification", dict(num_labels=3), "bert"),
    ("BertForSequenceClassification", dict(num_labels=1, problem_type="regression"), "bert"),
    ("DistilBertForSequenceClassification", dict(num_labels=2), "distilbert"),
    ("DistilBertForSequenceClassification", dict(num_labels=1, problem_type="regression"), "distilbert"),
    ("RobertaForSequenceClassification", dict(num_labels=3), "roberta"),
    ("RobertaForSequenceClassification", dict(num_labels=1, problem_type="regression"), "roberta"),
    ("GPT2ForSequenceClassification", dict(num_labels=3), "gpt2"),
    ("GPT2ForSequenceClassification", dict(num_labels=1, problem_type="regression"), "gpt2"),
    # A pad id of its own (<pad>), not <|endoftext|>.
    ("GPT2ForSequenceClassification", dict(num_labels=2, pad_token_id=1), "gpt2"),
]
IDS = ["bert-3", "bert-regression", "distil-2", "distil-regression", "roberta-3", "roberta-regression", "gpt2-3",
       "gpt2-regression", "gpt2-own-pad"]


@pytest.mark.parametrize("arch,extra,family", CASES, ids=IDS)
def test_classifier_parity_with_transformers(tmp_path, arch, extra, family):
    directory = hf_model(tmp_path / "m", arch, **extra)
    loaded = load_model(directory)
    assert loaded.head.num_labels == extra["num_labels"]
    assert loaded.head.regression == (extra.get("problem_type") == "regression")
    assert isinstance(loaded.head, ClassifierHead) and family_of(loaded.config) == family
    cfg = loaded.config
    # BERT reads sentence pairs' token types; GPT-2 gets a left-padded row and a row whose last real
    # token is the pad id (transformers' rule skips it as padding: so must we).
    ids, mask, types = ragged(0, family == "bert", cfg.vocab_size, cfg.padding_id, left=1 if family == "gpt2" else 0)
    if family == "gpt2":
        ids[1, 8] = cfg.pad_token_id
    ours = flax_classifier_logits(cfg, loaded.head, loaded.classifier_params(), ids, mask, types)
    theirs = torch_classifier_logits(directory, ids, mask, types)
    assert ours.shape == theirs.shape == (4, extra["num_labels"])
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    assert float(np.abs(theirs).max()) > 1e-2  # not a vacuous comparison
    # Export round trip: the same tensors, bit for bit, verified in transformers.
    report = export_model(directory, tmp_path / "out")
    assert report.verified and report.max_abs_diff <= 1e-4
    a, b = files.read_state_dict(directory), files.read_state_dict(tmp_path / "out")
    for name, value in b.items():
        np.testing.assert_array_equal(value, a[name], err_msg=name)
    assert set(b) == {k for k in a if not k.endswith("position_ids")}
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == [arch] and len(exported["id2label"]) == extra["num_labels"]


def test_last_token_is_transformers_rule():
    """The rightmost id that is not the pad id, for right and left padding; all-pad rows give 0."""
    pad = 7
    ids = np.array([[3, 4, 5, pad, pad], [pad, pad, 3, 4, 5], [3, pad, 4, pad, pad], [pad] * 5, [3, 4, 5, 6, 8]])
    t = torch.as_tensor(ids)
    want = (torch.arange(5) * (t != pad).int()).argmax(-1)  # GPT2ForSequenceClassification's lines
    np.testing.assert_array_equal(np.asarray(last_token(jnp.asarray(ids), pad)), want.numpy())


def test_gpt2_without_a_pad_token_is_refused():
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=49, eos_token_id=49)
    with pytest.raises(ConfigError, match=r"no pad_token_id.*model_config.pad_token_id=49"):
        build_classifier(cfg, ClassifierHead(num_labels=2))
