"""Continue a prompt with a causal LM (GPT-2): ``jaxdistil generate``.

Greedy decoding (transformers' ``generate(do_sample=False)``) or sampling at a temperature, a few
tokens at a time for a smoke test of a trained or exported model; no KV cache. As transformers'
``generate``, a continuation stops at the model's end-of-text token (``eos_token_id``), included.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.models import build_model
from jaxdistil.models.gpt2 import greedy_generate


def generate(loaded, tokenizer, prompts: str | list[str], new_tokens: int = 20, temperature: float = 0.0,
             seed: int = 0) -> list[dict[str, Any]]:
    """One continuation per prompt: {"prompt", "token_ids" (the new ids, at most ``new_tokens``, ending
    at the first eos), "text" (prompt + new text)}.

    loaded: a ``jaxdistil.hf.LoadedModel`` of a causal LM; tokenizer: its transformers tokenizer.
    """
    cfg = loaded.config
    if not cfg.causal:
        raise UserError(f"{loaded.path}: {cfg.model_type} is a masked LM; generate needs a causal LM "
                        "(GPT-2); use `jaxdistil fill-mask` for masked LMs")
    if new_tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    model = build_model(cfg)
    out = []
    key = jax.random.PRNGKey(seed)
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        ids = np.asarray(tokenizer(prompt)["input_ids"], np.int32)[None]
        if ids.shape[1] == 0:
            ids = np.asarray([[cfg.bos_token_id]], np.int32)  # an empty prompt starts at <|endoftext|>
        if ids.shape[1] + new_tokens > cfg.max_tokens:
            raise UserError(f"prompt ({ids.shape[1]} tokens) + {new_tokens} new tokens exceed the model's "
                            f"{cfg.max_tokens} positions; shorten the prompt or ask for fewer tokens")
        key, sub = jax.random.split(key)
        with jax.default_matmul_precision("highest"):  # fp32 as PyTorch (GPUs default to TF32)
            full = np.asarray(greedy_generate(model, loaded.params, ids, new_tokens, temperature,
                                              sub if temperature > 0 else None, eos_token_id=cfg.eos_token_id))[0]
        new = full[ids.shape[1]:].tolist()
        out.append({"prompt": prompt, "token_ids": new, "text": tokenizer.decode(full.tolist())})
    return out
