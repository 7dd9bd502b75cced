"""The Hugging Face importer (jaxdistil.hf.load / names / files): formats, prefixes, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxdistil import cli
from jaxdistil.errors import UserError
from jaxdistil.hf import files
from jaxdistil.hf.load import load_model, save_flax_model
from jaxdistil.hf.names import expected_hf_names, flax_to_hf, hf_to_flax
from jaxdistil.models import BertConfig, DistilBertConfig, load_config
from jaxdistil.selfcheck import save_random_hf_model

torch = pytest.importorskip("torch", reason="the fixtures are written by transformers' save_pretrained")

BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=20)
DISTIL = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=20)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf")
    return {
        "bert": save_random_hf_model("BertForMaskedLM", root / "bert", **BERT),
        "distilbert": save_random_hf_model("DistilBertForMaskedLM", root / "distilbert", **DISTIL),
        "bertmodel": save_random_hf_model("BertModel", root / "bertmodel", **BERT),
    }


def _assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_trees_equal(a[key], b[key])
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _rewrite(src, dst, transform, config_update=None):
    """Copies an HF directory, passing its state dict through ``transform``."""
    shutil.copytree(src, dst)
    state = transform(dict(files.read_state_dict(src)))
    (dst / "model.safetensors").unlink()
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    if config_update:
        data = json.loads((dst / "config.json").read_text())
        data.update(config_update)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_prefix_is_optional(hf_dirs, tmp_path, kind):
    prefix = kind + "."
    stripped = _rewrite(hf_dirs[kind], tmp_path / "bare",
                        lambda s: {k.removeprefix(prefix): v for k, v in s.items()})
    assert not any(k.startswith(prefix) for k in files.read_state_dict(stripped))
    a, b = load_model(hf_dirs[kind]), load_model(stripped)
    assert a.has_mlm_head and b.has_mlm_head
    _assert_trees_equal(a.params, b.params)


def test_param_tree_layout(hf_dirs):
    loaded = load_model(hf_dirs["bert"])
    layers = loaded.params["encoder"]["layers"]
    assert layers["q_lin"]["kernel"].shape == (2, 16, 2, 8)  # [L, D, N, H]
    assert layers["out_lin"]["kernel"].shape == (2, 2, 8, 16)  # [L, N, H, D]
    assert layers["lin1"]["kernel"].shape == (2, 16, 24)
    state = files.read_state_dict(hf_dirs["bert"])
    w = state["bert.encoder.layer.1.attention.self.query.weight"]  # [out = N*H, in = D]
    np.testing.assert_array_equal(layers["q_lin"]["kernel"][1], w.T.reshape(16, 2, 8))
    np.testing.assert_array_equal(layers["lin2"]["kernel"][0],
                                  state["bert.encoder.layer.0.output.dense.weight"].T)
    assert all(leaf.dtype == np.float32 for leaf in _leaves(loaded.params))


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_bert_model_without_head(hf_dirs):
    loaded = load_model(hf_dirs["bertmodel"])
    assert not loaded.has_mlm_head
    assert set(loaded.ignored) == {"pooler.dense.bias", "pooler.dense.weight"}
    # A fresh head is added so the model runs; its bias starts at zero as in transformers.
    assert loaded.params["mlm_head"]["bias"].shape == (64,) and not loaded.params["mlm_head"]["bias"].any()


def test_sharded_safetensors_and_torch_bin(hf_dirs, tmp_path):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(hf_dirs["distilbert"]))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / files.SAFE_INDEX).is_file()
    assert len(files.weight_files(tmp_path / "sharded")) > 1
    reference = load_model(hf_dirs["distilbert"]).params
    _assert_trees_equal(load_model(tmp_path / "sharded").params, reference)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(hf_dirs["distilbert"] / "config.json", bin_dir)
    torch.save(model.state_dict(), bin_dir / files.TORCH_WEIGHTS)
    loaded = load_model(bin_dir)
    _assert_trees_equal(loaded.params, reference)
    assert "vocab_projector.weight" in loaded.ignored  # tied copy in the .bin, checked and dropped


def test_legacy_names_and_tied_copies(hf_dirs, tmp_path):
    """gamma/beta LayerNorm names, a saved position_ids buffer and explicit tied decoder tensors load."""
    def legacy(state):
        out = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
        out["bert.embeddings.position_ids"] = np.arange(20, dtype=np.int64)[None]
        out["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
        return out

    loaded = load_model(_rewrite(hf_dirs["bert"], tmp_path / "legacy", legacy))
    _assert_trees_equal(loaded.params, load_model(hf_dirs["bert"]).params)
    assert "cls.predictions.decoder.weight" in loaded.ignored


def test_untied_decoder_is_refused(hf_dirs, tmp_path):
    def untie(state):
        state["vocab_projector.weight"] = state["distilbert.embeddings.word_embeddings.weight"] + 1.0
        return state

    with pytest.raises(UserError, match="untied"):
        load_model(_rewrite(hf_dirs["distilbert"], tmp_path / "untied", untie))


def test_one_error_lists_missing_unexpected_and_shapes(hf_dirs, tmp_path):
    def damage(state):
        del state["bert.encoder.layer.1.attention.self.key.bias"]
        del state["bert.embeddings.LayerNorm.weight"]
        state["bert.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
        state["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((25, 16), np.float32)
        return state

    with pytest.raises(UserError) as err:
        load_model(_rewrite(hf_dirs["bert"], tmp_path / "bad", damage))
    message = str(err.value)
    assert "\n" not in message
    for needle in ("missing (2)", "encoder.layer.1.attention.self.key.bias", "embeddings.LayerNorm.weight",
                   "unexpected (1)", "encoder.layer.0.extra.weight", "wrong shape (1)",
                   "encoder.layer.0.intermediate.dense.weight (25, 16) != (24, 16)"):
        assert needle in message, needle


def test_config_mismatch_reports_shapes(hf_dirs, tmp_path):
    wrong = _rewrite(hf_dirs["distilbert"], tmp_path / "wrongcfg", lambda s: s,
                     {"hidden_dim": 32, "n_layers": 3})
    with pytest.raises(UserError, match=r"missing \(16\).*wrong shape"):
        load_model(wrong)


@pytest.mark.parametrize("update,needle", [
    ({"architectures": ["BertForQuestionAnswering"]},
     "architecture BertForQuestionAnswering is not supported"),
    ({"model_type": "xlnet"}, "model_type 'xlnet' is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_act": "silu"}, "activation 'silu'"),
])
def test_unsupported_configs(hf_dirs, tmp_path, update, needle):
    directory = _rewrite(hf_dirs["bert"], tmp_path / "x", lambda s: s, update)
    with pytest.raises(UserError, match=needle):
        load_model(directory)


def test_path_errors(hf_dirs, tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no such directory"):
        load_model("./definitely/not/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "empty")
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    shutil.copy(hf_dirs["bert"] / "config.json", only_config)
    with pytest.raises(UserError, match="no weights found"):
        load_model(only_config)
    with pytest.raises(UserError, match="is a file"):
        load_model(hf_dirs["bert"] / "config.json")
    with pytest.raises(UserError, match="--step applies to run directories"):
        load_model(hf_dirs["bert"], step=3)
    corrupt = shutil.copytree(hf_dirs["bert"], tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="corrupt safetensors header"):
        load_model(corrupt)


def test_hub_id_offline_says_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="pass an existing local model directory"):
        load_model("jaxdistil-tests/no-such-model")


def test_names_round_trip_without_torch_layout_loss():
    """flax_to_hf inverts hf_to_flax exactly, for both families, with and without the head."""
    rng = np.random.default_rng(0)
    for cfg in (BertConfig(**BERT), DistilBertConfig(**DISTIL)):
        for with_head in (True, False):
            names = expected_hf_names(cfg, with_head)
            zero = flax_to_hf(_zeros_like_model(cfg), cfg, with_head)
            assert sorted(zero) == names
            state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in zero.items()}
            params, has_head, ignored = hf_to_flax(state, cfg)
            assert has_head == with_head and ignored == []
            back = flax_to_hf(params, cfg, with_head)
            assert back.keys() == state.keys()
            for k, value in state.items():
                np.testing.assert_array_equal(back[k], value, err_msg=k)


def _zeros_like_model(cfg):
    from jaxdistil.hf.names import flax_shapes

    tree: dict = {}
    for path, shape in flax_shapes(cfg, with_head=True).items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.zeros(shape, np.float32)
    return tree


def test_flax_model_dir_round_trip_and_cli_import(hf_dirs, tmp_path, capsys):
    out = tmp_path / "flax"
    assert cli.main(["import", "--model", str(hf_dirs["bertmodel"]), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no MLM head" in printed and "pooler.dense.weight" in printed
    assert (out / "params").is_dir() and (out / "config.json").is_file()
    loaded = load_model(out)
    assert loaded.source == "flax" and not loaded.has_mlm_head
    _assert_trees_equal(loaded.params, load_model(hf_dirs["bertmodel"]).params)

    # An existing non-empty output needs --force; nothing is changed without it.
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(["import", "--model", str(hf_dirs["distilbert"]), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert cli.main(["import", "--model", str(hf_dirs["distilbert"]), "--output", str(out), "--force"]) == 0
    assert isinstance(load_model(out).config, DistilBertConfig)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_flax_model_dir_config_is_hf_format(hf_dirs, tmp_path):
    """The Flax model directory's config.json is a Hugging Face config the typed reader accepts."""
    loaded = load_model(hf_dirs["distilbert"])
    save_flax_model(loaded.config, loaded.params, tmp_path / "flax", has_mlm_head=True, origin="test")
    data = json.loads((tmp_path / "flax" / "config.json").read_text())
    assert data["model_type"] == "distilbert" and data["tie_word_embeddings"] is True
    assert data["jaxdistil"] == {"format": "flax", "has_mlm_head": True, "origin": "test"}
    assert load_config(tmp_path / "flax") == loaded.config
    headless_bias = {k: v for k, v in loaded.params["mlm_head"].items() if k != "bias"}
    broken = {**loaded.params, "mlm_head": headless_bias}
    with pytest.raises(UserError, match=r"parameters do not match the model config: missing \(1\)"):
        save_flax_model(loaded.config, broken, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


class _Payload:
    """A pickle whose loading would run code: ``__reduce__`` asks for ``open(marker, "w")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_in_one_line_and_never_run(hf_dirs, tmp_path):
    import pickle
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(hf_dirs["distilbert"] / "config.json", evil)
    with open(evil / files.TORCH_WEIGHTS, "wb") as f:  # a plain pickle, as torch.save writes one
        pickle.dump({"distilbert.embeddings.word_embeddings.weight": _Payload(marker)}, f)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdistil.cli", "import", "--model", str(evil), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "weights_only=True" in lines[0] and "safetensors" in lines[0]
    assert not marker.exists()  # the pickle's code never ran
    assert not (tmp_path / "out").exists()  # nothing written
