"""The single-GPU distillation step measured at three shapes next to the shard study's prediction for
that GPU (issue 29, point 4): how far roofline-v1 is from a real accelerator.

For each shape (bert-base teacher, 6-layer student of its width, bf16 compute, fp32 params and
AdamW, the default triple loss):

  predicted  the step compiled for ONE CPU device from abstract arguments, read by
             ``jaxdistil.study.cost`` and timed by ``jaxdistil.study.predict`` on the target GPU: what
             ``jaxdistil shard-study --predict H100 --steps 0`` reports (the CPU's program, as the
             study uses it on a machine without the accelerator);
  measured   the same step built, compiled and run on the GPU: median of ``--steps`` timed steps
             after ``--warmup``; the GPU's own compiled program is also read by the cost model, so
             the JSON shows both programs' FLOPs and memory bytes.

  python benchmarks/predict_gpu.py                       # on a GPU: JSON to benchmarks/results/predict_<gpu>.json
  python benchmarks/predict_gpu.py --dry-run             # any machine: the plan and the predictions, no GPU
  python benchmarks/predict_gpu.py --dry-run --target H200 --shapes 4x32 --teacher-layers 1 --student-layers 1

Needs jax (CUDA build on the GPU machine), flax, optax and this checkout (PYTHONPATH is set to it
by the caller or found from this file); no torch, grain or tensorflow-datasets.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # jaxdistil from this checkout, installed or not

SHAPES = ((64, 128), (256, 128), (64, 512))  # the shapes of benchmarks/gpu.sh
KINDS = {"H100": "H100", "H200": "H200", "A100": "A100"}  # device_kind substring -> target name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None,
                   help="the GPU to predict for (H100, H200, A100); default: the GPU JAX sees (H100 in a dry run)")
    p.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="comma list of BxT shapes")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="timed steps per shape on the GPU")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/predict_<gpu>.json)")
    p.add_argument("--dry-run", action="store_true",
                   help="predict only (compiles on CPU, no GPU needed) and print the plan")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    try:
        b, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: shape {text!r} is not BxT, e.g. 64x128") from None
    return b, t


def spec_for(args: argparse.Namespace) -> Any:
    from jaxdistil.distill.builder import StepSpec
    from jaxdistil.distill.objective import StepConfig
    from jaxdistil.models import BertConfig, DistilBertConfig
    from jaxdistil.training import sharding as shd
    from jaxdistil.training.optim import OptimConfig

    teacher = BertConfig(num_hidden_layers=args.teacher_layers)  # bert-base-uncased's shape
    student = DistilBertConfig(n_layers=args.student_layers)  # its width, DistilBERT's layout
    cfg = StepConfig(optim=OptimConfig(total_steps=1000), dtype=args.dtype)
    return StepSpec(student, teacher, cfg, shd.MeshConfig(data=1))


def predict_shape(spec: Any, target: Any, batch: int, seq: int) -> tuple[Any, Any]:
    """(StepCost, Prediction) of the step compiled for one CPU device (nothing placed)."""
    import jax

    from jaxdistil.distill.builder import DistillStep
    from jaxdistil.study import cost as costlib
    from jaxdistil.study import memory
    from jaxdistil.study import study as st
    from jaxdistil.study.predict import predict

    built = DistillStep(spec, jax.devices("cpu")[:1])
    setup = st.StudySetup(spec=spec, batch=batch, seq=seq)
    state, _, batch_args, consts = st.abstract_arguments(built, setup)
    compiled = built.train_step.lower(state, batch_args, consts).compile()
    cost = costlib.step_cost(compiled.as_text(), built.mesh.shape, memory.memory_analysis(compiled))
    return cost, predict(cost, target, batch * seq, st.model_flops_per_step(setup), spec.step.dtype)


def measure_shape(spec: Any, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    """The step on one GPU: compile time, median step time of ``steps`` after ``warmup``, and the
    cost model's reading of the GPU's own program."""
    import jax

    from jaxdistil.distill.builder import DistillStep
    from jaxdistil.study import cost as costlib
    from jaxdistil.study import memory
    from jaxdistil.study import study as st

    device = jax.devices("gpu")[0]
    built = DistillStep(spec, [device])
    setup = st.StudySetup(spec=spec, batch=batch, seq=seq)
    state = built.init_state(jax.random.PRNGKey(0))
    consts = built.consts(built.random_teacher(jax.random.PRNGKey(1)), st.token_weights(spec.student.vocab_size))
    batches = [built.shard_batch(b) for b in st.synthetic_batches(setup, 2)]
    start = time.perf_counter()
    compiled = built.train_step.lower(state, batches[0], consts).compile()
    compile_s = time.perf_counter() - start
    gpu_cost = costlib.step_cost(compiled.as_text(), built.mesh.shape, memory.memory_analysis(compiled))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % 2], consts)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "step_times_s": times, "step_s": statistics.median(times),
            "loss": float(metrics["loss"]), "gpu_program": gpu_cost.summary()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [_shape(s) for s in args.shapes.split(",")]
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jaxdistil.study import hardware as hw
    from jaxdistil.study.predict import MODEL_DESCRIPTION

    gpus = [] if args.dry_run else [d for d in jax.devices() if d.platform == "gpu"]
    if not args.dry_run and not gpus:
        raise SystemExit("error: JAX sees no GPU; install CUDA jax, or use --dry-run for the predictions alone")
    name = args.target
    if name is None:
        kind = gpus[0].device_kind if gpus else "H100"
        name = next((v for k, v in KINDS.items() if k in kind), None)
        if name is None:
            raise SystemExit(f"error: no table entry for GPU {kind!r}; pass --target H100, H200 or A100")
    target = dataclasses.replace(hw.parse_target(name), devices=1)
    spec = spec_for(args)
    print(f"plan: {'dry run (predictions only)' if args.dry_run else f'{args.steps} timed steps after {args.warmup}'}"
          f" on {target.chip.name}, {args.dtype}, teacher {args.teacher_layers} layers, student "
          f"{args.student_layers}, shapes {', '.join(f'{b}x{t}' for b, t in shapes)}", flush=True)
    rows = []
    for batch, seq in shapes:
        cost, p = predict_shape(spec, target, batch, seq)
        row = {"batch": batch, "seq": seq, "tokens": batch * seq, "predicted_step_s": p.step_s_serial,
               "predicted_mfu": p.mfu_serial, "predicted_bound": p.bound, "predicted_fits": p.fits,
               "prediction": p.to_json(), "cpu_program": cost.summary()}
        line = f"{batch}x{seq}: predicted {p.step_s_serial * 1e3:.1f} ms ({p.bound}, MFU {p.mfu_serial:.0%})"
        if not args.dry_run:
            measured = measure_shape(spec, batch, seq, args.steps, args.warmup)
            row.update(measured=measured, measured_step_s=measured["step_s"],
                       ratio_predicted_to_measured=p.step_s_serial / measured["step_s"])
            line += f", measured {measured['step_s'] * 1e3:.1f} ms, predicted/measured {row['ratio_predicted_to_measured']:.2f}"
        print(line, flush=True)
        rows.append(row)
    if args.dry_run:
        return 0
    doc = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "jax": jax.__version__,
           "device_kind": gpus[0].device_kind, "target": target.label, "chip": target.chip.to_json(),
           "model": MODEL_DESCRIPTION, "dtype": args.dtype, "teacher_layers": args.teacher_layers,
           "student_layers": args.student_layers, "shapes": rows}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"predict_{target.label.lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
