"""Sequence classifiers (models.classification) equal transformers' Bert / DistilBert
ForSequenceClassification, classification and regression, sentence pairs, padded rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from classifiers import hf_model, ragged

from jaxdistil.hf import export_model, files, load_model
from jaxdistil.hf.verify import flax_classifier_logits, torch_classifier_logits
from jaxdistil.models.classification import ClassifierHead, family_of

torch = pytest.importorskip("torch")


CASES = [
    ("BertForSequenceClassification", dict(num_labels=3), True),
    ("BertForSequenceClassification", dict(num_labels=1, problem_type="regression"), True),
    ("DistilBertForSequenceClassification", dict(num_labels=2), False),
    ("DistilBertForSequenceClassification", dict(num_labels=1, problem_type="regression"), False),
]


@pytest.mark.parametrize("arch,extra,pairs", CASES, ids=["bert-3", "bert-regression", "distil-2", "distil-regression"])
def test_classifier_parity_with_transformers(tmp_path, arch, extra, pairs):
    directory = hf_model(tmp_path / "m", arch, **extra)
    loaded = load_model(directory)
    assert loaded.head.num_labels == extra["num_labels"]
    assert loaded.head.regression == (extra.get("problem_type") == "regression")
    assert isinstance(loaded.head, ClassifierHead) and family_of(loaded.config) == (
        "bert" if arch.startswith("Bert") else "distilbert")
    ids, mask, types = ragged(0, pairs)
    ours = flax_classifier_logits(loaded.config, loaded.head, loaded.classifier_params(), ids, mask, types)
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
