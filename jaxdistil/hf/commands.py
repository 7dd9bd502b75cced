"""``jaxdistil export`` and ``jaxdistil import``: argument parsing over ``jaxdistil.hf``.

  jaxdistil export --run RUN_DIR [--step N] --output HF_DIR [--dtype fp32|bf16|fp16] [--force]
  jaxdistil export --model FLAX_OR_HF_DIR --output HF_DIR ...
  jaxdistil import --model HF_DIR_OR_HUB_ID --output FLAX_DIR [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxdistil.errors import UserError
from jaxdistil.hf import files
from jaxdistil.hf.export import TOLERANCE, export_model
from jaxdistil.hf.load import is_run_dir, load_model, save_flax_model


def add_arguments_export(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="jaxdistil run directory (its student is exported)")
    src.add_argument("--model", help="Flax model directory, HF directory or hub id (re-export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of the run (default: latest)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=sorted(files.DTYPES), default="fp32",
                        help="dtype of the stored tensors")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    parser.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the check against transformers' PyTorch model "
                             "(it runs when torch is installed)")


def run_export(args: argparse.Namespace) -> int:
    source = args.run or args.model
    if args.run and Path(args.run).is_dir() and not is_run_dir(args.run):
        raise UserError(f"{args.run} is not a jaxdistil run directory (no config.yaml, checkpoints/ or "
                        "student/config.json); pass model directories with --model")
    report = export_model(source, args.output, step=args.step, dtype=args.dtype, force=args.force,
                          max_shard_size=args.max_shard_size, verify=not args.no_verify)
    print(f"exported {source} -> {report.output} ({args.dtype}): {', '.join(report.files)}")
    if report.verified:
        print(f"verified with transformers: max |logits diff| = {report.max_abs_diff:.3g} "
              f"(limit {TOLERANCE:g})")
    else:
        print(report.note)
    return 0


def add_arguments_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face directory or hub id (BERT / DistilBERT)")
    parser.add_argument("--output", required=True,
                        help="Flax model directory to write (config.json + params/)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")


def run_import(args: argparse.Namespace) -> int:
    files.check_output_dir(args.output, args.force)  # fail before a possibly long download
    loaded = load_model(args.model)
    save_flax_model(loaded.config, loaded.params, args.output, has_mlm_head=loaded.has_mlm_head,
                    tokenizer_dir=loaded.tokenizer_dir, force=args.force, origin=str(args.model))
    n_params = sum(int(a.size) for a in _leaves(loaded.params))
    print(f"imported {args.model} ({type(loaded.config).__name__}, {loaded.config.layers} layers, "
          f"{n_params:,} parameters) -> {args.output}")
    if not loaded.has_mlm_head:
        print("note: the checkpoint has no MLM head (encoder only); an untrained head was added - "
              "fine for a teacher's hidden states, not for its logits")
    if loaded.ignored:
        print(f"ignored tensors not used by the masked-LM model: {', '.join(loaded.ignored)}")
    if loaded.tokenizer_dir is None:
        print("note: no tokenizer files found; pass a tokenizer to training separately")
    return 0


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


# The cli table maps both commands to this module; plain add_arguments/run default to export.
add_arguments = add_arguments_export
run = run_export
