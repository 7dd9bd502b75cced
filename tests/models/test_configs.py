"""Model configs read and write Hugging Face ``config.json``: every family round-trips through
transformers' own config classes; what jaxdistil cannot run is refused in one line."""

from __future__ import annotations

import json

import pytest

from jaxdistil.models.configs import (
    BertConfig,
    ConfigError,
    DistilBertConfig,
    GPT2Config,
    RobertaConfig,
    config_from_hf_dict,
    load_config,
    save_config,
)

transformers = pytest.importorskip("transformers")

CASES = [
    (transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=80, hidden_act="gelu_new", max_position_embeddings=40), BertConfig),
    (transformers.DistilBertConfig(vocab_size=99, dim=48, n_layers=2, n_heads=4, hidden_dim=80,
                                   sinusoidal_pos_embds=True), DistilBertConfig),
    (transformers.RobertaConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=80), RobertaConfig),
    (transformers.GPT2Config(vocab_size=99, n_embd=48, n_layer=2, n_head=4, n_positions=40), GPT2Config),
]


@pytest.mark.parametrize("hf,cls", CASES, ids=["bert", "distilbert", "roberta", "gpt2"])
def test_round_trip_through_transformers(hf, cls, tmp_path):
    cfg = config_from_hf_dict(hf.to_dict())
    assert type(cfg) is cls
    save_config(cfg, tmp_path)
    again = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(again) is type(hf)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(again, key) == getattr(hf, key), key
    assert load_config(tmp_path / "config.json") == cfg
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.vocab_size) == (hf.num_hidden_layers, 48, 4, 99)


def test_unsupported_configs_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        config_from_hf_dict({"model_type": "xlnet"})
    with pytest.raises(ConfigError, match="not divisible by 4 attention heads"):
        BertConfig(hidden_size=50, num_attention_heads=4)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_act": "swish"}))
    with pytest.raises(ConfigError, match="activation"):
        load_config(tmp_path / "config.json")
