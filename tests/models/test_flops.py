"""The FLOP model (MFU's numerator) against a count from the models' own parameter shapes."""

from __future__ import annotations

import jax
import pytest

from jaxdistil.models import BertConfig, DistilBertConfig, build_model, init_params
from jaxdistil.models.flops import forward_flops_per_token, train_flops_per_token


def matmul_params(cfg) -> int:
    """Weights of every dense layer (not embeddings, norms or biases), from the init's shapes."""
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            total += x.size
    return total


@pytest.mark.parametrize("cfg", [BertConfig(), DistilBertConfig(n_layers=3),
                                 BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=256, vocab_size=1000)])
def test_forward_flops_count_matmuls_attention_and_the_head(cfg):
    t = 128
    dense = 2 * matmul_params(cfg)  # 2 FLOPs per multiply-add, per token
    attention = 2 * 2 * cfg.layers * t * cfg.hidden  # q.k scores and probs.v, per token
    head = 2 * cfg.hidden * cfg.vocab_size  # the tied vocabulary projection
    assert forward_flops_per_token(cfg, t) == pytest.approx(dense + attention + head, rel=1e-9)
    assert forward_flops_per_token(cfg, t, mlm_head=False) == pytest.approx(
        dense + attention - 2 * cfg.hidden * cfg.hidden, rel=1e-9)  # without the MLM transform either


def test_train_flops_are_three_student_passes_and_one_teacher_pass():
    s, t = DistilBertConfig(n_layers=6), BertConfig()
    assert train_flops_per_token(s, t, 128) == pytest.approx(
        3 * forward_flops_per_token(s, 128) + forward_flops_per_token(t, 128))
    assert train_flops_per_token(s, None, 128) == pytest.approx(3 * forward_flops_per_token(s, 128))
