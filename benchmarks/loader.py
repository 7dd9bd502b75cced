"""How fast the grain loader makes batches, next to how fast the train step consumes them.

Prepares the built-in corpus (``builtin:python-docs``, WordPiece 8000, max-len 128) in a temporary
directory unless ``--data DIR`` names prepared data, then times the loader in the configurations a
run uses: length-grouped padded batches and packed batches, at the step benchmark's shape (8x128)
and a larger one. Tokens/s counts batch slots (B x T per batch, what a step of that shape
consumes) and, separately, real (non-padding) tokens.

The step's figure comes from ``--step-tokens-per-s`` or ``benchmarks/results/step_cpu.json``
(written by ``benchmarks/step.py``; the fastest implementation and shape there is used, the most
demanding consumer). The loader must be at least 10x faster.

  python benchmarks/loader.py                  # prints a table, writes results/loader_cpu.json
  python benchmarks/loader.py --data data/pydocs --batches 400 --step-tokens-per-s 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED_RATIO = 10.0
CONFIGS = (  # name, batch, max_len, packed
    ("padded 8x128", 8, 128, False),
    ("packed 8x128", 8, 128, True),
    ("padded 64x128", 64, 128, False),
    ("packed 64x128", 64, 128, True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", help="prepared data directory (default: prepare the built-in corpus in a temp dir)"
    )
    p.add_argument("--batches", type=int, default=300, help="batches timed per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (the median is reported)")
    p.add_argument(
        "--step-tokens-per-s",
        type=float,
        default=None,
        help="the train step's tokens/s (default: read results/step_cpu.json)",
    )
    p.add_argument("--out", default=str(RESULTS_DIR / "loader_cpu.json"))
    return p.parse_args(argv)


def step_figure(explicit: float | None) -> tuple[float | None, str]:
    """The step's tokens/s and where it came from."""
    if explicit:
        return explicit, "--step-tokens-per-s"
    path = RESULTS_DIR / "step_cpu.json"
    if not path.is_file():
        return None, "none (run benchmarks/step.py or pass --step-tokens-per-s)"
    report = json.loads(path.read_text())
    best, where = None, ""
    for shape in report.get("shapes", []):
        for impl, r in shape.get("impls", {}).items():
            tps = r.get("tokens_per_s")
            if tps and (best is None or tps > best):
                best, where = tps, f"{path.name}: {impl} {shape.get('batch')}x{shape.get('seq')}"
    return best, where or f"{path.name} (no figures)"


def time_config(data_dir: str, batch: int, max_len: int, packed: bool, n_batches: int, rounds: int) -> dict:
    from jaxdistil.data.loader import LoaderConfig, make_loader

    cfg = LoaderConfig(batch_size=batch, max_len=max_len, packed=packed)
    it = make_loader(data_dir, "train", cfg, shard_index=0, shard_count=1)
    start = time.perf_counter()
    first = next(it)  # includes opening the shards and starting the threads
    first_s = time.perf_counter() - start
    rates, real_rates, pad = [], [], []
    for _ in range(rounds):
        slots = real = 0
        start = time.perf_counter()
        for _ in range(n_batches):
            b = next(it)
            slots += b["input_ids"].size
            real += int(b["attention_mask"].sum())
        dt = time.perf_counter() - start
        rates.append(slots / dt)
        real_rates.append(real / dt)
        pad.append(1 - real / slots)
    del first
    return {
        "batch": batch,
        "max_len": max_len,
        "packed": packed,
        "batches_per_round": n_batches,
        "rounds": rounds,
        "first_batch_s": round(first_s, 4),
        "tokens_per_s": round(statistics.median(rates), 1),
        "real_tokens_per_s": round(statistics.median(real_rates), 1),
        "batches_per_s": round(statistics.median(rates) / (batch * max_len), 1),
        "pad_fraction": round(statistics.median(pad), 4),
        "round_tokens_per_s": [round(r, 1) for r in rates],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    tmp = None
    data_dir = args.data
    if data_dir is None:
        from jaxdistil.data.prepare import PrepareConfig, prepare

        tmp = tempfile.TemporaryDirectory(prefix="jaxdistil-loader-bench-")
        data_dir = os.path.join(tmp.name, "data")
        start = time.perf_counter()
        man = prepare(
            PrepareConfig("builtin:python-docs", "train:8000", data_dir, max_len=128),
            progress=False,
            log=lambda m: print("  prepare: " + m, flush=True),
        )
        dt = time.perf_counter() - start
        train = man["splits"]["train"]
        report["prepare"] = {
            "seconds": round(dt, 2),
            "documents": train["documents"],
            "tokens": train["tokens"],
            "workers": os.cpu_count(),
        }
        print(
            f"prepare builtin:python-docs: {dt:.1f} s for {train['documents']:,} documents, "
            f"{train['tokens']:,} tokens",
            flush=True,
        )
    from jaxdistil.data.manifest import load_manifest

    man = load_manifest(data_dir)
    report["data"] = {
        "dir": str(data_dir) if args.data else "builtin:python-docs (temporary)",
        "train_sequences": man["splits"]["train"]["sequences"],
        "train_tokens": man["splits"]["train"]["tokens"],
    }

    results = []
    for name, batch, max_len, packed in CONFIGS:
        r = {"name": name, **time_config(data_dir, batch, max_len, packed, args.batches, args.rounds)}
        results.append(r)
        print(
            f"  {name:14s} {r['tokens_per_s']:12,.0f} tokens/s  ({r['real_tokens_per_s']:,.0f} real, "
            f"{100 * r['pad_fraction']:.1f}% padding, {r['batches_per_s']:,.0f} batches/s, "
            f"first batch {r['first_batch_s']:.2f} s)",
            flush=True,
        )
    report["configs"] = results

    step_tps, source = step_figure(args.step_tokens_per_s)
    report["step_tokens_per_s"] = step_tps
    report["step_source"] = source
    slowest = min(results, key=lambda r: r["tokens_per_s"])
    if step_tps:
        ratio = slowest["tokens_per_s"] / step_tps
        report["ratio_slowest_loader_vs_step"] = round(ratio, 1)
        report["meets_10x"] = ratio >= REQUIRED_RATIO
        print(
            f"train step: {step_tps:,.1f} tokens/s ({source}); slowest loader ({slowest['name']}) is "
            f"{ratio:,.0f}x that: {'OK' if ratio >= REQUIRED_RATIO else 'TOO SLOW'} (need >= 10x)",
            flush=True,
        )
    else:
        print(f"train step: no figure ({source})", flush=True)
    report["load_avg_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
