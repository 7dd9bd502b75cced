#!/usr/bin/env bash
# Every GPU measurement of the distillation step in one run (about 6-8 minutes on an H100/H200):
# jaxdistil (bf16 compute, fp32 params and AdamW state) next to transformers eager bf16 and
# transformers + torch.compile bf16, at 64x128, 256x128 and 64x512, with the in-run bf16 matmul
# peak, peak device memory, compile / warm-up times, and a per-op profile summary of the jaxdistil
# step at each shape. Needs python3 with CUDA jax, flax, optax, orbax, torch and transformers
# (not grain or tensorflow-datasets).
#
#   bash benchmarks/gpu.sh                  # JSON to benchmarks/results/step_<device>.json
#   OUT=/some/dir bash benchmarks/gpu.sh    # JSON, traces and log under /some/dir
#   bash benchmarks/gpu.sh --dry-run        # the plan only (checks imports and arguments; any machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # jaxdistil from this checkout, installed or not
python3 - <<'PY'
import importlib, sys
for name in ("jax", "flax", "optax", "torch", "transformers"):
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        sys.exit(f"error: {name} is not importable ({e}); install it in this python3")
    print(f"{name} {getattr(mod, '__version__', '?')}")
PY
json="$out_dir/step_gpu.json"
if [ "$out_dir" = "benchmarks/results" ]; then json=""; fi     # default name: step_<device>.json
python3 benchmarks/step.py --device gpu --profile "$out_dir/profile" ${json:+--out "$json"} "$@" \
  2>&1 | tee "$out_dir/step_gpu.log"
