"""``predict`` equals transformers' text-classification pipeline."""

from __future__ import annotations

import pytest
from classifiers import hf_model

from jaxdistil.finetune.predict import predict
from jaxdistil.hf import export_model, load_model

torch = pytest.importorskip("torch")


def test_predict_equals_the_text_classification_pipeline(tmp_path):
    from transformers import pipeline

    directory = hf_model(tmp_path / "m", "BertForSequenceClassification", num_labels=3,
                         id2label={0: "neg", 1: "mid", 2: "pos"}, label2id={"neg": 0, "mid": 1, "pos": 2})
    report = export_model(directory, tmp_path / "exported")
    assert report.verified
    classify = pipeline("text-classification", model=str(tmp_path / "exported"), device="cpu")
    texts = ["the a of to and", "which there from", "it that for on with"]
    ours = predict(load_model(tmp_path / "exported"), texts)
    theirs = classify(texts)
    for a, b in zip(ours, theirs):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-4, (a, b)
    pair = predict(load_model(directory), [("the a", "of to")])[0]
    assert pair["label"] in ("neg", "mid", "pos")
