"""``predict`` equals transformers' text-classification pipeline (label and score within 1e-4), texts
and sentence pairs, for BERT, RoBERTa and GPT-2 classifiers; bad input is one line."""

from __future__ import annotations

import pytest
from classifiers import hf_model
from cli_errors import one_line_error

from jaxdistil.finetune.predict import predict
from jaxdistil.hf import export_model, load_model

torch = pytest.importorskip("torch")

LABELS = dict(num_labels=3, id2label={0: "neg", 1: "mid", 2: "pos"}, label2id={"neg": 0, "mid": 1, "pos": 2})
TEXTS = {
    # Words of each tokenizer's vocabulary (the golden run's WordPiece; families.TEXTS for the BPE).
    "Bert": (["the a of to and", "which there from", "it that for on with"], [("the a", "of to"), ("which", "it is")]),
    "Roberta": (["The quick brown fox", "a small student model", "layer by layer."],
                [("The teacher", "a student"), ("Python's library", "ships modules for files")]),
    "GPT2": (["The quick brown fox", "a small student model", "layer by layer."],
             [("The teacher", " a student")]),
}


@pytest.mark.parametrize("family", list(TEXTS))
def test_predict_equals_the_text_classification_pipeline(tmp_path, family):
    from transformers import pipeline

    directory = hf_model(tmp_path / "m", f"{family}ForSequenceClassification", **LABELS)
    report = export_model(directory, tmp_path / "exported")
    assert report.verified
    classify = pipeline("text-classification", model=str(tmp_path / "exported"), device="cpu")
    texts, pairs = TEXTS[family]
    ours = predict(load_model(tmp_path / "exported"), texts + pairs)
    theirs = classify(texts) + [classify({"text": a, "text_pair": b}) for a, b in pairs]
    assert len({r["label"] for r in theirs}) > 1 or len({round(r["score"], 3) for r in theirs}) > 1
    for a, b in zip(ours, theirs):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-4, (a, b)
    # The transformers directory itself (not only our export of it) predicts the same, alone or in a batch.
    for a, b in zip(predict(load_model(directory), pairs), ours[len(texts):]):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-6)



def test_bad_input_is_one_line(tmp_path, capsys):
    directory = hf_model(tmp_path / "m", "BertForSequenceClassification", num_labels=2)
    line = one_line_error(capsys, ["predict", "--model", str(directory), "one", "two", "three"])
    assert "3 texts given" in line and "one pair" in line
    line = one_line_error(capsys, ["predict", "--model", str(tmp_path / "nope"), "a text"])
    assert "does not exist" in line and "Hugging Face Hub" not in line
    line = one_line_error(capsys, ["predict", "--model", str(hf_model(tmp_path / "lm", "BertForMaskedLM")), "a text"])
    assert "not a fine-tuned classifier" in line
