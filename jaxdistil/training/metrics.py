"""What a run reports: ``RUN/metrics.jsonl`` (+ TensorBoard), the progress bar, throughput and MFU.

``MetricsWriter`` writes one JSON object per logged step (process 0 only). ``TrainLog`` collects the
train step's metrics without a device sync per step and turns an interval of them into one logged
line, the way lm1b aggregates: the objective's losses and accuracies from the interval's SUMMED
numerators over its SUMMED denominators (divided once, so a step with more masked tokens weighs
more, exactly as one large batch would), totals such as tokens summed, the gradient and update
norms averaged, the last learning rate and parameter norm; tokens/s and MFU (model FLOPs of
``jaxdistil.models.flops`` against a measured matmul peak), peak memory.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

# Step metrics averaged over an interval (norms); the last value is kept for these:
MEAN_KEYS = ("grad_norm", "update_norm")
LAST_KEYS = ("lr", "param_norm")
RAW_KEYS = ("sums", "counts")  # the step's numerators and denominators


def measure_peak_flops(dtype: Any) -> float:
    """Matmul FLOP/s of one device in ``dtype`` (best of a few runs; the MFU denominator)."""
    device = jax.local_devices()[0]
    n = 1024 if device.platform == "cpu" else 8192
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def memory_gb() -> tuple[float, str]:
    """Peak memory: the accelerator's peak bytes in use, or the host process's peak RSS on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "host"


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """A run's metrics.jsonl as {"train": [...], "eval": [...]} records (empty lists when absent)."""
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out.setdefault(record["kind"], []).append(record)
    return out


class MetricsWriter:
    """RUN/metrics.jsonl (+ TensorBoard); process 0 only. ``resume_step`` drops later lines."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Lines past the checkpoint belong to steps that are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        if tensorboard:
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                       for k, v in values.items()})
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f"{kind}/{k}", float(v), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class TrainLog:
    """The train step's metrics between two logged lines, kept on device until ``flush``.

    flops_per_token(T): model FLOPs of one update per token of a [*, T] batch; peak_flops: of all
    devices together. The first step of each batch shape compiles: it is kept out of throughput.
    combine(sums, counts) -> (total, means): the objective's ``combine``, which turns an interval's
    summed sums and counts into its means; totals: {log name: counts key} summed over the interval.
    """

    def __init__(self, writer: MetricsWriter, total_steps: int, start_step: int,
                 flops_per_token: Callable[[int], float], peak_flops: float, progress: bool,
                 combine: Callable[[Mapping, Mapping], tuple[Any, dict]] | None = None,
                 totals: Mapping[str, str] | None = None):
        self.writer = writer
        self.flops_per_token = flops_per_token
        self.peak = peak_flops
        self.combine = combine
        self.totals = dict(totals or {})
        self.bar = None
        if writer.enabled and progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc="train")
        self.pending: list[dict[str, Any]] = []
        self.seen_shapes: set[tuple[int, int]] = set()
        self.last: dict[str, float] = {}
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput counts from now (after an evaluation, a compile...)."""
        self.tokens, self.flops, self.start = 0.0, 0.0, time.perf_counter()

    def add(self, metrics: dict[str, Any], host_batch: Mapping[str, np.ndarray]) -> None:
        """One update's metrics and this process's rows of its batch."""
        self.pending.append(metrics)
        b, t = host_batch["input_ids"].shape
        b *= jax.process_count()
        if (b, t) not in self.seen_shapes:
            self.seen_shapes.add((b, t))
            jax.block_until_ready(metrics)
            self.restart_clock()
        else:
            self.tokens += float(np.sum(host_batch["attention_mask"])) * jax.process_count()
            self.flops += b * t * self.flops_per_token(t)
        if self.bar is not None:
            self.bar.update(1)

    def interval_values(self, values: list[dict[str, Any]]) -> dict[str, float]:
        """One line from the host values of an interval's step metrics (see the class doc).

        A one-step interval reports the step's own means; a longer one recomputes them from the
        summed sums and counts (``combine``), never by averaging the steps' means.
        """
        scalars = [{k: v for k, v in x.items() if k not in RAW_KEYS} for x in values]
        if len(values) == 1 or self.combine is None or "sums" not in values[0]:
            out = {k: float(v) for k, v in scalars[-1].items() if k not in MEAN_KEYS}
        else:
            sums = {k: np.sum([x["sums"][k] for x in values], axis=0) for k in values[0]["sums"]}
            counts = {k: np.sum([x["counts"][k] for x in values], axis=0) for k in values[0]["counts"]}
            _, means = self.combine(sums, counts)
            out = {k: float(v) for k, v in means.items()}
            out.update({k: float(scalars[-1][k]) for k in LAST_KEYS if k in scalars[-1]})
        for key in MEAN_KEYS:
            if key in scalars[0]:
                out[key] = float(np.mean([x[key] for x in scalars]))
        for name, key in self.totals.items():
            if "counts" in values[0] and key in values[0]["counts"]:
                out[name] = float(sum(float(x["counts"][key]) for x in values))
        return out

    def flush(self, step: int) -> None:
        """Writes one "train" line for the updates since the last flush (if any)."""
        if not self.pending:
            return
        values = jax.device_get(self.pending)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = self.interval_values(values)
        if self.tokens:
            out["tokens_per_s"] = self.tokens / elapsed
            out["mfu"] = self.flops / elapsed / self.peak
        out["memory_gb"], _ = memory_gb()
        self.last = out
        self.writer.write(step, "train", out)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{out.get('tokens_per_s', 0):.0f}",
                                 refresh=False)
        self.pending = []
        self.restart_clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
