"""Tasks: GLUE through tfds (mock data), local files."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdistil.finetune.tasks import GLUE, TaskConfig, load_task

torch = pytest.importorskip("torch")


def test_glue_tasks_through_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=9):
        sst2 = load_task(TaskConfig(name="sst2"))
        mrpc = load_task(TaskConfig(name="glue/mrpc"))
        stsb = load_task(TaskConfig(name="tfds:glue/stsb"))
        mnli = load_task(TaskConfig(name="mnli"))
    assert len(sst2.train) == 9 and len(sst2.train.texts[0]) == 1 and sst2.metrics == ("accuracy",)
    assert sst2.num_labels == 2 and sst2.train.labels.dtype == np.int32
    assert len(mrpc.train.texts[0]) == 2 and mrpc.metrics == ("f1", "accuracy")
    assert stsb.regression and stsb.num_labels == 1 and stsb.train.labels.dtype == np.float32
    assert mnli.num_labels == 3 and set(mnli.validation) == {"validation_matched", "validation_mismatched"}
    assert mnli.metrics == ("accuracy_matched", "accuracy_mismatched")


@pytest.mark.parametrize("name", list(GLUE))
def test_glue_labels_are_tfds_own(name, tmp_path):
    """Label names in id order are those of tfds' own builder (its features, known without any
    data); STS-B's label is a float score, no class names."""
    feature = tfds.builder(f"glue/{name}", data_dir=str(tmp_path)).info.features["label"]
    spec = GLUE[name]
    if spec.num_labels == 1:
        assert not isinstance(feature, tfds.features.ClassLabel) and np.dtype(feature.np_dtype).kind == "f" and not spec.labels
    else:
        assert tuple(feature.names) == spec.labels and feature.num_classes == spec.num_labels
