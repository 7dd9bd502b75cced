"""``generate``: greedy decoding of a GPT-2 equals transformers' ``generate``; a GPT-2 student
prepared, distilled, exported and generating end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from families import TEXTS, gpt2_tokenizer

from jaxdistil import cli
from jaxdistil.generate import generate
from jaxdistil.hf import load_model
from jaxdistil.hf.export import export_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


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
    # The library function directly, on the loaded model.
    (direct,) = generate(load_model(tmp_path / "out"), tok, prompt, new_tokens=10)
    assert direct["token_ids"] == want
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


def test_generation_stops_at_eos_as_transformers(tmp_path):
    """eos set to the token greedy decoding emits at step k (k >= 1, not emitted before): transformers'
    generate stops there, the eos included; so do ours, greedy and (at a temperature that leaves one
    choice) sampling; a batch pads a finished row with the pad id until every row is finished."""
    import jax
    import jax.numpy as jnp

    from jaxdistil.models import build_model
    from jaxdistil.models.gpt2 import greedy_generate

    tok = gpt2_tokenizer(tmp_path / "bpe")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=24, n_layer=2, n_head=3, n_positions=40,
                                  initializer_range=0.3, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    prompts = [tok("Knowledge distillation trains", return_tensors="pt")["input_ids"]]
    with torch.no_grad():
        free = hf.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), do_sample=False, max_new_tokens=12,
                           eos_token_id=None, pad_token_id=0)[0, prompts[0].shape[1]:].tolist()
    step = next(k for k in range(1, 12) if free[k] not in free[:k])
    eos = free[step]
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = hf.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), do_sample=False,
                           max_new_tokens=12, pad_token_id=eos)[0, prompts[0].shape[1]:].tolist()
    assert want == free[:step + 1] and want[-1] == eos  # transformers: stops at eos, included
    loaded = load_model(tmp_path / "hf")
    assert loaded.config.eos_token_id == eos
    (greedy,) = generate(loaded, tok, "Knowledge distillation trains", new_tokens=12)
    assert greedy["token_ids"] == want
    (sampled,) = generate(loaded, tok, "Knowledge distillation trains", new_tokens=12, temperature=1e-4, seed=3)
    assert sampled["token_ids"] == want
    # A batch of two prompts of one length (no padding): the row that finished first gets the pad id
    # until the other finishes (or runs out of tokens), as in transformers.
    batch = torch.cat([prompts[0], prompts[0].flip(1)])
    with torch.no_grad():
        want_batch = hf.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=12,
                                 pad_token_id=7).numpy()
    first_done = prompts[0].shape[1] + step + 1
    assert want_batch.shape[1] > first_done and (want_batch[0, first_done:] == 7).all()
    model = build_model(loaded.config)
    with jax.default_matmul_precision("highest"):
        ours = greedy_generate(model, loaded.params, jnp.asarray(batch.numpy(), jnp.int32), 12, eos_token_id=eos,
                               pad_token_id=7)
    np.testing.assert_array_equal(np.asarray(ours), want_batch)


@pytest.mark.slow
def test_gpt2_prepare_train_export_generate(tmp_path, capsys):
    """GPT-2 data as the reference writes it (<|endoftext|> ... <|endoftext|>), a GPT-2 student trained
    from a GPT-2 teacher by `jaxdistil train`, exported, and generating."""
    import grain

    from jaxdistil.data.manifest import load_manifest

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
