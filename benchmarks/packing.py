"""Useful tokens per second: jaxdistil's packed rows against the reference's length-grouped padded
micro-batches, on a corpus with a real length distribution, in the same run.

The corpus is the built-in one (``builtin:python-docs``: the docstrings of this Python's standard
library), prepared by ``jaxdistil prepare`` with the shipped teacher's tokenizer at each ``max_len``
(documents longer than max_len are chunked and short ones dropped, as the reference's
``binarized_data.py`` / ``lm_seqs_dataset.py`` do). Then, per max_len:

- jaxdistil: ``steps`` packed training batches of ``batch`` rows x max_len from its own loader
  (``loader.packed: true``: grain's first-fit packer, segment ids and restarting positions, so no
  token attends across sequences); one compiled shape.
- the reference: one epoch of the whole training split in micro-batches of 5 sequences (its README's
  ``--batch_size 5``) made by its ``group_by_size`` sampler (``grouped_batch_sampler.py``, reproduced
  below: length bins of 4 tokens, a micro-batch yielded as soon as one bin holds 5 sequences, the
  leftovers merged in bin order at the end), each padded to its longest sequence; an update
  accumulates k consecutive micro-batches (``--gradient_accumulation_steps``), k = the packed steps'
  mean number of sequences / 5, so both sides update on about as many sequences; ``steps`` updates
  are drawn at random from the epoch (their lengths and padding are the epoch's).

Both run the same bert-base -> 6-layer DistilBERT step as ``benchmarks/step.py`` (triple loss,
dynamic masking, AdamW), fp32 on CPU, rounds interleaved. Reported: real (non-padding) tokens per
second of each side, the padding share of each, CPU seconds per useful token and the ratio.
The two sides see different batches (packed rows mix sequences), so their losses are not compared.

  python benchmarks/packing.py                        # max_len 128 and 512, 8 rows per packed batch
  python benchmarks/packing.py --max-lens 128 --steps 4 --data-dir /some/cache

Figures go to ``benchmarks/results/packing_cpu.json``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as step_bench  # benchmarks/step.py: the two steps

RESULTS = Path(__file__).resolve().parent / "results" / "packing_cpu.json"
BIN_WIDTH = 4  # the reference's create_lengths_groups: np.arange(0, max_model_input_size, 4)
MICRO_BATCH = 5  # sequences per micro-batch: the reference README's --batch_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-lens", default="128,512", help="comma list of max_len values")
    p.add_argument("--batch", type=int, default=8, help="rows per packed batch")
    p.add_argument("--steps", type=int, default=6, help="timed packed steps per max_len")
    p.add_argument("--rounds", type=int, default=2, help="the timed steps split into interleaved rounds")
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="small widths (a test of the script, not a figure)")
    p.add_argument("--source", default="builtin:python-docs",
                   help="the corpus (what `jaxdistil prepare --source` takes); the figures use the built-in one")
    p.add_argument("--data-dir", default=None,
                   help="where the prepared corpus is kept between runs (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The reference's sampler
# ---------------------------------------------------------------------------------------------


def length_groups(lengths: Sequence[int], max_len: int) -> np.ndarray:
    """The group of each sequence: its bin among ``0, 4, 8, ... < max_len`` (``np.digitize``)."""
    bins = np.arange(0, max_len, BIN_WIDTH)
    return np.digitize(np.asarray(lengths), bins, right=False)


def group_by_size(order: Sequence[int], groups: np.ndarray, batch_size: int) -> Iterator[list[int]]:
    """The reference's GroupedBatchSampler (drop_last False) over ``order`` (the indices its
    RandomSampler drew): one buffer per group, a batch yielded when a buffer holds ``batch_size``
    indices; at the end the leftover buffers, in group order, are concatenated and cut into batches
    (the last one shorter), so the sampler yields ``ceil(n / batch_size)`` batches."""
    buffers: dict[int, list[int]] = defaultdict(list)
    for idx in order:
        g = int(groups[idx])
        buffers[g].append(int(idx))
        if len(buffers[g]) == batch_size:
            yield buffers.pop(g)
    rest: list[int] = []
    for g in sorted(buffers):
        rest.extend(buffers[g])
        while len(rest) >= batch_size:
            yield rest[:batch_size]
            rest = rest[batch_size:]
    if rest:
        yield rest


def padded_batch(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``batch_sequences``: pad to the batch's longest sequence."""
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, np.int32)
    attn = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = s, 1
    return ids, attn


def unpack(batch: dict) -> list[np.ndarray]:
    """The sequences a packed batch holds (segment 0 is padding)."""
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            out.append(ids[seg == s])
    return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def teacher_dir() -> Path:
    return Path(str(importlib.resources.files("jaxdistil") / "assets" / "teacher-pydocs"))


def prepared_corpus(root: Path, source: str, max_len: int) -> Path:
    """``source`` prepared at ``max_len`` under ``root`` (kept when it is there already)."""
    from jaxdistil.data.manifest import MANIFEST_NAME
    from jaxdistil.data.prepare import PrepareConfig, prepare

    out = root / f"{''.join(c if c.isalnum() else '-' for c in source)}-{max_len}"
    if not (out / MANIFEST_NAME).is_file():
        print(f"preparing {source} at max_len {max_len} in {out}", flush=True)
        prepare(PrepareConfig(source, str(teacher_dir()), out, max_len=max_len, force=True,
                              workers=os.cpu_count()), progress=False, log=lambda msg: None)
    return out


def train_sequences(manifest: dict, max_len: int) -> list[np.ndarray]:
    """Every sequence of the training split as the loader decodes it (truncated to max_len)."""
    import grain

    from jaxdistil.data import manifest as manifest_lib
    from jaxdistil.data.loader import DecodeIds

    source = grain.sources.ArrayRecordDataSource(manifest_lib.split_files(manifest, "train"))
    decode = DecodeIds(manifest["dtype"], max_len, manifest["tokenizer"]["special_ids"]["sep"])
    return [decode(source[i]) for i in range(len(source))]


def packed_batches(data: Path, batch: int, max_len: int, n: int) -> list[dict]:
    from jaxdistil.data.loader import LoaderConfig, make_loader

    it = make_loader(data, "train", LoaderConfig(batch_size=batch, max_len=max_len, packed=True, seed=0,
                                                 prefetch=0), shard_index=0, shard_count=1)
    return [next(it) for _ in range(n)]


def model_configs(args):
    if not args.tiny:
        return step_bench.recipe_configs("distilbert", args.teacher_layers, args.student_layers)
    from jaxdistil.models import BertConfig, DistilBertConfig

    return (BertConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, max_position_embeddings=512),
            DistilBertConfig(vocab_size=4096, dim=64, n_layers=1, n_heads=2, hidden_dim=128,
                             max_position_embeddings=512))


# ---------------------------------------------------------------------------------------------
# One max_len
# ---------------------------------------------------------------------------------------------


def bench_length(args, root: Path, max_len: int) -> dict:
    from jaxdistil.data import manifest as manifest_lib

    data = prepared_corpus(root, args.source, max_len)
    manifest = manifest_lib.load_manifest(data)
    special = manifest["tokenizer"]["special_ids"]
    tcfg, scfg = model_configs(args)
    weights = np.zeros(scfg.vocab_size, np.float32)  # the corpus' masking weights, 0 past its vocabulary
    corpus_weights = manifest_lib.token_weights(manifest)
    weights[: len(corpus_weights)] = corpus_weights

    # One warm-up batch (compilation, first steps) and `steps` timed ones on each side.
    packed = packed_batches(data, args.batch, max_len, args.steps + 1)
    warm_seqs, timed = unpack(packed[0]), packed[1:]
    packed_seqs = [s for b in timed for s in unpack(b)]
    accum = max(1, round(len(packed_seqs) / len(timed) / MICRO_BATCH))
    seqs = train_sequences(manifest, max_len)
    lengths = [len(s) for s in seqs]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(seqs))  # the reference's RandomSampler
    epoch = list(group_by_size(order, length_groups(lengths, max_len), MICRO_BATCH))
    epoch_padding = 1 - sum(lengths) / sum(len(idx) * max(lengths[i] for i in idx) for idx in epoch)
    starts = rng.choice(len(epoch) // accum, size=min(args.steps, len(epoch) // accum), replace=False) * accum
    ref_updates = [[padded_batch([seqs[i] for i in epoch[k]], special["pad"]) for k in range(start, start + accum)]
                   for start in starts]
    packed_real = sum(len(s) for s in packed_seqs)
    packed_slots = len(timed) * args.batch * max_len
    ref_real = sum(int(attn.sum()) for u in ref_updates for _, attn in u)
    ref_slots = sum(ids.size for u in ref_updates for ids, _ in u)
    print(f"max_len {max_len}: {len(seqs)} training sequences (mean {np.mean(lengths):.1f} tokens, median "
          f"{np.median(lengths):.0f}, max {max(lengths)}); {len(timed)} packed batches of {args.batch}x{max_len} "
          f"({len(packed_seqs)} sequences, {1 - packed_real / packed_slots:.1%} padding) | the reference: an epoch "
          f"of {len(epoch)} micro-batches of {MICRO_BATCH} ({epoch_padding:.1%} padding), {len(ref_updates)} "
          f"updates of {accum} timed ({1 - ref_real / ref_slots:.1%} padding)", flush=True)

    run_args = argparse.Namespace(no_dropout=False)
    jax_step = step_bench.JaxStep(run_args, tcfg, scfg, args.batch, max_len, "fp32",
                                  data=step_bench.BatchData(packed[0], weights, special["pad"], special["mask"]))
    jax_step.run(2)
    warm_ids, warm_attn = padded_batch(warm_seqs[:MICRO_BATCH], special["pad"])
    torch_step = step_bench.TorchStep(run_args, tcfg, scfg, MICRO_BATCH, warm_ids.shape[1], "fp32", gpu=False,
                                      compile=False, data=step_bench.BatchData(
                                          {"input_ids": warm_ids, "attention_mask": warm_attn}, weights,
                                          special["pad"], special["mask"]))
    torch_step.run_update([(warm_ids, warm_attn)] * accum)

    sides = {"jax-packed": {"wall_s": [], "cpu_s": [], "tokens": []},
             "torch-eager-grouped": {"wall_s": [], "cpu_s": [], "tokens": []}}
    rounds = max(1, min(args.rounds, len(timed)))

    def timed_round(name, runner, batches, run):
        t0, c0, tokens = time.perf_counter(), time.process_time(), 0
        for b in batches:
            run(b)
            tokens += runner.tokens
        sides[name]["wall_s"].append(time.perf_counter() - t0)
        sides[name]["cpu_s"].append(time.process_time() - c0)
        sides[name]["tokens"].append(tokens)

    for r in range(rounds):
        timed_round("jax-packed", jax_step, timed[r::rounds], lambda b: (jax_step.set_batch(b), jax_step.run(1)))
        timed_round("torch-eager-grouped", torch_step, ref_updates[r::rounds], torch_step.run_update)
    jax_step.close()
    torch_step.close()

    result = {"max_len": max_len, "train_sequences": len(seqs),
              "mean_length": round(float(np.mean(lengths)), 2), "median_length": float(np.median(lengths)),
              "packed": {"batches": len(timed), "rows": args.batch, "sequences": len(packed_seqs),
                         "real_tokens": packed_real, "padding": round(1 - packed_real / packed_slots, 4)},
              "reference": {"updates": len(ref_updates), "micro_batch": MICRO_BATCH, "accumulation": accum,
                            "epoch_micro_batches": len(epoch),
                            "epoch_padding": round(epoch_padding, 4), "real_tokens": ref_real,
                            "padding": round(1 - ref_real / ref_slots, 4)},
              "sides": {}}
    for name, s in sides.items():
        tokens, wall, cpu = sum(s["tokens"]), sum(s["wall_s"]), sum(s["cpu_s"])
        result["sides"][name] = {
            "useful_tokens": tokens, "useful_tokens_per_s": round(tokens / wall, 2), "cpu_ms_per_useful_token": round(1e3 * cpu / tokens, 3),
            "round_tokens_per_s": [round(t / w, 2) for t, w in zip(s["tokens"], s["wall_s"])]}
        print(f"  {name:20s} {tokens / wall:9.1f} useful tokens/s, {1e3 * cpu / tokens:.2f} CPU-ms per useful "
              f"token, rounds {result['sides'][name]['round_tokens_per_s']}", flush=True)
    ours, ref = result["sides"]["jax-packed"], result["sides"]["torch-eager-grouped"]
    result["ratio"] = round(ours["useful_tokens_per_s"] / ref["useful_tokens_per_s"], 3)
    result["ratio_cpu_time"] = round(ref["cpu_ms_per_useful_token"] / ours["cpu_ms_per_useful_token"], 3)
    print(f"  ratio jax-packed / torch-eager-grouped: {result['ratio']:.3f} (CPU time {result['ratio_cpu_time']:.3f})",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    max_lens = [int(x) for x in args.max_lens.split(",")]
    if args.steps < 1 or args.batch < 1 or any(m < 16 for m in max_lens):
        raise SystemExit("error: --steps and --batch must be >= 1 and every --max-lens value >= 16")
    import jax
    import torch

    load = step_bench.other_load()
    print(f"device: {step_bench.cpu_model()} ({os.cpu_count()} cores) jax {jax.__version__} torch "
          f"{torch.__version__} | load avg before start {load:.2f}", flush=True)
    report = {"device": step_bench.cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
              "torch": torch.__version__, "load_avg_before": load, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "teacher_layers": args.teacher_layers, "student_layers": args.student_layers, "tiny": args.tiny,
              "source": args.source,
              "batch": args.batch, "lengths": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        for max_len in max_lens:
            report["lengths"].append(bench_length(args, root, max_len))
            out.write_text(json.dumps(report, indent=2) + "\n")
    report["load_avg_after"] = step_bench.other_load()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
