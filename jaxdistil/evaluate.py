"""Held-out masked-LM evaluation: loss, perplexity and accuracy of any model on prepared data.

The held-out split of a prepared data directory is masked as BERT's MLM metric is usually reported:
15% of the real tokens chosen uniformly (no frequency smoothing: training's ``max(count, 1) ** -0.7``
weights would pick almost only rare words), then 80/10/10 [MASK] / random / kept. Each batch uses a
fixed key, so every evaluation of every model sees the same masked positions and scores are
comparable across steps, runs and models.

  jaxdistil evaluate --model RUN_DIR|FLAX_DIR|HF_DIR|HUB_ID --data DATA_DIR

``evaluate_params`` is the loop (used by ``train`` for its periodic evaluation and by the demo);
``evaluate_model`` is the command's library function.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxdistil.errors import UserError

EVAL_SEED = 1234  # masks of held-out batch i: fold_in(PRNGKey(EVAL_SEED), i), the same for every model
EVAL_SMOOTHING = 0.0  # uniform choice of the masked positions among real, non-special tokens


def eval_masking():
    """The held-out masking (a MaskingConfig): BERT's 15% with 80/10/10, whatever the run trains with."""
    from jaxdistil.data.masking import MaskingConfig

    return MaskingConfig(mlm_smoothing=EVAL_SMOOTHING)


def eval_token_weights(manifest: dict) -> np.ndarray:
    """Masking weights [V] of held-out evaluation: 1 for every token, 0 for the special ones."""
    from jaxdistil.data import manifest as manifest_lib

    return manifest_lib.token_weights(manifest, EVAL_SMOOTHING)


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sums over batches (mlm_sum, mlm_rows, mlm_correct, tokens) -> loss, perplexity, accuracy."""
    rows = float(sums["mlm_rows"])
    if rows <= 0:
        raise UserError("the held-out data has no maskable token; prepare a held-out split with text in it")
    loss = float(sums["mlm_sum"]) / rows
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": float(sums["mlm_correct"]) / rows,
        "masked_tokens": rows,
        "tokens": float(sums["tokens"]),
    }


def evaluate_params(
    eval_step: Callable[..., dict[str, jax.Array]],
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    token_weights: jax.Array,
    shard_batch: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
    max_batches: int = 0,
    seed: int = EVAL_SEED,
) -> dict[str, float]:
    """Runs ``eval_step`` (``jaxdistil.distill.step.make_eval_step``) over held-out batches.

    batches: host batches {input_ids, attention_mask[, segment_ids, position_ids]} [B, T];
    shard_batch: places one on the mesh; max_batches: 0 = all.
    Batch i is masked with ``fold_in(PRNGKey(seed), i)``. Returns ``metrics_from_sums``.
    """
    base = jax.random.PRNGKey(seed)
    totals: dict[str, Any] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        key = jax.device_put(jax.random.fold_in(base, i), token_weights.sharding)
        sums = eval_step(params, shard_batch(batch), token_weights, key)
        # Add on device (no sync per batch); fetch once at the end.
        totals = sums if not totals else {k: totals[k] + sums[k] for k in totals}
    if not totals:
        raise UserError("the held-out split gave no batch; prepare the data with --holdout > 0")
    return metrics_from_sums({k: float(v) for k, v in jax.device_get(totals).items()})


def evaluate_model(
    model: str,
    data_dir: str,
    *,
    batch_size: int = 32,
    max_len: int | None = None,
    max_batches: int = 0,
    dtype: str = "float32",
    split: str = "validation",
    step: int | None = None,
    seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """MLM loss / perplexity / accuracy of ``model`` on the held-out split of ``data_dir``.

    model: a jaxdistil run dir (latest or ``step`` checkpoint), a Flax model dir, a HF dir or hub id.
    The batch is spread over all devices (data parallel); ``batch_size`` is rounded up to a multiple
    of the device count. Returns the metrics plus "model", "params" and "step".
    """
    from jaxdistil.data import loader as loader_lib
    from jaxdistil.data import manifest as manifest_lib
    from jaxdistil.distill import sharding as shd
    from jaxdistil.distill.step import StepConfig, make_eval_step
    from jaxdistil.hf import load_model
    from jaxdistil.models import build_model

    manifest = manifest_lib.load_manifest(data_dir)
    loaded = load_model(model, step=step)
    if not loaded.has_mlm_head:
        raise UserError(
            f"{model} has no trained MLM head (an encoder-only checkpoint); masked-LM "
            "evaluation needs a *ForMaskedLM model"
        )
    tok_hash = None
    if loaded.tokenizer_dir:
        from jaxdistil.data.tokenization import tokenizer_hash_of_dir

        tok_hash = tokenizer_hash_of_dir(loaded.tokenizer_dir)
    manifest_lib.check_vocab(manifest, loaded.config.vocab_size, tok_hash, what=f"the model {model}")

    mesh = shd.make_mesh(shd.MeshConfig())
    n = shd.batch_divisor(mesh)
    batch_size = -(-batch_size // n) * n
    max_len = min(max_len or int(manifest["max_len"]), loaded.config.max_position_embeddings)
    # One padded length: a single compilation per model (held-out sets are small; padding is cheap).
    cfg = loader_lib.LoaderConfig(
        batch_size=batch_size, max_len=max_len, buckets=(max_len,), group_window=1, prefetch=0
    )
    masking = eval_masking()
    weights = eval_token_weights(manifest)
    step_cfg = StepConfig(masking=masking, mask_id=manifest["tokenizer"]["special_ids"]["mask"], dtype=dtype)
    net = build_model(loaded.config, dtype=step_cfg.compute_dtype)
    param_shardings = shd.param_shardings(net, mesh)
    params = shd.shard_params(loaded.params, param_shardings)
    eval_step = make_eval_step(net, step_cfg, mesh, shd.RULES, param_shardings)
    token_weights = jax.device_put(weights, shd.replicated(mesh))
    batches = loader_lib.eval_batches(manifest, cfg, split=split)
    out = evaluate_params(
        eval_step, params, batches, token_weights, lambda b: shd.shard_batch(b, mesh), max_batches, seed
    )
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(loaded.params))
    return {"model": str(model), "step": loaded.step, "params": n_params, **out}


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run dir, Flax model dir, Hugging Face dir or hub id")
    parser.add_argument("--data", required=True, help="prepared data directory (jaxdistil prepare)")
    parser.add_argument("--split", default="validation", help="split to score (default: the held-out one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=None, help="truncate sequences (default: the data's)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = all)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step of a run dir (default: latest)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    out = evaluate_model(
        args.model,
        args.data,
        batch_size=args.batch_size,
        max_len=args.max_len,
        max_batches=args.max_batches,
        dtype=args.dtype,
        split=args.split,
        step=args.step,
    )
    if args.json:
        print(json.dumps(out))
    else:
        step = f" (step {out['step']})" if out["step"] is not None else ""
        print(
            f"{out['model']}{step}: {out['params'] / 1e6:.2f}M params, {args.split} split, "
            f"{int(out['masked_tokens']):,} masked of {int(out['tokens']):,} tokens"
        )
        print(f"  mlm loss {out['loss']:.4f}  perplexity {out['perplexity']:.2f}", end="")
        print(f"  accuracy {out['accuracy']:.4f}")
    return 0
