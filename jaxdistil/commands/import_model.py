"""``jaxdistil import --model HF_DIR_OR_HUB_ID --output FLAX_DIR [--force]``: a Flax model directory."""

from __future__ import annotations

import argparse

import jax

from jaxdistil.hf import files
from jaxdistil.hf.load import load_model, save_flax_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face directory or hub id (BERT / DistilBERT)")
    parser.add_argument("--output", required=True,
                        help="Flax model directory to write (config.json + params/)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    files.check_output_dir(args.output, args.force)  # fail before a possibly long download
    loaded = load_model(args.model)
    save_flax_model(loaded.config, loaded.params, args.output, has_mlm_head=loaded.has_mlm_head,
                    tokenizer_dir=loaded.tokenizer_dir, force=args.force, origin=str(args.model),
                    classifier=loaded.classifier, head=loaded.head)
    n_params = sum(int(a.size) for a in jax.tree.leaves(loaded.params))
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
