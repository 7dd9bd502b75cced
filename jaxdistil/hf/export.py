"""Write a Flax model as a Hugging Face ``*ForMaskedLM`` (or ``*ForSequenceClassification``)
directory, verified against PyTorch.

Layout written (what ``save_pretrained`` writes, plus the tokenizer):
  config.json                 model_type, architectures, tie_word_embeddings, dtype
  model.safetensors           metadata {"format": "pt"}; the tied decoder weight left out
  (or model-0000k-of-0000n.safetensors + model.safetensors.index.json over ``max_shard_size``)
  tokenizer.json, tokenizer_config.json, vocab.txt, ... copied from the run / model directory

Everything is written into a temporary directory beside the target and renamed into place only
after the verification passed: a failed export leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.hf import files
from jaxdistil.hf.load import load_model
from jaxdistil.hf.names import classifier_architecture, classifier_to_hf, flax_to_hf
from jaxdistil.hf.verify import (
    compare_with_transformers,
    flax_classifier_logits,
    sample_inputs,
    torch_available,
    torch_classifier_logits,
)
from jaxdistil.models.classification import ClassifierHead, check_classifier_config, token_types
from jaxdistil.models.configs import BertConfig, ConfigError, ModelConfig

TOLERANCE = 1e-4  # max |logits diff| allowed between the Flax model and the exported PyTorch model


@dataclasses.dataclass(frozen=True)
class ExportReport:
    output: Path
    files: tuple[str, ...]
    dtype: str
    verified: bool  # False when torch is not installed or verify=False
    max_abs_diff: float | None  # max |logits diff| over real tokens (None when not verified)
    note: str = ""


def hf_config(cfg: ModelConfig, dtype: str = "fp32") -> dict[str, Any]:
    """The ``config.json`` dict of the exported ``*ForMaskedLM`` model."""
    out = cfg.to_hf_dict()
    out.pop("tie_weights_", None)  # not a transformers field; tie_word_embeddings is
    out["tie_word_embeddings"] = True
    out["dtype"] = files.TORCH_DTYPE_NAMES[dtype]
    if isinstance(cfg, BertConfig):
        out["position_embedding_type"] = "absolute"
    return out


def _round_params(params: Any, dtype) -> Any:
    """Params rounded to the export dtype and back to fp32: what PyTorch sees after upcasting."""
    if isinstance(params, dict):
        return {k: _round_params(v, dtype) for k, v in params.items()}
    return np.asarray(params).astype(dtype).astype(np.float32)


def export_hf(cfg: ModelConfig, params: Any, output: str | Path, *, tokenizer_dir: str | Path | None = None,
              dtype: str = "fp32", max_shard_size: int | str = "5GB", force: bool = False,
              verify: bool = True, tolerance: float = TOLERANCE, has_mlm_head: bool = True) -> ExportReport:
    """Writes ``params`` (the unboxed Flax tree of ``build_model(cfg)``) as a HF directory.

    dtype: "fp32" | "bf16" | "fp16" for the stored tensors.
    verify: when torch is installed, load the written directory with ``AutoModelForMaskedLM``
      (and ``AutoTokenizer`` if tokenizer files were copied), run a few sentences through it and
      through the Flax model, and raise ``UserError`` (output untouched) when max |logits diff|
      exceeds ``tolerance``. For bf16/fp16 the Flax side uses the same rounded weights, so the
      comparison still checks the conversion at fp32 precision.
    """
    if dtype not in files.DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(files.DTYPES)}")
    if not has_mlm_head:
        raise UserError("this model has no trained MLM head (it was imported from an encoder-only "
                        "checkpoint such as BertModel); only masked-LM models can be exported")
    np_dtype = files.DTYPES[dtype]
    state = flax_to_hf(params, cfg, with_head=True, dtype=np_dtype)
    with files.atomic_output_dir(output, force) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2, sort_keys=True) + "\n")
        written = ["config.json", *files.write_state_dict(state, tmp, max_shard_size)]
        tok_files = files.copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir else []
        written += tok_files
        diff, note = None, ""
        if not verify:
            note = "verification skipped (verify=False)"
        elif not torch_available():
            note = "verification skipped: torch is not installed (pip install torch to check the export)"
        else:
            inputs = sample_inputs(tmp if tok_files else None, cfg)
            ref = params if dtype == "fp32" else _round_params(params, np_dtype)
            diffs = compare_with_transformers(tmp, cfg, ref, inputs, mlm=True)
            diff = diffs["logits"]
            if not diff <= tolerance:  # also catches NaN
                raise UserError(f"export verification failed: max |logits diff| {diff:.3g} > {tolerance:g} "
                                f"between the Flax model and transformers; nothing was written to {output}")
    return ExportReport(Path(output), tuple(sorted(written)), dtype, diff is not None, diff, note)


def export_classifier(cfg: ModelConfig, head: ClassifierHead, params: Any, output: str | Path, *,
                      tokenizer_dir: str | Path | None = None, dtype: str = "fp32", max_shard_size: int | str = "5GB",
                      force: bool = False, verify: bool = True, tolerance: float = TOLERANCE) -> ExportReport:
    """Writes a sequence classifier (``params``: encoder + head, ``jaxdistil.models.classification``)
    as a HF ``BertForSequenceClassification`` / ``DistilBertForSequenceClassification`` /
    ``RobertaForSequenceClassification`` / ``GPT2ForSequenceClassification`` directory; verified like
    ``export_hf`` with ``AutoModelForSequenceClassification`` (logits within ``tolerance``)."""
    if dtype not in files.DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(files.DTYPES)}")
    try:
        check_classifier_config(cfg)
    except ConfigError as err:
        raise UserError(str(err)) from None
    np_dtype = files.DTYPES[dtype]
    state = classifier_to_hf(params, cfg, head.num_labels, dtype=np_dtype)
    config = hf_config(cfg, dtype)
    config.update(head.to_hf_dict(), architectures=[classifier_architecture(cfg)])
    with files.atomic_output_dir(output, force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        written = ["config.json", *files.write_state_dict(state, tmp, max_shard_size)]
        tok_files = files.copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir else []
        written += tok_files
        diff, note = None, ""
        if not verify:
            note = "verification skipped (verify=False)"
        elif not torch_available():
            note = "verification skipped: torch is not installed (pip install torch to check the export)"
        else:
            inputs = sample_inputs(tmp if tok_files else None, cfg)
            types = np.zeros_like(inputs["input_ids"]) if token_types(cfg) else None
            ref = params if dtype == "fp32" else _round_params(params, np_dtype)
            ours = flax_classifier_logits(cfg, head, ref, inputs["input_ids"], inputs["attention_mask"], types)
            theirs = torch_classifier_logits(tmp, inputs["input_ids"], inputs["attention_mask"], types)
            diff = float(np.abs(ours - theirs).max())
            if not diff <= tolerance:
                raise UserError(f"export verification failed: max |logits diff| {diff:.3g} > {tolerance:g} "
                                f"between the Flax classifier and transformers; nothing was written to {output}")
    return ExportReport(Path(output), tuple(sorted(written)), dtype, diff is not None, diff, note)


def export_model(source: str | Path, output: str | Path, *, step: int | None = None,
                 **kwargs) -> ExportReport:
    """Exports what ``load_model(source, step)`` reads (run dir, Flax or HF model dir, hub id),
    with its tokenizer files: a sequence classifier as one (``export_classifier``), other models as
    ``*ForMaskedLM`` (``export_hf``); ``kwargs`` go to those."""
    files.check_output_dir(output, kwargs.get("force", False))  # before a possibly slow load
    loaded = load_model(source, step=step)
    if loaded.classifier is not None:
        return export_classifier(loaded.config, loaded.head, loaded.classifier_params(), output,
                                 tokenizer_dir=loaded.tokenizer_dir, **kwargs)
    return export_hf(loaded.config, loaded.params, output, tokenizer_dir=loaded.tokenizer_dir,
                     has_mlm_head=loaded.has_mlm_head, **kwargs)
