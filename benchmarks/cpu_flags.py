"""The prepared investigation of the CPU gap on Intel hosts (issue 28, point 0), run as one command.

On a 2-core Intel Xeon (AVX-512) the bert-base -> 6-layer step measured 0.69x transformers + eager
PyTorch, while on AMD EPYC hosts it is level (benchmarks/PERFORMANCE.md). This runs, on the host it
finds, ``benchmarks/step.py`` at 8x128 fp32 once per XLA:CPU variant that keeps the numbers (the
dot libraries XLA offers, vector width, fusion emitters; never fast-math), the first one with a
``jax.profiler`` trace summary, and writes one JSON per variant plus a summary table:

  python benchmarks/cpu_flags.py --dry-run          # the plan, and every variant's flags checked by XLA
  python benchmarks/cpu_flags.py                    # Intel host: all variants (~40 min on 2 cores)
  python benchmarks/cpu_flags.py --variants default,onednn --steps 6

On an AMD host it says so and stops unless ``--force`` (the AMD figure is already measured).
Each variant runs in its own process (XLA_FLAGS are read once, at import).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> XLA_FLAGS. Each keeps fp32 numerics (no fast-math); which one wins is the finding.
VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",  # Intel's oneDNN for dots (the library torch.mm uses there)
    "onednn-custom-call": "--xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "vector-512": "--xla_cpu_prefer_vector_width=512",  # AVX-512 wide vectors in XLA's own loops
    "no-fusion-emitters": "--xla_cpu_use_fusion_emitters=false",
    "legacy-runtime": "--xla_cpu_use_thunk_runtime=false",
}


def cpu_vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
            return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, vendor)
    return "unknown"


def flags_accepted(flags: str) -> tuple[bool, str]:
    """Does XLA:CPU of this jaxlib accept ``flags`` (a tiny dot compiles and runs)?"""
    code = "import jax, jax.numpy as jnp; print(float(jnp.dot(jnp.ones((4, 4)), jnp.ones((4, 4))).sum()))"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return out.returncode == 0 and out.stdout.strip() == "64.0", (out.stderr.strip().splitlines() or [""])[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "cpu_flags"), help="directory for the JSON files")
    p.add_argument("--force", action="store_true", help="run on a non-Intel host too")
    p.add_argument("--dry-run", action="store_true", help="print the plan, check every variant's flags, run nothing")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    vendor = cpu_vendor()
    print(f"host CPU vendor: {vendor}; {os.cpu_count()} cores; variants: {', '.join(names)}")
    bad = []
    for name in names:
        ok, why = flags_accepted(VARIANTS[name])
        print(f"  {name:20} XLA_FLAGS={VARIANTS[name]!r}: {'accepted' if ok else 'REFUSED: ' + why}")
        if not ok:
            bad.append(name)
    if args.dry_run:
        return 1 if bad else 0
    if vendor != "intel" and not args.force:
        print(f"this is an {vendor.upper()} host, where the step is already level with PyTorch; the investigation "
              "is for an Intel host (pass --force to run it here anyway)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(n for n in names if n not in bad):
        path = out / f"step_cpu_{name}.json"
        cmd = [sys.executable, str(HERE / "step.py"), "--device", "cpu", "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--out", str(path)]
        if i == 0:
            cmd += ["--profile", str(out / "profile")]
        env = {**os.environ, "XLA_FLAGS": VARIANTS[name]}
        print(f"\n== {name}: XLA_FLAGS={VARIANTS[name]!r}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            rows.append((name, None))
            continue
        shape = json.loads(path.read_text())["shapes"][0]
        rows.append((name, shape))
    print("\nvariant               jax tok/s  torch tok/s  ratio  jax CPU-s/step")
    for name, shape in rows:
        if shape is None:
            print(f"{name:20}  failed")
            continue
        j, t = shape["impls"]["jax"], shape["impls"].get("torch-eager", {})
        print(f"{name:20} {j['tokens_per_s']:>10.1f} {t.get('tokens_per_s', float('nan')):>12.1f} "
              f"{shape['ratios'].get('jax_vs_torch-eager', float('nan')):>6.2f} {j['cpu_s_per_step']:>15.2f}")
    (out / "summary.json").write_text(json.dumps({"vendor": vendor, "variants": {n: VARIANTS[n] for n, _ in rows},
                                                  "shapes": {n: s for n, s in rows}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
