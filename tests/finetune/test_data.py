"""A task's examples as arrays: the tokenizer's own encoding, shards that split the examples
disjointly, per-epoch shuffles, padding rows of weight 0, and a resumed iterator that continues
exactly."""

from __future__ import annotations

import numpy as np
import pytest
from classifiers import TOKENIZER

from jaxdistil.errors import UserError
from jaxdistil.finetune.data import ArrayBatches, encode
from jaxdistil.finetune.tasks import Examples


def arrays(n=11):
    return {"input_ids": np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32),
            "label": np.arange(n) % 2, "weight": np.ones(n, np.float32)}


def test_encode_equals_the_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    ex = Examples([("the a of", "to and"), ("in is it", "that")], np.array([1, 0], np.int32))
    out = encode(tok, ex, 12, token_types=True)
    want = tok(["the a of", "in is it"], ["to and", "that"], truncation=True, max_length=12, padding="max_length")
    np.testing.assert_array_equal(out["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(out["token_type_ids"], want["token_type_ids"])
    assert out["weight"].tolist() == [1.0, 1.0] and out["label"].tolist() == [1, 0]
    with pytest.raises(UserError, match="empty split"):
        encode(tok, Examples([], np.zeros(0, np.int32)), 12, True)


def test_shards_epochs_padding_and_resume():
    data = arrays()
    shards = [list(ArrayBatches(data, 2, i, 3, train=False)) for i in range(3)]
    seen = sorted(int(x) for s in shards for b in s for x, w in zip(b["input_ids"][:, 0], b["weight"]) if w)
    assert seen == list(range(11))  # every example once, across disjoint shards
    last = shards[2][-1]
    assert last["weight"].tolist() == [1.0, 0.0]  # shard 2 holds 3 examples: its last batch is padded
    train = ArrayBatches(data, 4, seed=5, epochs=2)
    first = [next(train)["input_ids"][:, 0].tolist() for _ in range(3)]
    order = np.random.default_rng([5, 0]).permutation(11)
    assert sum(first, [])[:11] == order.tolist()
    state = train.get_state()
    rest = [b["input_ids"][:, 0].tolist() for b in train]
    again = ArrayBatches(data, 4, seed=5, epochs=2)
    again.set_state(state)
    assert [b["input_ids"][:, 0].tolist() for b in again] == rest and len(rest) == 3
