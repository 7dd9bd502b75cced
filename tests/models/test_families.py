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


@pytest.mark.slow
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


def test_build_model_picks_each_familys_class_and_tree():
    """Each config builds its family's module, whose parameter tree has the names the HF name table
    (``jaxdistil.hf.names``) maps (shapes only: ``jax.eval_shape``, nothing compiled)."""
    import jax

    from jaxdistil.models import BertConfig, DistilBertConfig, init_params
    from jaxdistil.models.bert import BertForMaskedLM
    from jaxdistil.models.distilbert import DistilBertForMaskedLM

    cases = [(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
              BertForMaskedLM, {"embeddings", "encoder", "mlm_head"}, True),
             (DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64), DistilBertForMaskedLM,
              {"embeddings", "encoder", "mlm_head"}, False),
             (RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
              RobertaForMaskedLM, {"embeddings", "encoder", "mlm_head"}, True),
             (GPT2Config(n_embd=32, n_layer=1, n_head=2), GPT2LMHeadModel, {"embeddings", "encoder"}, False)]
    for cfg, cls, top, token_types in cases:
        model = build_model(cfg)
        assert type(model) is cls
        tree = jax.eval_shape(lambda m=model: init_params(m, jax.random.PRNGKey(0)))
        assert set(tree) == top
        assert ("token_type_embeddings" in tree["embeddings"]) == token_types
        assert tree["encoder"]["layers"]["q_lin"]["kernel"].shape == (1, 32, 2, 16)  # [layers, embed, heads, kv]
