"""Held-out masked-LM evaluation: sums turned into loss / perplexity / accuracy, the fixed per-batch
masks, the training loop's evaluator (teacher scored once), and a saved model's loss against the same
model in transformers on the same masked batches."""

from __future__ import annotations

import math
import random

import jax
import numpy as np
import pytest

from jaxdistil.data import loader as loader_lib
from jaxdistil.data.corpus import SourceOptions
from jaxdistil.data.manifest import load_manifest, mask_token_id, tokenizer_dir
from jaxdistil.data.masking import mask_tokens
from jaxdistil.data.prepare import PrepareConfig, prepare
from jaxdistil.distill import evaluation as ev
from jaxdistil.errors import UserError


def test_metrics_from_sums():
    out = ev.metrics_from_sums({"mlm_sum": 30.0, "mlm_rows": 10.0, "mlm_correct": 4.0, "tokens": 70.0,
                                "baseline_correct": 1.0})
    assert out == {"loss": 3.0, "perplexity": pytest.approx(math.exp(3.0)), "accuracy": 0.4, "masked_tokens": 10.0,
                   "tokens": 70.0, "baseline_accuracy": 0.1}
    with pytest.raises(UserError, match="no maskable token"):
        ev.metrics_from_sums({"mlm_sum": 0.0, "mlm_rows": 0.0, "mlm_correct": 0.0, "tokens": 0.0})


def test_evaluate_params_masks_batch_i_with_its_own_fixed_key():
    keys = []

    def eval_step(params, batch, weights, key):
        keys.append(np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                               else key))
        return {"mlm_sum": np.float32(2.0), "mlm_rows": np.float32(1.0), "mlm_correct": np.float32(1.0),
                "tokens": np.float32(4.0)}

    batches = [{"input_ids": np.zeros((1, 4), np.int32)}] * 5
    weights = jax.device_put(np.ones(8, np.float32))
    out = ev.evaluate_params(eval_step, None, batches, weights, lambda b: b, max_batches=3, seed=7)
    assert out["loss"] == 2.0 and out["masked_tokens"] == 3.0
    want = [np.asarray(jax.random.fold_in(jax.random.PRNGKey(7), i)) for i in range(3)]
    np.testing.assert_array_equal(np.stack(keys), np.stack(want))
    with pytest.raises(UserError, match="gave no batch"):
        ev.evaluate_params(eval_step, None, [], weights, lambda b: b)


class FakeHeldOut:
    def __init__(self):
        self.calls = []

    def score(self, params, which="student", mask_only=False):
        self.calls.append((which, mask_only))
        base = {"loss": 1.0 if which == "student" else 0.5, "perplexity": 2.0, "accuracy": 0.3, "masked_tokens": 9.0}
        return {**base, "baseline_accuracy": 0.05} if mask_only else base


def test_evaluator_scores_the_teacher_once():
    held = FakeHeldOut()
    evaluator = ev.HeldOutEvaluator(held, teacher_params="teacher", mask_only=True)

    class State:
        params = "student"

    first, second = evaluator(State()), evaluator(State())
    assert first["teacher_loss"] == 0.5 and first["student_loss"] == 1.0 and first["student_mask_baseline"] == 0.05
    assert not any(k.startswith("teacher_") for k in second)
    assert held.calls.count(("teacher", False)) == 1
    assert evaluator.report(4, second) == "step 4: held-out MLM loss 1.0000, perplexity 2.00, accuracy 0.3000 (teacher 0.3000)"


torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_saved_model_loss_equals_transformers(tmp_path):
    """``evaluate_model`` of a random BertForMaskedLM directory: its loss and accuracy equal
    transformers' on the same masked held-out batches (masks drawn as the evaluation draws them)."""
    from jaxdistil.selfcheck import save_random_hf_model

    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was by this be are from at or an".split()
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(12, 30)))
                                              for _ in range(200)) + "\n")
    prepare(PrepareConfig([str(tmp_path / "c.txt")], "train:120", tmp_path / "data", max_len=32, workers=1,
                          options=SourceOptions(holdout=0.2)), progress=False, log=lambda *a: None)
    manifest = load_manifest(tmp_path / "data")
    vocab = manifest["tokenizer"]["vocab_size"]
    model_dir = save_random_hf_model("BertForMaskedLM", tmp_path / "bert", vocab_size=vocab, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    import shutil

    shutil.copytree(tokenizer_dir(manifest), model_dir, dirs_exist_ok=True)
    got = ev.evaluate_model(str(model_dir), str(tmp_path / "data"), batch_size=8, max_len=32, max_batches=3)

    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    weights = ev.eval_token_weights(manifest)
    batches = loader_lib.eval_batches(manifest, ev.eval_loader_config(8, 32))
    total, rows, correct = 0.0, 0, 0
    for i, batch in zip(range(3), batches):
        ids, labels = mask_tokens(jax.random.fold_in(jax.random.PRNGKey(ev.EVAL_SEED), i), batch["input_ids"],
                                  batch["attention_mask"], weights, mask_token_id(manifest), vocab, ev.eval_masking())
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                        attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long)).logits
        lab = torch.tensor(np.asarray(labels), dtype=torch.long)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), lab.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        keep = lab != -100
        rows += int(keep.sum())
        correct += int((logits.argmax(-1)[keep] == lab[keep]).sum())
    assert got["masked_tokens"] == rows > 0
    assert got["loss"] == pytest.approx(total / rows, rel=1e-5)
    assert got["accuracy"] == pytest.approx(correct / rows)
