"""``loss.normalize: group`` against the reference's own training loop, written in PyTorch.

The reference (``distiller.py``) runs, per micro-batch: masking of that micro-batch alone
(``ceil(0.15 * its real tokens)`` positions), the student and teacher forward passes, its mean
losses (``KLDivLoss(batchmean)`` over the attention-mask rows x T^2, ``CrossEntropyLoss`` over the
masked positions, ``CosineEmbeddingLoss`` over the attention-mask rows), ``loss / accumulation
steps`` and ``backward()``, accumulating gradients until the update. Below, that loop runs on the
transformers models with the same weights and the same masked micro-batches as jaxdistil's step;
losses and every parameter's gradient must agree within 1e-5.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxdistil.distill import objective as stp
from jaxdistil.distill.losses import LossConfig
from jaxdistil.hf import load_model
from jaxdistil.hf.names import flax_to_hf
from jaxdistil.selfcheck import save_random_hf_model
from jaxdistil.training.optim import OptimConfig
from jaxdistil.training.state import trainable
from jaxdistil.training.step import accumulate_grads

torch = pytest.importorskip("torch")

V, D, T = 60, 16, 12
K = 4  # micro-batches of the reference (groups), 2 rows each
ROWS = 2
TEMPERATURE, ALPHA_CE, ALPHA_MLM, ALPHA_COS = 2.0, 5.0, 2.0, 1.0


def reference_loop(student, teacher, micro_batches, restrict_ce_to_mask=False):
    """distiller.py's step() + optimize() over K micro-batches: returns (mean losses, grads).
    restrict_ce_to_mask: its option of that name, L_ce over the masked positions only."""
    F = torch.nn.functional
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
    cosine = torch.nn.CosineEmbeddingLoss(reduction="mean")
    student.zero_grad()
    logged = {"loss": 0.0, "loss_ce": 0.0, "loss_mlm": 0.0, "loss_cos": 0.0}
    for ids, attn, labels in micro_batches:
        s_out = student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        s_logits, t_logits = s_out.logits, t_out.logits
        rows = (labels > -1) if restrict_ce_to_mask else attn.bool()
        mask = rows.unsqueeze(-1).expand_as(s_logits)
        s_sel = torch.masked_select(s_logits, mask).view(-1, V)
        t_sel = torch.masked_select(t_logits, mask).view(-1, V)
        loss_ce = kl(F.log_softmax(s_sel / TEMPERATURE, dim=-1), F.softmax(t_sel / TEMPERATURE, dim=-1))
        loss_ce = loss_ce * TEMPERATURE**2
        loss_mlm = ce(s_logits.view(-1, V), labels.view(-1))
        hmask = attn.unsqueeze(-1).expand_as(s_out.hidden_states[-1]).bool()
        s_h = torch.masked_select(s_out.hidden_states[-1], hmask).view(-1, D)
        t_h = torch.masked_select(t_out.hidden_states[-1], hmask).view(-1, D)
        loss_cos = cosine(s_h, t_h, s_h.new_ones(s_h.size(0)))
        loss = ALPHA_CE * loss_ce + ALPHA_MLM * loss_mlm + ALPHA_COS * loss_cos
        (loss / len(micro_batches)).backward()  # optimize(): loss / gradient_accumulation_steps
        for key, value in zip(logged, (loss, loss_ce, loss_mlm, loss_cos)):
            logged[key] += float(value.detach()) / len(micro_batches)
    grads = {name: p.grad.detach().numpy() for name, p in student.named_parameters()}
    return logged, grads


# all_rows: L_ce over every real row; gathered: restrict_ce_to_mask, the masked rows gathered before
# the heads (the step's static bound holds them); fallback: the bound forced below the masked rows,
# so the lax.cond takes the all-rows path and masks afterwards.
@pytest.mark.slow
@pytest.mark.parametrize("accum,path", [(1, "all_rows"), (K, "all_rows"), (K, "gathered"), (K, "fallback")])
def test_group_normalisation_equals_the_reference_loop(tmp_path, accum, path, tiny_step, monkeypatch):
    from transformers import AutoModelForMaskedLM

    s_dir = save_random_hf_model("DistilBertForMaskedLM", tmp_path / "s", vocab_size=V, dim=D, n_layers=2,
                                 n_heads=2, hidden_dim=32, max_position_embeddings=T, dropout=0.0,
                                 attention_dropout=0.0)
    t_dir = save_random_hf_model("BertForMaskedLM", tmp_path / "t", seed=1, vocab_size=V, hidden_size=D,
                                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=T)
    s_loaded, t_loaded = load_model(s_dir), load_model(t_dir)

    # Micro-batches of very unequal real lengths (the reference's are length-grouped).
    lengths = [12, 11, 3, 4, 7, 12, 5, 2]
    rng = np.random.default_rng(0)
    attn = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = (rng.integers(5, V, (K * ROWS, T)) * attn).astype(np.int32)

    cfg = stp.StepConfig(
        loss=LossConfig(temperature=TEMPERATURE, alpha_ce=ALPHA_CE, alpha_mlm=ALPHA_MLM, alpha_cos=ALPHA_COS,
                        normalize="group", chunk_rows=8, restrict_ce_to_mask=path != "all_rows"),
        optim=OptimConfig(total_steps=10, grad_accum_steps=accum), mask_id=4, group_rows=ROWS)
    weights = np.ones(V, np.float32)
    weights[:5] = 0.0
    t = tiny_step(cfg, s_loaded.config, t_loaded.config, student_params=s_loaded.params,
                  teacher_params=t_loaded.params)
    objective, consts = t.built.objective, t.built.consts(t.teacher_params, weights)
    batch = t.built.shard_batch({"input_ids": ids, "attention_mask": attn})

    @jax.jit
    def ours(params):
        inputs, counts = objective.prepare(batch, consts, jax.random.PRNGKey(3))
        grads, sums = accumulate_grads(objective, trainable(params, {}), inputs, counts, consts,
                                       jax.random.PRNGKey(4), accum, t.mesh)
        _, metrics = objective.combine(sums, counts)
        return grads["model"], metrics, inputs

    micro_rows = K * ROWS // accum
    if path == "fallback":
        monkeypatch.setattr(stp, "max_rows_bound", lambda *a, **k: 1)
    grads, metrics, inputs = jax.device_get(ours(t.state.params))
    labels = np.asarray(inputs["labels"])
    masked = [(labels[i:i + micro_rows] != -100).sum() for i in range(0, K * ROWS, micro_rows)]
    if path == "gathered":
        assert max(masked) <= stp.max_rows_bound(cfg, micro_rows, T)
    if path == "fallback":
        assert min(masked) > 1
    # Each micro-batch was masked on its own: ceil(0.15 * its real tokens) positions.
    for g in range(K):
        rows = slice(g * ROWS, (g + 1) * ROWS)
        assert (labels[rows] != -100).sum() == math.ceil(0.15 * attn[rows].sum())

    torch_student = AutoModelForMaskedLM.from_pretrained(str(s_dir)).train()
    torch_teacher = AutoModelForMaskedLM.from_pretrained(str(t_dir)).eval()
    micro = []
    for g in range(K):
        rows = slice(g * ROWS, (g + 1) * ROWS)
        length = int(attn[rows].sum(1).max())  # each micro-batch padded to its own longest row
        micro.append(tuple(torch.as_tensor(np.array(x[rows, :length]), dtype=torch.long)
                           for x in (inputs["input_ids"], attn, labels)))
    ref_losses, ref_grads = reference_loop(torch_student, torch_teacher, micro, restrict_ce_to_mask=path != "all_rows")

    for key, value in ref_losses.items():
        assert abs(float(metrics[key]) - value) <= 1e-5, (key, float(metrics[key]), value)
    ours_hf = flax_to_hf(grads, s_loaded.config)
    assert set(ours_hf) <= set(ref_grads)
    for name, g in ours_hf.items():
        np.testing.assert_allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4, err_msg=name)
    # The tied decoder: its gradient is in the word embeddings' on both sides.
    assert "vocab_projector.weight" not in ours_hf
