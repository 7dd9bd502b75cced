"""Times one distillation train step: jaxdistil next to transformers + PyTorch, in the same run.

The step (what DistilBERT's ``distiller.py`` does per batch): dynamic MLM masking, a frozen BERT
teacher forward (eval mode, no grad), the DistilBERT student forward with dropout (train mode), the
triple loss (KL over the vocabulary at temperature T on every attention-mask row, masked-LM
cross-entropy on the masked rows, cosine of the last hidden states on every attention-mask row),
backward, global-norm clipping and AdamW with the warm-up/decay schedule. Both sides do all of it,
on the same batch shape, the same rows in every loss, the same masking rate.

Prints tokens/s per implementation, the ratio to the PyTorch peer, and model FLOPs utilisation
(MFU) against this machine's matmul peak, measured here (max of ``jnp.dot`` and ``torch.mm`` on
large square matrices). On CPU it also prints the process CPU seconds per step, the measure of
work that other processes on a shared machine distort least (benchmarks/PERFORMANCE.md).
Model FLOPs per token count every matmul including attention and the
vocabulary projection: 3x the student forward (forward + backward) plus 1x the teacher forward.

  python benchmarks/step.py                      # CPU: 8x128 fp32, jaxdistil vs eager PyTorch
  python benchmarks/step.py --device gpu         # GPU: bf16, 64x128 256x128 64x512, + torch.compile
  python benchmarks/step.py --recipe all --batch 4 --seq 64 --teacher-layers 2 --student-layers 1
                                                 # the three recipes (DistilBERT, DistilRoBERTa,
                                                 # DistilGPT2) at a small CPU shape

Recipes (the reference's three students, at their real widths and vocabularies):
  distilbert     BERT teacher -> DistilBERT student, MLM triple loss (5 L_ce + 2 L_mlm + 1 L_cos)
  distilroberta  RoBERTa -> RoBERTa student, the same MLM recipe with <mask>
  distilgpt2     GPT-2 -> GPT-2 student, causal LM: 5 L_ce + 2 L_clm + 1 L_cos, no masking

Figures go to ``benchmarks/results/step_<device>.json`` (``step_cpu.json`` on CPU).
Importable without grain / tensorflow-datasets (the lent GPU machines lack them).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_SHAPES = ((64, 128), (256, 128), (64, 512))
PROFILE_STEPS = 2
# *-restrict: restrict_ce_to_mask (L_ce over the masked rows only, the reference's option of that
# name): jaxdistil projects only those rows onto the vocabulary, the reference every row, then masks.
IMPLS = ("jax", "torch-eager", "torch-compile", "jax-restrict", "torch-eager-restrict")
RECIPES = ("distilbert", "distilroberta", "distilgpt2")



# ---------------------------------------------------------------------------------------------
# Arguments and machine description
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where to run (auto: gpu if JAX sees one)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128)")
    p.add_argument("--shapes", default=None,
                   help="comma list of BxT shapes, e.g. 64x128,256x128 (GPU default: 64x128,256x128,64x512)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="compute dtype (default fp32 on CPU, bf16 on GPU; params/optimizer stay fp32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed steps are split into this many rounds, implementations interleaved; "
                        "the median round is reported (robust to other processes on the machine)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation after compile")
    p.add_argument("--impls", default=None,
                   help="comma list of jax,torch-eager,torch-compile (CPU default: jax,torch-eager)")
    p.add_argument("--recipe", default="distilbert",
                   help=f"{', '.join(RECIPES)} or all (the three, one after the other)")
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--no-dropout", action="store_true",
                   help="student without dropout on both sides (the reference trains with dropout)")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step_<device>.json)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (device, shapes, implementations, steps) and exit without running")
    p.add_argument("--profile", default=None,
                   help="write a jax.profiler trace of 2 jaxdistil steps per shape here, and put its "
                        "per-op summary (benchmarks/trace_summary.py) in the JSON")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_visible() -> bool:
    """Whether JAX sees a GPU, asked in a subprocess so this process can still pick XLA flags."""
    code = "import jax,sys; sys.exit(0 if any(d.platform=='gpu' for d in jax.devices()) else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def other_load() -> float:
    """1-minute load average before we start: > ~0.5 means someone else is using the cores."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------


def step_flops_per_token(teacher, student, seq: int) -> int:
    """Student forward + backward (3x forward) plus the teacher's forward (1x):
    ``jaxdistil.models.flops``, the FLOP model of the training runs' MFU."""
    from jaxdistil.models.flops import train_flops_per_token

    return int(train_flops_per_token(student, teacher, seq))


# ---------------------------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------------------------


def _best_time(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(gpu: bool, dtype: str) -> dict:
    """Best FLOP/s of a large square matmul in JAX and in PyTorch; the max is the peak used for MFU."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n, reps, inner = (8192, 5, 10) if gpu else (2048, 5, 1)
    out: dict[str, float] = {}
    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    # y scaled by 1/sqrt(n) keeps the chained products c <- c @ y of order 1.
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), jdt)
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n), jdt)
    # Full fp32 on GPU (no TF32) so the fp32 peak is the one both frameworks' fp32 steps face.
    precision = jax.lax.Precision.HIGHEST if dtype == "fp32" else None

    @jax.jit
    def mm(x, y):
        # A chain of `inner` dependent matmuls in one program: no dispatch gaps between them, and
        # every product is used, so XLA cannot drop or shrink any of them.
        return jax.lax.fori_loop(0, inner, lambda i, c: jnp.dot(c, y, precision=precision), x)

    mm(a, b).block_until_ready()
    out["jax_flops"] = 2 * n**3 * inner / _best_time(lambda: mm(a, b).block_until_ready(), reps)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        dev = "cuda" if gpu else "cpu"
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
        x = torch.randn(n, n, device=dev, dtype=tdt)
        y = torch.randn(n, n, device=dev, dtype=tdt) / n**0.5
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = False

        def run():
            c = x
            for _ in range(inner):
                c = torch.mm(c, y)
            if gpu:
                torch.cuda.synchronize()

        run()
        out["torch_flops"] = 2 * n**3 * inner / _best_time(run, reps)
        del x, y
    out["peak_flops"] = max(out.values())
    out["size"] = n
    return out


# ---------------------------------------------------------------------------------------------
# Shared step settings
# ---------------------------------------------------------------------------------------------

TEMPERATURE, ALPHA_CE, ALPHA_MLM, ALPHA_COS = 2.0, 5.0, 2.0, 1.0
ALPHA_CLM = 2.0  # DistilGPT2: L_clm in the place of L_mlm
LR, BETAS, EPS, MAX_GRAD_NORM, WEIGHT_DECAY = 5e-4, (0.9, 0.98), 1e-6, 5.0, 0.0
TOTAL_STEPS, WARMUP_STEPS = 10_000, 500
# Special ids of each recipe's tokenizer: (pad, cls / bos, sep / eos, mask; None for GPT-2).
SPECIAL_IDS = {"distilbert": (0, 101, 102, 103), "distilroberta": (1, 0, 2, 50264),
               "distilgpt2": (50256, 50256, 50256, None)}
MASK_ID, PAD_ID = 103, 0


def recipe_configs(recipe: str, teacher_layers: int, student_layers: int):
    """(teacher config, student config) of a recipe at the reference's widths and vocabularies."""
    from jaxdistil.models import BertConfig, DistilBertConfig, GPT2Config, RobertaConfig

    if recipe == "distilbert":
        return BertConfig(num_hidden_layers=teacher_layers), DistilBertConfig(n_layers=student_layers)
    if recipe == "distilroberta":
        return RobertaConfig(num_hidden_layers=teacher_layers), RobertaConfig(num_hidden_layers=student_layers)
    if recipe == "distilgpt2":
        return GPT2Config(n_layer=teacher_layers), GPT2Config(n_layer=student_layers)
    raise SystemExit(f"error: unknown recipe {recipe!r}; use one of {', '.join(RECIPES)} or all")


@dataclasses.dataclass
class BatchData:
    """What a step is built on: a host batch (input_ids, attention_mask and, for packed rows,
    segment_ids / position_ids), the [V] masking weights and the special ids."""

    batch: dict
    token_weights: Any
    pad_id: int
    mask_id: int | None

    @classmethod
    def random(cls, batch: int, seq: int, vocab: int, recipe: str = "distilbert") -> "BatchData":
        ids, attn, weights = make_batch(batch, seq, vocab, recipe=recipe)
        pad, _, _, mask = SPECIAL_IDS[recipe]
        return cls({"input_ids": ids, "attention_mask": attn}, weights, pad, mask)


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0, recipe: str = "distilbert"):
    """Random token rows ``[CLS] ... [SEP]`` (or the recipe's <s> ... </s>, <|endoftext|> ...
    <|endoftext|>; ids avoid the special tokens), all real (no padding: the reference groups rows by
    length) and token weights ``U(0.5, 1)`` (0 for special ids)."""
    import numpy as np

    pad, first, last, mask = SPECIAL_IDS[recipe]
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, seq), dtype=np.int32)
    ids[ids == last] = last - 1
    ids[:, 0], ids[:, -1] = first, last
    attn = np.ones((batch, seq), np.int32)
    weights = rng.uniform(0.5, 1.0, size=vocab).astype(np.float32)
    weights[[i for i in (pad, first, last, mask, 100) if i is not None and i < vocab]] = 0.0
    return ids, attn, weights


# ---------------------------------------------------------------------------------------------
# jaxdistil side
# ---------------------------------------------------------------------------------------------


class JaxStep:
    """The jaxdistil step on one device, ready to call: ``run(n)`` does n steps and blocks."""

    def __init__(self, args, teacher_cfg, student_cfg, batch: int, seq: int, dtype: str,
                 recipe: str = "distilbert", restrict: bool = False, data: "BatchData | None" = None):
        import jax
        import jax.numpy as jnp

        self.jax = jax
        data = data or BatchData.random(batch, seq, student_cfg.vocab_size, recipe)
        self.tokens = int(data.batch["attention_mask"].sum())
        t0 = time.perf_counter()
        step, self.state, self.args = build_jax_step(
            teacher_cfg, student_cfg, data.batch, jnp.asarray(data.token_weights),
            dtype, dropout=not args.no_dropout, mask_id=data.mask_id, restrict=restrict)
        self.init_s = time.perf_counter() - t0
        # Compiled ahead of time: the compile time is measured on its own, and the executable's
        # memory analysis gives the step's exact device memory (weights + optimizer + temporaries).
        t0 = time.perf_counter()
        self.step = step.lower(self.state, *self.args).compile()
        self.compile_s = time.perf_counter() - t0
        mem = self.step.memory_analysis()
        self.step_bytes = None if mem is None else int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)

    def set_batch(self, batch: dict) -> None:
        """The next steps' batch (the compiled shapes and keys); ``tokens`` counts its real tokens."""
        placement = self.jax.tree.map(lambda x: x.sharding, self.args[0])
        self.args = (self.jax.device_put(batch, placement), self.args[1])
        self.tokens = int(batch["attention_mask"].sum())

    def run(self, n: int) -> dict:
        metrics = None
        for _ in range(n):
            # Asynchronous dispatch: the next step is queued while this one runs, as in training.
            self.state, metrics = self.step(self.state, *self.args)
        self.jax.block_until_ready((self.state, metrics))
        return {k: float(v) for k, v in metrics.items() if not isinstance(v, dict)}  # (not the raw sums, counts)

    def peak_memory(self) -> int | None:
        """The compiled step's footprint (exact, per shape); on CPU too."""
        return self.step_bytes

    def close(self) -> None:
        del self.state, self.args
        self.jax.clear_caches()


def build_jax_step(teacher_cfg, student_cfg, batch: dict, token_weights, dtype: str, dropout: bool,
                   mask_id: int | None = MASK_ID, restrict: bool = False):
    """jaxdistil's own train step (``jaxdistil.distill.builder.DistillStep``) on one device.

    Returns (jitted step, student TrainState, (batch, consts)); call
    ``step(state, *rest) -> (state, metrics)``. Same recipe as the PyTorch side: triple loss over
    all attention-mask rows (L_clm instead of L_mlm for a causal student), AdamW (0.9, 0.98, eps
    1e-6), clipping at 5, warm-up then decay.
    """
    import jax

    from jaxdistil.distill.builder import DistillStep, StepSpec
    from jaxdistil.training import sharding as shd

    if not dropout:
        student_cfg = _no_dropout(student_cfg)
    cfg = step_config(student_cfg, mask_id, dtype, restrict)
    built = DistillStep(StepSpec(student_cfg, teacher_cfg, cfg, shd.MeshConfig(data=1)), devices=jax.devices()[:1])
    state = built.init_state(jax.random.PRNGKey(1))
    t_params = built.random_teacher(jax.random.PRNGKey(0))
    return built.train_step, state, (built.shard_batch(batch), built.consts(t_params, token_weights))


def step_config(student_cfg, mask_id: int | None = MASK_ID, dtype: str = "fp32", restrict: bool = False):
    """The benchmarked recipe as a StepConfig: the triple loss over all attention-mask rows (L_clm
    instead of L_mlm for a causal student), AdamW (0.9, 0.98, eps 1e-6), clipping at 5, warm-up then decay."""
    from jaxdistil.distill.losses import LossConfig
    from jaxdistil.distill.objective import StepConfig
    from jaxdistil.training.optim import OptimConfig

    causal = student_cfg.causal
    lm = {"alpha_mlm": 0.0, "alpha_clm": ALPHA_CLM} if causal else {"alpha_mlm": ALPHA_MLM}
    return StepConfig(
        loss=LossConfig(temperature=TEMPERATURE, alpha_ce=ALPHA_CE, alpha_cos=ALPHA_COS,
                        restrict_ce_to_mask=restrict, **lm), causal=causal,
        optim=OptimConfig(learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                          max_grad_norm=MAX_GRAD_NORM, warmup_prop=WARMUP_STEPS / TOTAL_STEPS,
                          total_steps=TOTAL_STEPS),
        mask_id=-1 if mask_id is None else mask_id, dtype="bfloat16" if dtype == "bf16" else "float32")


def _no_dropout(cfg):
    import dataclasses

    if hasattr(cfg, "hidden_dropout_prob"):
        return dataclasses.replace(cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if hasattr(cfg, "resid_pdrop"):
        return dataclasses.replace(cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return dataclasses.replace(cfg, dropout=0.0, attention_dropout=0.0)


# ---------------------------------------------------------------------------------------------
# transformers + PyTorch side
# ---------------------------------------------------------------------------------------------


class TorchStep:
    """The same step with transformers' BertForMaskedLM / DistilBertForMaskedLM and torch.optim.AdamW.

    Masking follows ``distiller.py: prepare_batch_mlm`` (multinomial without replacement over the
    flattened batch, then 80/10/10); losses are ``kl_div`` (batchmean over the attention-mask
    rows) * T^2, ``CrossEntropyLoss(ignore_index=-100)`` and ``cosine_embedding_loss`` (mean over
    the attention-mask rows).
    ``compile=True`` wraps the forward + loss in ``torch.compile`` (backward is compiled by AOTAutograd).
    """

    def __init__(self, args, teacher_cfg, student_cfg, batch: int, seq: int, dtype: str, gpu: bool,
                 compile: bool, recipe: str = "distilbert", restrict: bool = False,
                 data: BatchData | None = None):
        import torch
        import transformers

        self.restrict = restrict
        self.torch = torch
        self.dev = torch.device("cuda" if gpu else "cpu")
        self.gpu = gpu
        self.dtype = dtype
        self.causal = student_cfg.causal
        t0 = time.perf_counter()
        # The same configs as the jaxdistil side (transformers reads our config.json fields).
        t_hf, s_hf = teacher_cfg.to_hf_dict(), _no_dropout(student_cfg) if args.no_dropout else student_cfg
        s_hf = s_hf.to_hf_dict()
        for d in (t_hf, s_hf):
            d.pop("tie_weights_", None)
        tcfg = transformers.AutoConfig.for_model(**t_hf)
        scfg = transformers.AutoConfig.for_model(**s_hf)
        lm_class = transformers.AutoModelForCausalLM if self.causal else transformers.AutoModelForMaskedLM
        torch.manual_seed(0)
        self.teacher = lm_class.from_config(tcfg).to(self.dev).eval()
        self.student = lm_class.from_config(scfg).to(self.dev).train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        no_decay = [p for n, p in self.student.named_parameters() if "bias" in n or "LayerNorm" in n
                    or "layer_norm" in n]
        decay = [p for n, p in self.student.named_parameters() if not ("bias" in n or "LayerNorm" in n
                                                                       or "layer_norm" in n)]
        groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
        # The fused AdamW kernel (one pass over each tensor, CPU and CUDA): PyTorch's fastest AdamW,
        # so the peer is the strongest version of itself.
        try:
            self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=True)

        def lr_lambda(step: int) -> float:
            if step < WARMUP_STEPS:
                return step / WARMUP_STEPS
            return max(0.0, (TOTAL_STEPS - step) / (TOTAL_STEPS - WARMUP_STEPS))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        data = data or BatchData.random(batch, seq, student_cfg.vocab_size, recipe)
        self.pad_id, self.mask_id = data.pad_id, data.mask_id
        self.set_batch(data.batch["input_ids"], data.batch["attention_mask"])
        self.token_probs = torch.as_tensor(data.token_weights, device=self.dev)
        self.pred_probs = torch.tensor([0.8, 0.1, 0.1], device=self.dev)
        self.vocab = student_cfg.vocab_size
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
        self.forward_loss = self._forward_loss
        if compile:
            self.forward_loss = torch.compile(self._forward_loss)
        self.init_s = time.perf_counter() - t0

    def set_batch(self, ids, attn) -> None:
        """The next steps' batch ([B, T] ids and attention mask; any B and T: eager PyTorch takes every
        shape as it comes); ``tokens`` counts its real tokens."""
        self.ids = self.torch.as_tensor(ids, dtype=self.torch.long, device=self.dev)
        self.attn = self.torch.as_tensor(attn, dtype=self.torch.long, device=self.dev)
        self.tokens = int(self.attn.sum())

    def mask(self):
        """prepare_batch_mlm: ceil(0.15 * real tokens) positions; 80% [MASK], 10% kept, 10% random.
        A causal LM (prepare_batch_clm): the ids unchanged, labels the ids (-100 at padding)."""
        torch = self.torch
        ids, attn = self.ids, self.attn
        if self.causal:
            return ids, ids.masked_fill(attn == 0, -100)
        x_prob = self.token_probs[ids.flatten()] * attn.flatten()
        n_tgt = math.ceil(0.15 * int(attn.sum()))
        tgt = torch.multinomial(x_prob / x_prob.sum(), n_tgt, replacement=False)
        pred_mask = torch.zeros(ids.numel(), dtype=torch.bool, device=self.dev)
        pred_mask[tgt] = True
        pred_mask = pred_mask.view_as(ids) & (ids != self.pad_id)
        real = ids[pred_mask]
        rand = torch.randint_like(real, self.vocab)
        masked = torch.full_like(real, self.mask_id)
        choice = torch.multinomial(self.pred_probs, len(real), replacement=True)
        new = torch.where(choice == 0, masked, torch.where(choice == 1, real, rand))
        input_ids = ids.masked_scatter(pred_mask, new)
        labels = ids.masked_fill(~pred_mask, -100)
        return input_ids, labels

    def _forward_loss(self, input_ids, attn, labels):
        torch = self.torch
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            with torch.no_grad():
                t_out = self.teacher(input_ids=input_ids, attention_mask=attn, output_hidden_states=True)
            s_out = self.student(input_ids=input_ids, attention_mask=attn, output_hidden_states=True)
        F = torch.nn.functional
        s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
        vocab = s_logits.size(-1)
        # The reference selects the attention-mask rows with masked_select; weighting every row by
        # the mask gives the same numbers without data-dependent shapes (no graph break under
        # torch.compile, no [rows, V] copies in eager): the stronger version of the peer.
        w = attn.reshape(-1).float()
        rows = w.sum()
        s_flat, t_flat = s_logits.view(-1, vocab), t_logits.view(-1, vocab)
        kl = F.kl_div(F.log_softmax(s_flat / TEMPERATURE, dim=-1), F.softmax(t_flat / TEMPERATURE, dim=-1),
                      reduction="none").sum(-1)
        # restrict_ce_to_mask: the reference's mask is the labelled rows (lm_labels > -1), after the
        # logits of every row were computed.
        w_ce = (labels.reshape(-1) != -100).float() if self.restrict else w
        loss_ce = (kl * w_ce).sum() / w_ce.sum() * TEMPERATURE**2  # KLDivLoss(batchmean), x T^2
        if self.causal:  # L_clm: next-token cross-entropy on the shifted logits
            loss_mlm = self.ce(s_logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
        else:
            loss_mlm = self.ce(s_flat, labels.view(-1))
        s_h, t_h = s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float()
        dim = s_h.size(-1)
        s_h, t_h = s_h.view(-1, dim), t_h.view(-1, dim)
        cos = F.cosine_embedding_loss(s_h, t_h, s_h.new_ones(s_h.size(0)), reduction="none")
        loss_cos = (cos * w).sum() / rows
        loss = ALPHA_CE * loss_ce + (ALPHA_CLM if self.causal else ALPHA_MLM) * loss_mlm + ALPHA_COS * loss_cos
        return loss, loss_ce, loss_mlm, loss_cos

    def run(self, n: int) -> dict:
        """n updates on the current batch (one micro-batch each)."""
        out = None
        for _ in range(n):
            out = self.run_update([(self.ids, self.attn)])
        return out

    def run_update(self, micro_batches) -> dict:
        """One update accumulated over micro-batches, as the reference's ``distiller.py`` does with
        ``gradient_accumulation_steps``: each micro-batch ([b, t] ids and attention mask, any t) masked on
        its own, its loss divided by their number and backpropagated, then one clip + AdamW step.
        ``tokens`` counts the real tokens of all of them."""
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        tokens, out = 0, None
        for ids, attn in micro_batches:
            if ids is not self.ids or attn is not self.attn:  # (run: the current batch, no new host sync)
                self.set_batch(ids, attn)
            tokens += self.tokens
            input_ids, labels = self.mask()
            loss, ce, mlm, cos = self.forward_loss(input_ids, self.attn, labels)
            (loss if len(micro_batches) == 1 else loss / len(micro_batches)).backward()
            out = (loss, ce, mlm, cos)
        gnorm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.sched.step()
        self.tokens = tokens
        if self.gpu:
            torch.cuda.synchronize()
        names = ("loss", "loss_ce", "loss_clm" if self.causal else "loss_mlm", "loss_cos", "grad_norm")
        return {k: float(v.detach()) for k, v in zip(names, (*out, gnorm))}

    def peak_memory(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.gpu else None

    def close(self) -> None:
        del self.teacher, self.student, self.opt
        if self.gpu:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _build(impl: str, args, tcfg, scfg, batch: int, seq: int, dtype: str, gpu: bool, recipe: str):
    restrict = impl.endswith("-restrict")
    if impl in ("jax", "jax-restrict"):
        return JaxStep(args, tcfg, scfg, batch, seq, dtype, recipe, restrict=restrict)
    if impl in ("torch-eager", "torch-compile", "torch-eager-restrict"):
        return TorchStep(args, tcfg, scfg, batch, seq, dtype, gpu, compile=impl == "torch-compile", recipe=recipe,
                         restrict=restrict)
    raise SystemExit(f"error: unknown implementation {impl!r}; use jax, torch-eager, torch-compile")


def bench_shape(args, impls: list[str], tcfg, scfg, batch: int, seq: int, dtype: str, gpu: bool,
                peak: float | None, recipe: str = "distilbert") -> dict:
    """Times every implementation at one shape; on CPU they are interleaved round by round."""
    flops_tok = step_flops_per_token(tcfg, scfg, seq)
    steps = args.steps or (10 if not gpu else 30)
    rounds = args.rounds or (5 if not gpu else 3)
    per_round = max(1, steps // rounds)
    results: dict[str, dict] = {}
    runners: dict[str, Any] = {}

    def setup(impl):
        runner = _build(impl, args, tcfg, scfg, batch, seq, dtype, gpu, recipe)
        t0 = time.perf_counter()
        first = runner.run(1)  # the first step (torch.compile compiles here; JAX compiled already)
        first_s = time.perf_counter() - t0
        # Compile / warm-up time: JAX's ahead-of-time compile + first step; PyTorch's first step.
        warm_s = first_s + getattr(runner, "compile_s", 0.0)
        if args.warmup:
            runner.run(args.warmup)
        if gpu and impl != "jax":
            runner.torch.cuda.reset_peak_memory_stats()
        results[impl] = {"init_s": round(runner.init_s, 2), "compile_warmup_s": round(warm_s, 2),
                         "first_metrics": first, "round_tokens_per_s": []}
        print(f"  {impl}: compile + first step {warm_s:.1f} s, loss {first['loss']:.4f}", flush=True)
        return runner

    def time_round(impl, runner):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = runner.run(per_round)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[impl]["round_tokens_per_s"].append(runner.tokens * per_round / dt)
        # CPU seconds of this process per step (all threads): the work done, which other processes
        # on the machine inflate much less than the wall time (on an idle machine wall ~ cpu / cores).
        results[impl].setdefault("round_cpu_s_per_step", []).append(cpu / per_round)
        results[impl]["last_metrics"] = metrics

    def profile(impl, runner):
        if args.profile and impl == "jax":
            import jax

            if str(Path(__file__).resolve().parent) not in sys.path:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
            from trace_summary import format_summary, op_events, summarize

            path = Path(args.profile) / f"{batch}x{seq}"
            with jax.profiler.trace(str(path), create_perfetto_trace=True):
                runner.run(PROFILE_STEPS)
            summary = summarize(op_events(path), runner.step.as_text(), PROFILE_STEPS)
            results[impl]["profile"] = summary
            print(f"  jax profile of {PROFILE_STEPS} steps: {path}", flush=True)
            print("  " + format_summary(summary).replace("\n", "\n  "), flush=True)

    if gpu:
        # One implementation at a time so each has the GPU memory to itself; no contention there.
        for impl in impls:
            runner = setup(impl)
            for _ in range(rounds):
                time_round(impl, runner)
            results[impl]["peak_memory_bytes"] = runner.peak_memory()
            profile(impl, runner)
            runner.close()
            del runner
            gc.collect()
    else:
        for impl in impls:
            runners[impl] = setup(impl)
        # Interleaved rounds: a burst of load from another process hits every implementation alike.
        for _ in range(rounds):
            for impl in impls:
                time_round(impl, runners[impl])
        for impl in impls:
            results[impl]["peak_memory_bytes"] = runners[impl].peak_memory()
            profile(impl, runners[impl])

    for impl, r in results.items():
        tps = statistics.median(r["round_tokens_per_s"])
        r["tokens_per_s"] = round(tps, 2)
        r["step_s"] = round(batch * seq / tps, 4)
        r["round_tokens_per_s"] = [round(x, 2) for x in r["round_tokens_per_s"]]
        r["cpu_s_per_step"] = round(statistics.median(r["round_cpu_s_per_step"]), 3)
        r["round_cpu_s_per_step"] = [round(x, 3) for x in r["round_cpu_s_per_step"]]
        r["model_tflops_per_s"] = round(tps * flops_tok / 1e12, 4)
        r["mfu"] = round(tps * flops_tok / peak, 4) if peak else None
    # The peer to beat: torch.compile where it ran, else eager PyTorch.
    base = next((i for i in ("torch-compile", "torch-eager") if i in results), None)
    ratios = {}
    for ours in (i for i in ("jax", "jax-restrict") if i in results):
        for impl in results:
            if not impl.startswith("jax"):
                jax_tps = results[ours]["tokens_per_s"]
                name = ours.replace("-", "_")
                ratios[f"{name}_vs_{impl}"] = round(jax_tps / results[impl]["tokens_per_s"], 3)
                if not gpu:
                    ratios[f"{name}_vs_{impl}_cpu_time"] = round(
                        results[impl]["cpu_s_per_step"] / results[ours]["cpu_s_per_step"], 3)
    return {"recipe": recipe, "batch": batch, "seq": seq, "dtype": dtype, "flops_per_token": flops_tok,
            "steps_per_round": per_round, "rounds": rounds, "impls": results, "ratios": ratios,
            "baseline": base}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = args.device == "gpu" or (args.device == "auto" and gpu_visible())
    if not gpu:
        # No XLA CPU flags: none of those tried measured faster (benchmarks/PERFORMANCE.md).
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        # JAX must not grab 75% of the GPU up front: the PyTorch peers run in the same process.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    impls = (args.impls or ("jax,torch-eager,torch-compile" if gpu else "jax,torch-eager")).split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"error: unknown implementation {unknown[0]!r} in --impls; use {', '.join(IMPLS)}")
    if args.shapes:
        shapes = [_parse_shape(text) for text in args.shapes.split(",")]
    elif args.batch or args.seq or not gpu:
        shapes = [(args.batch or 8, args.seq or 128)]
    else:
        shapes = list(GPU_SHAPES)

    recipes = list(RECIPES) if args.recipe == "all" else [args.recipe]
    if any(r not in RECIPES for r in recipes):
        raise SystemExit(f"error: unknown recipe {args.recipe!r}; use one of {', '.join(RECIPES)} or all")
    if args.dry_run:
        steps = args.steps or (30 if gpu else 10)
        print(f"plan: device {'gpu' if gpu else 'cpu'}, {dtype}, recipes {', '.join(recipes)}, shapes "
              f"{', '.join(f'{b}x{t}' for b, t in shapes)}, implementations {', '.join(impls)}, "
              f"{steps} timed steps in {args.rounds or (3 if gpu else 5)} rounds + {args.warmup} warm-up, "
              f"teacher {args.teacher_layers} layers, student {args.student_layers}, profile "
              f"{args.profile or 'off'}, JSON {_out_path(args, gpu, None)}", flush=True)
        return 0
    load_before = other_load()
    import jax

    device = jax.devices()[0]
    if gpu and device.platform != "gpu":
        raise SystemExit("error: --device gpu but JAX sees no GPU; install CUDA jax or use --device cpu")
    try:
        import torch

        torch_version = torch.__version__
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_version, torch_threads = None, None
        impls = [i for i in impls if i.startswith("jax")]

    dev_name = device.device_kind if gpu else cpu_model()
    print(f"device: {dev_name} ({os.cpu_count()} cores) jax {jax.__version__} torch {torch_version}"
          f" | load avg before start {load_before:.2f}", flush=True)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    peak = None if args.no_peak else matmul_peak(gpu, dtype)
    if peak:
        print(f"matmul peak ({dtype}, {peak['size']}^2): jax {peak['jax_flops'] / 1e9:.1f} GFLOP/s, torch "
              f"{peak.get('torch_flops', 0) / 1e9:.1f} GFLOP/s -> peak "
              f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s",
              flush=True)

    report: dict[str, Any] = {
        "device": dev_name, "platform": "gpu" if gpu else "cpu", "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "torch": torch_version, "torch_threads": torch_threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "dtype": dtype,
        "teacher_layers": args.teacher_layers, "student_layers": args.student_layers,
        "recipes": recipes, "dropout": not args.no_dropout, "matmul_peak": peak, "load_avg_before": load_before,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "shapes": [],
    }
    out = _out_path(args, gpu, dev_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    for recipe, (batch, seq) in ((r, shape) for r in recipes for shape in shapes):
        tcfg, scfg = recipe_configs(recipe, args.teacher_layers, args.student_layers)
        print(f"{recipe} {batch}x{seq} {dtype}: {', '.join(impls)}", flush=True)
        res = bench_shape(args, impls, tcfg, scfg, batch, seq, dtype, gpu,
                          peak["peak_flops"] if peak else None, recipe)
        report["shapes"].append(res)
        # Written after every shape: a run cut short (a time limit) keeps what it measured.
        out.write_text(json.dumps(report, indent=2) + "\n")
        for impl, r in res["impls"].items():
            mem = r.get("peak_memory_bytes")
            mem_s = f", peak mem {mem / 2**30:.2f} GiB" if mem else ""
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            print(f"  {impl:14s} {r['tokens_per_s']:10.1f} tokens/s ({r['step_s']:.3f} s/step){mfu}{mem_s}"
                  f", {r['cpu_s_per_step']:.2f} CPU-s/step  rounds {r['round_tokens_per_s']}", flush=True)
        for name, ratio in res["ratios"].items():
            print(f"  ratio {name}: {ratio:.3f}", flush=True)
    report["load_avg_after"] = other_load()
    if peak and not gpu:
        # Measured again at the end: on a shared machine the best of the two is closer to the
        # hardware's peak (the MFU figures above used the first measurement).
        again = matmul_peak(gpu, dtype)
        report["matmul_peak_end"] = again
        best = max(peak["peak_flops"], again["peak_flops"])
        report["peak_flops_used"] = best
        print(f"matmul peak at the end: {again['peak_flops'] / 1e9:.1f} GFLOP/s; MFU against the best "
              f"({best / 1e9:.1f} GFLOP/s):", flush=True)
        for res in report["shapes"]:
            for impl, r in res["impls"].items():
                r["mfu"] = round(r["tokens_per_s"] * res["flops_per_token"] / best, 4)
                print(f"  {res['recipe']} {res['batch']}x{res['seq']} {impl:14s} MFU {100 * r['mfu']:.1f}%",
                      flush=True)
    elif peak:
        report["peak_flops_used"] = peak["peak_flops"]

    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    return 0


def _parse_shape(text: str) -> tuple[int, int]:
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"error: --shapes entry {text!r} is not BATCHxSEQ (e.g. 64x128)")
    return int(parts[0]), int(parts[1])


def _out_path(args, gpu: bool, dev_name: str | None) -> Path:
    if args.out:
        return Path(args.out)
    recipe = "" if args.recipe == "distilbert" else f"_{args.recipe}"
    return RESULTS_DIR / f"step_{'cpu' if not gpu else _slug(dev_name or 'gpu')}{recipe}.json"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


if __name__ == "__main__":
    sys.exit(main())
