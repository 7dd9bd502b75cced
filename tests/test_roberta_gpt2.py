"""The reference's other recipes: RoBERTa (masked LM) and GPT-2 (causal LM), and students of
another width (L_cos through a learned projection).

Independent references: transformers' PyTorch RobertaForMaskedLM / GPT2LMHeadModel (random configs
saved with ``save_pretrained``), ``pipeline("fill-mask")``, ``generate``, and
``torch.nn.functional.cross_entropy`` on shifted logits (the reference's L_clm).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil import cli
from jaxdistil.data.masking import IGNORE_INDEX, causal_labels
from jaxdistil.training import sharding as shd
from jaxdistil.distill import step as stp
from jaxdistil.distill.builder import DistillStep, StepSpec
from jaxdistil.distill.losses import LossConfig, combine_losses, loss_counts, loss_sums, plain_loss_sums
from jaxdistil.training.optim import OptimConfig
from jaxdistil.errors import UserError
from jaxdistil.hf import load_model
from jaxdistil.hf.export import export_hf
from jaxdistil.models import (
    BertConfig, DistilBertConfig, GPT2Config, RobertaConfig, build_model, config_from_hf_dict, init_params)
from jaxdistil.students import student_from_teacher

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Knowledge distillation trains a small student to imitate a large teacher model.",
    "A student learns from the soft targets of its teacher, layer by layer.",
    "Python's standard library ships modules for files, text, networks and processes.",
] * 10


def byte_bpe():
    """A byte-level BPE (RoBERTa's / GPT-2's model) trained on TEXTS, as a ``tokenizers.Tokenizer``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"])
    return bpe._tokenizer


def roberta_tokenizer(directory: Path):
    from tokenizers import processors

    backend = byte_bpe()
    backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                          ("<s>", backend.token_to_id("<s>")))
    tok = transformers.RobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                            sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                            mask_token="<mask>")
    tok.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def gpt2_tokenizer(directory: Path):
    end = "<|endoftext|>"
    tok = transformers.GPT2TokenizerFast(tokenizer_object=byte_bpe(), unk_token=end, bos_token=end, eos_token=end)
    tok.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def hf_model(kind: str, vocab: int = 120, std: float = 0.02, **kw):
    """A random transformers model of ``kind`` ("roberta" | "gpt2"), eval mode, fp32."""
    torch.manual_seed(0)
    if kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40, initializer_range=std, **kw)
        return transformers.RobertaForMaskedLM(cfg).eval()
    end = vocab - 1
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=40,
                                  initializer_range=std, bos_token_id=end, eos_token_id=end, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ragged_batch(vocab: int, pad: int, seed: int = 0):
    """ids [3, 12] with right padding (lengths 12, 7, 3) and the attention mask; no pad id inside."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab - 1, size=(3, 12))
    mask = (np.arange(12)[None] < np.array([12, 7, 3])[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad).astype(np.int64), mask


# --------------------------------------------------------------------------------------------------
# Parity with transformers, import / export
# --------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_export_round_trip_is_bit_exact(kind, tmp_path):
    from safetensors.numpy import load_file

    hf = hf_model(kind, std=0.1)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    report = export_hf(loaded.config, loaded.params, tmp_path / "out")
    assert report.verified and report.max_abs_diff <= 1e-4
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    tied = {"roberta": {"lm_head.decoder.weight", "lm_head.decoder.bias"}, "gpt2": {"lm_head.weight"}}[kind]
    assert set(ours) == set(theirs) - tied
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    # transformers reads it back as the same architecture, tied as it should be.
    back = transformers.AutoModelForMaskedLM if kind == "roberta" else transformers.AutoModelForCausalLM
    again = back.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again) is type(hf)
    ids, mask = ragged_batch(hf.config.vocab_size, 1 if kind == "roberta" else hf.config.eos_token_id)
    with torch.no_grad():
        a = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        b = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert torch.equal(a, b)


def test_roberta_fill_mask_equals_the_pipeline(tmp_path):
    tok = roberta_tokenizer(tmp_path / "bpe")
    hf = hf_model("roberta", vocab=len(tok), std=0.5, pad_token_id=tok.pad_token_id)
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    export_hf(loaded.config, loaded.params, tmp_path / "out", tokenizer_dir=tmp_path / "hf")
    texts = ["The quick brown <mask> jumps over the lazy dog.", "A student learns from the <mask> targets."]
    pipe = transformers.pipeline("fill-mask", model=str(tmp_path / "out"), tokenizer=str(tmp_path / "out"),
                                 top_k=5, device="cpu")
    for text in texts:
        assert cli.main(["fill-mask", "--model", str(tmp_path / "out"), "--json", text]) == 0
    from jaxdistil.fill_mask import fill_mask, load_tokenizer

    ours = fill_mask(load_model(tmp_path / "out"), load_tokenizer(str(tmp_path / "out"), "out"), texts, top_k=5)
    for text, got in zip(texts, ours):
        want = pipe(text)
        assert [p["token"] for p in got[0]] == [p["token"] for p in want]
        assert [p["token_str"] for p in got[0]] == [p["token_str"] for p in want]
        assert [p["sequence"] for p in got[0]] == [p["sequence"] for p in want]
        np.testing.assert_allclose([p["score"] for p in got[0]], [p["score"] for p in want], rtol=1e-4)


def test_gpt2_greedy_generate_equals_transformers(tmp_path, capsys):
    tok = gpt2_tokenizer(tmp_path / "bpe")
    end = tok.eos_token_id
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=40,
                                  initializer_range=0.3, bos_token_id=end, eos_token_id=end)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    export_hf(loaded.config, loaded.params, tmp_path / "out", tokenizer_dir=tmp_path / "hf")
    prompt = "Knowledge distillation trains"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                           pad_token_id=end)[0, ids.shape[1]:].tolist()
    assert len(want) == 10 and len(set(want)) > 1  # not a degenerate repetition
    assert cli.main(["generate", "--model", str(tmp_path / "out"), "--tokens", "10", "--json", prompt]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want
    assert got["text"] == tok.decode(ids[0].tolist() + want)
    # Sampling: reproducible from the seed, tokens in the vocabulary.
    samples = []
    for _ in range(2):
        assert cli.main(["generate", "--model", str(tmp_path / "out"), "--tokens", "5", "--temperature", "1.0",
                         "--seed", "3", "--json", prompt]) == 0
        samples.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert samples[0] == samples[1] and all(0 <= t < len(tok) for t in samples[0])
    # Wrong model kind: one line each.
    assert cli.main(["fill-mask", "--model", str(tmp_path / "out"), "a <mask> b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "causal LM" in err


# --------------------------------------------------------------------------------------------------
# L_clm
# --------------------------------------------------------------------------------------------------


def test_clm_loss_equals_torch_cross_entropy_on_shifted_logits():
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 9, 8, 23
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.array([9, 6, 2])[:, None]).astype(np.int32)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    labels = np.asarray(causal_labels(ids, mask))
    # The reference: lm_labels = ids with -100 at padding, CE(logits[:, :-1], lm_labels[:, 1:]).
    lm_labels = np.where(mask == 1, ids, -100).astype(np.int64)
    logits = torch.from_numpy(hidden @ w)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, v), torch.from_numpy(lm_labels[:, 1:]).reshape(-1),
                          ignore_index=-100)
    assert (labels[:, -1] == IGNORE_INDEX).all() and (labels != IGNORE_INDEX).sum() == 8 + 5 + 1
    cfg = LossConfig(alpha_ce=0.0, alpha_cos=0.0, alpha_mlm=0.0, alpha_clm=1.0, chunk_rows=4)
    counts = loss_counts(jnp.asarray(labels), jnp.asarray(mask), cfg)
    for fn, extra in ((loss_sums, {}), (plain_loss_sums, {})):
        sums = fn(jnp.asarray(hidden), None, lambda h: h @ jnp.asarray(w), None, jnp.asarray(labels),
                  jnp.asarray(mask), cfg, **extra)
        total, metrics = combine_losses(sums, counts, cfg)
        np.testing.assert_allclose(float(metrics["loss_clm"]), float(ref), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(total), float(ref), rtol=1e-5, atol=1e-6)
        assert float(metrics["loss_mlm"]) == 0.0
    # Packed rows: no label across a segment boundary.
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0]] * b)
    packed = np.asarray(causal_labels(ids, np.ones_like(ids), seg))
    assert packed[0, 2] == IGNORE_INDEX and packed[0, 3] == ids[0, 4] and (packed[0, 6:] == IGNORE_INDEX).all()


def tiny_gpt2(layers: int = 4, width: int = 64, vocab: int = 128) -> GPT2Config:
    return GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=8, n_positions=32, n_inner=128,
                      bos_token_id=vocab - 1, eos_token_id=vocab - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _fixed_batch(vocab: int, pad: int, rows: int = 8, length: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 2, size=(rows, length)).astype(np.int32)
    lens = rng.integers(length // 2, length + 1, size=rows)
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, pad).astype(np.int32), "attention_mask": mask}


def test_gpt2_student_distils_from_a_gpt2_teacher():
    """A 2-layer GPT-2 student (teacher layers 0 and 2) distilled from a random 4-layer GPT-2 on a
    fixed batch: the triple loss (KL + L_clm + L_cos) falls by half within 100 updates."""
    t_cfg = dataclasses.replace(tiny_gpt2(), initializer_range=0.3)  # a peaked, far from uniform teacher
    teacher = build_model(t_cfg)
    t_params = jax.device_get(jax.jit(lambda r: init_params(teacher, r))(jax.random.PRNGKey(1)))
    s_cfg, s_params, _ = student_from_teacher(t_cfg, t_params, layers=(0, 2))
    assert type(s_cfg) is GPT2Config and s_cfg.n_layer == 2
    assert "final_layer_norm" in s_params["encoder"] and "mlm_head" not in s_params
    cfg = stp.StepConfig(loss=LossConfig(alpha_ce=5.0, alpha_mlm=0.0, alpha_clm=2.0, alpha_cos=1.0),
                         optim=OptimConfig(learning_rate=3e-3, warmup_prop=0.0, total_steps=100), causal=True)
    built = DistillStep(StepSpec(s_cfg, t_cfg, cfg, shd.MeshConfig(data=1)), devices=jax.devices()[:1])
    state = built.init_state(jax.random.PRNGKey(0), params=s_params)
    tp = built.place_teacher(t_params)
    batch = built.shard_batch(_fixed_batch(128, 127))
    weights = built.replicate(np.ones(128, np.float32))
    losses = []
    for _ in range(100):
        state, m = built.train_step(state, tp, batch, weights)
        losses.append(jax.device_get(m))
    first, last = losses[0], losses[-1]
    assert "loss_clm" in first and float(first["loss_mlm"]) == 0.0
    assert float(first["masked_tokens"]) == float(np.sum(np.asarray(_fixed_batch(128, 127)["attention_mask"])[:, 1:]
                                                         * np.asarray(_fixed_batch(128, 127)["attention_mask"])[:, :-1]))
    assert last["loss"] <= 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["loss_ce"] < 0.5 * first["loss_ce"] and last["loss_cos"] < first["loss_cos"]


# --------------------------------------------------------------------------------------------------
# Students of another width
# --------------------------------------------------------------------------------------------------


def test_narrow_student_distils_through_a_projection():
    t_cfg = BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                       intermediate_size=256, max_position_embeddings=32)
    s_cfg = DistilBertConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=32,
                             dropout=0.0, attention_dropout=0.0)
    base = dict(optim=OptimConfig(learning_rate=2e-3, warmup_prop=0.0, total_steps=60), mask_id=3)
    # Without a projection: one line naming both widths and the fix.
    with pytest.raises(UserError) as err:
        DistillStep(StepSpec(s_cfg, t_cfg, stp.StepConfig(**base), shd.MeshConfig(data=1)), devices=jax.devices()[:1])
    msg = str(err.value)
    assert "128" in msg and "64" in msg and "cos_projection=linear" in msg and "\n" not in msg

    loss = LossConfig(cos_projection="linear")
    spec = StepSpec(s_cfg, t_cfg, stp.StepConfig(loss=loss, projection=(64, 128), **base), shd.MeshConfig(data=1))
    built = DistillStep(spec, devices=jax.devices()[:1])
    state = built.init_state(jax.random.PRNGKey(0))
    proj = state.params[stp.COS_PROJECTION]
    assert proj["kernel"].shape == (64, 128) and proj["bias"].shape == (128,)
    tp = built.random_teacher(jax.random.PRNGKey(1))
    batch = built.shard_batch(_fixed_batch(128, 0))
    weights = np.ones(128, np.float32)
    weights[:5] = 0.0
    weights = built.replicate(weights)
    start = jax.device_get(proj["kernel"])
    history = []
    for _ in range(60):
        state, m = built.train_step(state, tp, batch, weights)
        history.append(jax.device_get(m))
    assert history[-1]["loss_cos"] < 0.7 * history[0]["loss_cos"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert not np.allclose(jax.device_get(state.params[stp.COS_PROJECTION]["kernel"]), start)  # it is trained
    # The held-out scoring runs the model alone (the projection is not part of it).
    sums = built.eval_step("student")(state.params, batch, weights, jax.random.PRNGKey(0))
    assert float(sums["mlm_rows"]) > 0


def test_narrow_student_run_exports_without_the_projection(tmp_path):
    """train() with a narrower random student and loss.cos_projection=linear: the checkpoint holds the
    projection, the export and load_model of the run do not."""
    from jaxdistil.distill.config import config_from_dict
    from jaxdistil.data.corpus import SourceOptions
    from jaxdistil.data.manifest import load_manifest, tokenizer_dir
    from jaxdistil.data.prepare import PrepareConfig, prepare
    from jaxdistil.hf import save_flax_model
    from jaxdistil.train import train

    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was by this be are from at".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(14, 30))) for _ in range(120))
    (tmp_path / "corpus.txt").write_text(text + "\n")
    prepare(PrepareConfig([str(tmp_path / "corpus.txt")], "train:200", tmp_path / "data", max_len=32, workers=1,
                          options=SourceOptions(holdout=0.1)), progress=False, log=lambda *a: None)
    manifest = load_manifest(tmp_path / "data")
    vocab = manifest["tokenizer"]["vocab_size"]
    t_cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=32)
    shapes = jax.eval_shape(lambda: init_params(build_model(t_cfg), jax.random.PRNGKey(0)))
    prng = np.random.default_rng(0)
    save_flax_model(t_cfg, jax.tree.map(lambda s: prng.normal(0, 0.1, s.shape).astype(s.dtype), shapes),
                    tmp_path / "teacher", tokenizer_dir=tokenizer_dir(manifest))
    raw = {
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(tmp_path / "teacher")},
        "student": {"init": "random", "config": {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64,
                                                  "max_position_embeddings": 32}},
        "data": {"dir": str(tmp_path / "data")},
        "loader": {"batch_size": 8, "max_len": 32, "buckets": [32], "read_threads": 1, "prefetch": 1},
        "loss": {"cos_projection": "linear"},
        "train": {"steps": 3, "eval_every": -1, "log_every": 1},
        "checkpoint": {"every": 0, "keep": 1, "keep_best": 0},
        "logging": {"progress": False, "peak_tflops": 1.0, "tensorboard": False},
    }
    train(config_from_dict(raw), log=lambda *a: None)
    loaded = load_model(tmp_path / "run")
    assert stp.COS_PROJECTION not in loaded.params and loaded.config.hidden == 32
    report = export_hf(loaded.config, loaded.params, tmp_path / "out", tokenizer_dir=loaded.tokenizer_dir)
    assert report.verified
    # Resuming restores the projection too (the full train state), and the run goes on.
    raw["train"]["steps"] = 4
    result = train(config_from_dict(raw), log=lambda *a: None)
    assert result.step == 4
    # Without the projection, the same widths are a one-line error.
    raw["loss"] = {"cos_projection": "none"}
    raw["run_dir"] = str(tmp_path / "run2")
    with pytest.raises(UserError) as err:
        train(config_from_dict(raw), log=lambda *a: None)
    assert "64" in str(err.value) and "32" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# Sharding equivalence (train step on 8 CPU devices vs one)
# --------------------------------------------------------------------------------------------------

V, D, HEADS, F, LAYERS, POS = 128, 64, 8, 128, 2, 32
FAMILIES = {
    "roberta": (RobertaConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                              num_hidden_layers=LAYERS, max_position_embeddings=POS + 2),
                RobertaConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                              num_hidden_layers=LAYERS + 1, max_position_embeddings=POS + 2),
                dict(mask_id=4), 1),
    "gpt2": (GPT2Config(vocab_size=V, n_embd=D, n_head=HEADS, n_inner=F, n_layer=LAYERS, n_positions=POS,
                        bos_token_id=V - 1, eos_token_id=V - 1),
             GPT2Config(vocab_size=V, n_embd=D, n_head=HEADS, n_inner=F, n_layer=LAYERS + 1, n_positions=POS,
                        bos_token_id=V - 1, eos_token_id=V - 1),
             dict(causal=True, loss=LossConfig(chunk_rows=64, alpha_mlm=0.0, alpha_clm=2.0)), V - 1),
}
MESHES = {"data8": shd.MeshConfig(data=8), "fsdp8": shd.MeshConfig(data=1, fsdp=8),
          "fsdp2_tensor4": shd.MeshConfig(data=1, fsdp=2, tensor=4)}


def _sharded_run(family: str, mesh_cfg: shd.MeshConfig, devices):
    s_cfg, t_cfg, extra, pad = FAMILIES[family]
    extra = {"loss": LossConfig(chunk_rows=64), **extra}
    cfg = stp.StepConfig(optim=OptimConfig(learning_rate=1e-3, warmup_prop=0.0, total_steps=10, grad_accum_steps=2,
                                           weight_decay=0.01), **extra)
    built = DistillStep(StepSpec(s_cfg, t_cfg, cfg, mesh_cfg, compiler_options={"xla_backend_optimization_level": 0}),
                        devices=devices)
    state = built.init_state(jax.random.PRNGKey(0))
    teacher = build_model(t_cfg)
    tp = built.place_teacher(jax.device_get(jax.jit(lambda r: init_params(teacher, r))(jax.random.PRNGKey(1))))
    weights = np.ones(V, np.float32)
    weights[:5] = 0.0
    weights = built.replicate(weights)
    metrics = []
    for i in range(3):
        state, m = built.train_step(state, tp, built.shard_batch(_fixed_batch(V, pad, rows=16, seed=i)), weights)
        metrics.append(jax.device_get(m))
    return metrics, jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device_runs():
    return {family: _sharded_run(family, shd.MeshConfig(data=1), jax.devices()[:1]) for family in FAMILIES}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_step_equals_single_device(single_device_runs, family, mesh):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets them up on CPU)")
    ref_metrics, ref_params = single_device_runs[family]
    metrics, params = _sharded_run(family, MESHES[mesh], jax.devices()[:8])
    for i, (m, r) in enumerate(zip(metrics, ref_metrics)):
        for key in r:
            np.testing.assert_allclose(m[key], r[key], atol=1e-5, rtol=1e-5, err_msg=f"step {i} {key}")
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"]
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        params, ref_params)


# --------------------------------------------------------------------------------------------------
# Students, configs, data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_student_of_all_teacher_layers_is_the_teacher(kind):
    hf = hf_model(kind, std=0.1)
    cfg = config_from_hf_dict(hf.config.to_dict())
    from jaxdistil.hf.names import hf_to_flax

    params, _, _ = hf_to_flax({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    s_cfg, s_params, _ = student_from_teacher(cfg, params, layers=(0, 1, 2))
    assert type(s_cfg) is type(cfg)
    s_half, half, _ = student_from_teacher(cfg, params, layers=(0, 2))
    assert s_half.layers == 2
    np.testing.assert_array_equal(half["encoder"]["layers"]["lin1"]["kernel"][1],
                                  params["encoder"]["layers"]["lin1"]["kernel"][2])
    ids, mask = ragged_batch(hf.config.vocab_size, 1 if kind == "roberta" else hf.config.eos_token_id)
    a = build_model(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)).logits
    b = build_model(s_cfg).apply({"params": s_params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_recipe_configs_and_lm_kind_errors():
    from jaxdistil.distill.config import load_run_config

    root = Path(__file__).resolve().parents[1] / "configs"
    roberta = load_run_config(root / "distilroberta-base.yaml")
    assert roberta.teacher.model == "roberta-base" and tuple(roberta.student.layers) == (0, 2, 4, 7, 9, 11)
    assert (roberta.loss.alpha_ce, roberta.loss.alpha_mlm, roberta.loss.alpha_cos, roberta.loss.alpha_clm) == (5, 2, 1, 0)
    gpt2 = load_run_config(root / "distilgpt2.yaml")
    assert gpt2.teacher.model == "gpt2" and gpt2.student.freeze_pos_embs
    assert (gpt2.loss.alpha_ce, gpt2.loss.alpha_mlm, gpt2.loss.alpha_clm, gpt2.loss.alpha_cos) == (5, 0, 2, 1)
    # The step refuses the other family's LM loss, in one line each.
    for kwargs, words in ((dict(causal=True), "alpha_clm"), (dict(loss=LossConfig(alpha_mlm=0.0, alpha_clm=1.0)),
                                                              "alpha_mlm")):
        with pytest.raises(UserError) as err:
            stp.StepConfig(**kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError):
        LossConfig(alpha_mlm=1.0, alpha_clm=1.0)
    # Masked teacher, causal student: refused.
    with pytest.raises(UserError) as err:
        DistillStep(StepSpec(tiny_gpt2(), BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                     num_attention_heads=8, intermediate_size=128),
                             stp.StepConfig(causal=True, loss=LossConfig(alpha_mlm=0.0, alpha_clm=1.0),
                                            optim=OptimConfig(total_steps=1))),
                    devices=jax.devices()[:1])
    assert "causal" in str(err.value) and "masked" in str(err.value)


@pytest.mark.slow
def test_gpt2_prepare_train_export_generate(tmp_path, capsys):
    """GPT-2 data as the reference writes it (<|endoftext|> ... <|endoftext|>), a GPT-2 student trained
    from a GPT-2 teacher by `jaxdistil train`, exported, and generating."""
    from jaxdistil.data.manifest import load_manifest
    import grain

    tok = gpt2_tokenizer(tmp_path / "bpe")
    tok.save_pretrained(tmp_path / "tok")
    end = tok.eos_token_id
    (tmp_path / "corpus.txt").write_text("\n".join(f"{i}: {text}" for i, text in enumerate(TEXTS)) + "\n")
    assert cli.main(["prepare", "--source", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok"),
                     "--output", str(tmp_path / "data"), "--max-len", "32", "--holdout", "0.2", "--workers", "1"]) == 0
    manifest = load_manifest(tmp_path / "data")
    special = manifest["tokenizer"]["special_ids"]
    assert "mask" not in special and special["cls"] == special["sep"] == special["pad"] == end
    from jaxdistil.data.manifest import split_files

    src = grain.sources.ArrayRecordDataSource(split_files(manifest, "train"))
    first = np.frombuffer(src[0], np.dtype(manifest["dtype"]))
    assert first[0] == end and first[-1] == end and end not in first[1:-1]
    # A GPT-2 teacher with this vocabulary.
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=end, eos_token_id=end)).eval()
    hf.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "distilgpt2.yaml"),
                     f"run_dir={run}", f"teacher.model={tmp_path / 'teacher'}", f"data.dir={tmp_path / 'data'}",
                     "student.layers=[1]", "loader.batch_size=8", "loader.max_len=32", "loader.pack_bins=4",
                     "optim.grad_accum_steps=1", "train.steps=4", "train.epochs=0", "train.eval_every=4",
                     "train.eval_batches=1", "train.dtype=float32", "checkpoint.every=0",
                     "logging.progress=false", "logging.tensorboard=false", "logging.peak_tflops=1.0"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    assert trains and all("loss_clm" in r and r["loss_mlm"] == 0.0 for r in trains)
    capsys.readouterr()
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "out")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(again) is transformers.GPT2LMHeadModel and again.config.n_layer == 1
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tmp_path / "out"), "--tokens", "4", "A student"]) == 0
    assert capsys.readouterr().out.startswith("A student")
