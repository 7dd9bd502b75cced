"""The FLOP model of the transformers here: what MFU (model FLOPs utilisation) divides by.

Matmul FLOPs only, 2 per multiply-add: per layer the q/k/v/out projections (4 D^2), the FFN
(2 D F), attention scores and the mixing of values (2 T D); then the MLM head's transform (D^2,
not in GPT-2, whose LM head is the bare projection) and vocabulary projection (D V) on every row.
Causal attention is counted in full (T D per token), as the kernels compute it. Embedding gathers, LayerNorms, softmax and the
losses are not matmuls and are left out, as MFU conventions do. A training step costs 3x the
student's forward (forward + backward) plus 1x the frozen teacher's forward.
"""

from __future__ import annotations

from typing import Any


def forward_flops_per_token(cfg: Any, length: int, mlm_head: bool = True) -> float:
    """Matmul FLOPs of one forward pass per token of a [*, length] batch (the MLM head's transform
    and vocabulary projection on every row included unless ``mlm_head=False``: a classifier's head
    runs on one row per sequence, a rounding error next to the encoder)."""
    d, f, v = cfg.hidden, cfg.mlp, cfg.vocab_size
    per_layer = 4 * d * d + 2 * d * f + 2 * length * d
    head = (0 if getattr(cfg, "causal", False) else d * d) + d * v
    return 2.0 * (cfg.layers * per_layer + (head if mlm_head else 0))


def train_flops_per_token(student: Any, teacher: Any | None, length: int) -> float:
    """One distillation update per token: the student's forward and backward (3x its forward) and
    the teacher's forward (none in MLM-only training)."""
    flops = 3.0 * forward_flops_per_token(student, length)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, length)
    return flops
