"""A task's examples as model inputs: tokenized once, then fed in batches that resume exactly.

``encode`` runs the model's tokenizer over every example (pairs as ``[CLS] a [SEP] b [SEP]`` with
token types for BERT, ``<s> a </s></s> b </s>`` for RoBERTa, GPT-2's tokenizer concatenates), padded
to ``max_len`` as transformers' ``run_glue`` does by default; ``classifier_tokenizer`` gives GPT-2's
tokenizer, which has no padding token, the classifier's ``pad_token_id``.
``ArrayBatches`` cuts one data shard of those arrays into batches: shuffled with a seed per epoch
for training, in order for evaluation, the last batch filled with ``weight = 0`` rows so that every
batch has the same shape. Its state (epoch, position) is two integers, saved with the checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.finetune.tasks import Examples
from jaxdistil.models import ModelConfig
from jaxdistil.models.classification import family_of

Arrays = dict[str, np.ndarray]


def classifier_tokenizer(tokenizer_dir: str, cfg: ModelConfig) -> Any:
    """The transformers tokenizer of a classifier of ``cfg``: a GPT-2's pads with the config's
    ``pad_token_id`` (the id its classifier reads padding from), whatever the tokenizer's own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if family_of(cfg) == "gpt2" and cfg.pad_token_id is not None and tokenizer.pad_token_id != cfg.pad_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(cfg.pad_token_id))
    return tokenizer


def encode(tokenizer: Any, examples: Examples, max_len: int, token_types: bool) -> Arrays:
    """{input_ids, attention_mask[, token_type_ids], label, weight} arrays over the examples."""
    if len(examples) == 0:
        raise UserError("the task has an empty split; give it examples")
    columns = list(zip(*examples.texts))
    enc = tokenizer(*columns, truncation=True, max_length=max_len, padding="max_length",
                    return_token_type_ids=token_types, return_tensors="np")
    out = {"input_ids": np.asarray(enc["input_ids"], np.int32),
           "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    if token_types:
        out["token_type_ids"] = np.asarray(enc["token_type_ids"], np.int32)
    out["label"] = np.asarray(examples.labels)
    out["weight"] = np.ones(len(examples), np.float32)
    return out


class ArrayBatches:
    """Batches of ``rows`` examples from shard ``index`` of ``count`` of ``arrays``.

    train: shuffled per epoch with ``np.random.default_rng([seed, epoch])``, repeated for
    ``epochs`` passes (then StopIteration); the last batch of a pass is padded with weight-0 rows.
    Otherwise one pass in order. A shard is every ``count``-th example, so shards are disjoint and
    the global batches depend only on the number of shards.
    """

    def __init__(self, arrays: Arrays, rows: int, index: int = 0, count: int = 1, *, train: bool = True,
                 seed: int = 0, epochs: int = 1, min_batches: int = 0):
        self.arrays = {k: v[index::count] for k, v in arrays.items()}
        self.n = len(self.arrays["weight"])
        self.rows, self.train, self.seed, self.epochs = rows, train, seed, epochs
        self.min_batches = min_batches
        self.epoch, self.pos, self.emitted = 0, 0, 0

    def batches_per_epoch(self) -> int:
        return -(-self.n // self.rows)

    def __iter__(self) -> ArrayBatches:
        return self

    def _order(self) -> np.ndarray:
        if not self.train:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def _padding(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((self.rows, *v.shape[1:]), v.dtype) for k, v in self.arrays.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            if not self.train or self.epoch >= self.epochs:
                if self.emitted < self.min_batches:  # all-padding batches keep shards in step
                    self.emitted += 1
                    return self._padding()
                raise StopIteration
        take = self._order()[self.pos : self.pos + self.rows]
        self.pos += len(take)
        self.emitted += 1
        batch = {k: v[take] for k, v in self.arrays.items()}
        if len(take) < self.rows:
            pad = self._padding()
            for k in batch:
                pad[k][: len(take)] = batch[k]
            batch = pad
        return batch

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "emitted": self.emitted}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.emitted = int(state["epoch"]), int(state["pos"]), int(state.get("emitted", 0))
