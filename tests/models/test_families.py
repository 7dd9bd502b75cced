"""RoBERTa (masked LM) and GPT-2 (causal LM) equal transformers' PyTorch models (random configs
saved with ``save_pretrained``), padded rows included."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from families import hf_model, ragged_batch

from jaxdistil.hf import load_model
from jaxdistil.models import GPT2Config, RobertaConfig, build_model
from jaxdistil.models.gpt2 import GPT2LMHeadModel
from jaxdistil.models.roberta import RobertaForMaskedLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_logits_and_hidden_states_equal_transformers(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert type(loaded.config) is (RobertaConfig if kind == "roberta" else GPT2Config)
    assert loaded.has_mlm_head
    pad = hf.config.pad_token_id if kind == "roberta" else hf.config.eos_token_id
    ids, mask = ragged_batch(hf.config.vocab_size, pad)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    model = build_model(loaded.config)
    assert type(model) is (RobertaForMaskedLM if kind == "roberta" else GPT2LMHeadModel)
    out = model.apply({"params": loaded.params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-4)
    assert out.hidden_states.shape[0] == len(ref.hidden_states) == 4
    for i, h in enumerate(ref.hidden_states):
        np.testing.assert_allclose(np.asarray(out.hidden_states[i])[real], h.numpy()[real], atol=1e-4,
                                   err_msg=f"hidden state {i}")
    if kind == "roberta":  # positions from the ids: pads at the table's pad row, as transformers does
        np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-4)
    # bf16 compute runs and stays close (params fp32).
    low = build_model(loaded.config, dtype=jnp.bfloat16).apply(
        {"params": loaded.params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert np.abs(np.asarray(low.logits, np.float32)[real] - ref.logits.numpy()[real]).max() < 0.1
