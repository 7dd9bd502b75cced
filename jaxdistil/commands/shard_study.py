"""``jaxdistil shard-study [--host-devices N] [MESH ...] [key=value ...]``: meshes compared side by side.

This module imports no JAX at its top: ``--host-devices N`` sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jaxdistil.errors import UserError

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compare mesh strategies for the distillation step: per-device memory, collectives, FLOPs, "
        "compile and step time, tokens/s and the loss, one row per mesh. For a CPU study with N "
        f"simulated devices, set XLA_FLAGS={HOST_DEVICES_FLAG}=N or pass --host-devices N.")
    parser.add_argument(
        "items", nargs="*", metavar="MESH|KEY=VALUE",
        help="meshes (data=8, fsdp=8, data=2,fsdp=2,tensor=2; an axis left out is 1, data takes the "
             "rest) and config overrides with a dot (train.dtype=bfloat16), including logical-axis rule "
             "overrides: rules.mlp=tensor, rules.embed=fsdp,tensor, rules.vocab=none")
    parser.add_argument("--meshes", nargs="+", default=[], metavar="MESH",
                        help="meshes to compare (same syntax as above); default: data=N and fsdp=N")
    parser.add_argument("--config", default=None,
                        help="run config YAML (teacher, student, loss, optim, mesh.rules...)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch rows (default: loader.batch_size)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: loader.max_len)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per mesh (default 3); 0: compile and analyse only, nothing placed or "
                             "run (for shapes too large for this machine: no step time, no loss)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps before them (default 1); the loss is taken after warmup+steps")
    parser.add_argument("--output", default="shard-study", help="directory for CSV, JSON, Markdown, PNG, HLO")
    parser.add_argument("--seed", type=int, default=None, help="init and batch seed (default: train.seed)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="losses must agree within tolerance x max(1, |loss|) (default 1e-5)")
    parser.add_argument("--allow-replicate", action="store_true",
                        help="replicate a dimension its rule cannot split evenly (noted per mesh) "
                             "instead of stopping with an error")
    parser.add_argument("--host-devices", type=int, default=None, metavar="N",
                        help=f"run on N simulated CPU devices (sets XLA_FLAGS={HOST_DEVICES_FLAG}=N "
                             "before JAX starts)")
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                        help="XLA option for the step's compile, e.g. xla_backend_optimization_level=0 "
                             "(repeatable; the same for every mesh)")
    parser.add_argument("--no-hlo", action="store_true", help="do not write each mesh's optimized HLO")
    parser.add_argument(
        "--predict", default=None, metavar="TARGETS",
        help="predict each mesh's step time, tokens/s, MFU, memory fit and bound on accelerators, from its "
             "compiled program (model roofline-v1, docs/sharding-study.md): comma-separated H100, H200, A100 "
             "(xN for N GPUs in nodes of 8, e.g. H100x16), v4-N / v5p-N (N TensorCores, 2 per chip: v5p-16 = "
             "8 chips), v5e-N / v6e-N (N chips), cpu (this machine, calibrated now). A name without a count "
             "takes the mesh's device count; one with a count must match it")


def split_items(items: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """Positional items -> (meshes, config overrides, rule overrides).

    A config key always has a dot (``train.dtype``); a mesh never does (``data=2,fsdp=4``).
    ``rules.X=...`` (and ``mesh.rules.X=...``) are rule overrides.
    """
    meshes, overrides, rules = [], [], []
    for item in items:
        key = item.split("=", 1)[0].strip()
        if "." not in key:
            meshes.append(item)
        elif key.startswith(("rules.", "mesh.rules.")):
            rules.append(item.removeprefix("mesh."))
        else:
            overrides.append(item)
    return meshes, overrides, rules


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(
            f"--compiler-option {text!r} is not KEY=VALUE (e.g. xla_backend_optimization_level=0)")
    value = value.strip()
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key.strip(), value.lower() == "true"
    return key.strip(), value


def _set_host_devices(n: int) -> None:
    """Asks XLA for ``n`` CPU devices; must happen before JAX initialises its backends."""
    if n < 1:
        raise UserError(f"--host-devices must be >= 1, got {n}")
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(re.escape(HOST_DEVICES_FLAG) + r"=(\d+)", flags)
    if found and int(found.group(1)) != n:
        raise UserError(f"XLA_FLAGS already sets {HOST_DEVICES_FLAG}={found.group(1)} but --host-devices "
                        f"is {n}; "
                        "drop one of them")
    if not found:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={n}".strip()
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        have = len(jax.devices("cpu"))
        if have != n:
            raise UserError(f"--host-devices {n} came too late: JAX already started with {have} CPU devices; "
                            f"set XLA_FLAGS={HOST_DEVICES_FLAG}={n} in the environment instead")


def run(args: argparse.Namespace) -> int:
    if args.host_devices is not None:
        _set_host_devices(args.host_devices)  # before anything imports jax
    meshes, overrides, rules = split_items(list(args.items) + list(args.meshes))
    options = dict(_parse_option(o) for o in args.compiler_option)
    from jaxdistil.study.hardware import parse_targets

    targets = parse_targets(args.predict) if args.predict is not None else []

    # Imported only now: --host-devices must set XLA_FLAGS before JAX starts.
    import jax

    from jaxdistil.distill.config import load_run_config
    from jaxdistil.study.report import prediction_notes, print_table
    from jaxdistil.study.study import describe_models, run_study, setup_from_run_config, write_outputs
    from jaxdistil.training.sharding import MeshConfig

    devices = jax.devices("cpu") if args.host_devices is not None else jax.devices()
    n = len(devices)
    meshes = meshes or [f"data={n}", f"fsdp={n}"]
    for m in meshes:  # mesh errors first, before the config is read
        MeshConfig.parse(m).resolve(n, m)
    cfg = load_run_config(args.config, overrides)
    total = args.warmup + args.steps
    setup = setup_from_run_config(cfg, args.batch, args.seq, args.seed, rules,
                                  strict=not args.allow_replicate, total_steps=total)
    if setup.batch < 1 or setup.seq < 2:
        raise UserError(f"--batch must be >= 1 and --seq >= 2, got {setup.batch} and {setup.seq}")
    if setup.seq > setup.student.max_tokens:
        raise UserError(
            f"--seq {setup.seq} exceeds the model's {setup.student.max_tokens} positions")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out = Path(args.output)
    report = run_study(setup, meshes, args.steps, args.warmup, args.tolerance, devices, log, options,
                       None if args.no_hlo else out / "hlo", targets)
    title = describe_models(setup)
    paths = write_outputs(report, out, title)
    print_table(report.results, title=title)
    for res in report.results:
        for note in res.notes:
            print(f"  {res.mesh}: {note}")
    for line in prediction_notes(report.results):
        print(f"  {line}")
    ref = report.results[0].mesh
    if args.steps == 0:
        print("compiled and analysed only (--steps 0): no step ran, no losses to compare")
    elif report.agree:
        print(f"losses agree: every strategy within {args.tolerance:g} x max(1, |loss|) of {ref} "
              f"after {total} steps")
    else:
        worst = max(report.results, key=lambda r: abs(r.loss_delta or 0.0))
        print(f"LOSSES DISAGREE: {worst.mesh} differs by {worst.loss_delta:+.3g} from {ref} "
              f"(tolerance {args.tolerance:g} x max(1, |loss|))")
    meta = report.meta
    load_start, load_end = meta["load_average_1min"]
    print(f"{meta['cpu']} ({meta['cpu_cores']} cores), {meta['backend']} x {meta['devices']}, "
          f"jax {meta['jax']}, {meta['date']}; 1-min load average {load_start} at start, {load_end} at end")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.agree else 1
