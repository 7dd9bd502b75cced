"""The main job: what distillation buys, measured end to end on a 2-core CPU (``jaxdistil demo``).

The paper's comparisons in small, all on the same held-out text and the same masks, every student of
the same shape (2 layers, half the teacher's depth) and the same step budget:

  data       the built-in corpus (docstrings of the Python standard library) tokenized with the
             teacher's tokenizer; the held-out documents are the ones the teacher never saw (the same
             text-hash split as its pre-training data)
  teacher    the shipped teacher (jaxdistil/assets/teacher-pydocs): a 4-layer BERT pre-trained with
             the MLM loss by jaxdistil's own ``train`` (configs/teacher-pydocs.yaml reproduces it)
  copied     the student as copied from teacher layers 0 and 2, before any training
  distilled  soft targets and cosine (5 L_ce + 1 L_cos, configs/demo.yaml) from the copied init, 2 seeds
  mlm-only   L_mlm alone from the same copied init, same steps and seeds (no L_ce, no L_cos)
  random     (``--ablation``) the distilled students' loss from a random init of the same shape, 2 seeds
  objectives (``--objectives``) the same copied init, budget, data and masks with other distillation
             objectives as ``terms:`` (``OBJECTIVES``): TinyBERT's hidden-state and attention-score MSE,
             MiniLM's attention and value-relation KL, MiniLMv2's Q/K/V relations, and DistilBERT's
             triple loss (with L_mlm), 2 seeds each
  finetune   the teacher and every student fine-tuned the same way on builtin:pydocs-topics
  export     the first distilled student as a Hugging Face DistilBertForMaskedLM, checked in transformers
  report     report.json and report.png, built from the runs' own metrics files only

Held-out scores: top-1 accuracy on positions replaced by [MASK] (15% of the tokens, no kept or random
token to copy) against the most-frequent-token baseline, and the perplexity of BERT's 80/10/10
masking; the seeds change the students' data order. Every stage is reused by a rerun that finds it
finished (``DIR/stages.json``), and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import inspect
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np

from jaxdistil.data.corpus import SourceOptions
from jaxdistil.data.loader import LoaderConfig, eval_batches
from jaxdistil.data.manifest import MANIFEST_NAME
from jaxdistil.data.prepare import PrepareConfig, prepare
from jaxdistil.distill.config import load_run_config
from jaxdistil.distill.evaluation import evaluate_model
from jaxdistil.errors import UserError
from jaxdistil.finetune.config import load_finetune_config
from jaxdistil.finetune.run import finetune
from jaxdistil.hf import export_model, load_model, save_flax_model
from jaxdistil.models import DistilBertConfig, build_model
from jaxdistil.students import student_from_teacher, trained_params
from jaxdistil.train import train
from jaxdistil.training.metrics import read_metrics

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

CONFIG = "demo"  # configs/demo.yaml, shipped with the package (jaxdistil.config.resolve_config)
FINETUNE_CONFIG = "finetune/pydocs-topics"
TEACHER = Path(str(importlib.resources.files("jaxdistil") / "assets" / "teacher-pydocs"))
MAX_LEN = 64  # the students' sequences (the teacher was pre-trained on 128)
HOLDOUT = 0.1  # the teacher's pre-training split: its held-out documents are ours
LAYERS = (0, 2)
SEEDS = (56, 57)
STUDENT_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0}  # about a hundred updates: nothing to regularise
# Fine-tuning dropout, the same for every model (transformers' defaults for BERT; DistilBERT's head too).
FINETUNE_DROPOUT = 0.1
# The out-of-domain text: numpy's docstrings (installed with jaxdistil, never in a built-in corpus),
# the public callables of these modules in sorted order, each docstring up to its Examples section.
OOD_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random")
OOD_DOCUMENTS = 200
FINETUNE_EPOCHS = 1.0  # configs/finetune/pydocs-topics.yaml's recipe with one epoch and
FINETUNE_MAX_LEN = 32  # paragraphs cut to 32 tokens (27 on average): 7 fine-tunings in the budget

# kind -> (what the run is, overrides of configs/demo.yaml besides data, run dir, seed and init)
KINDS = {
    "distilled": "soft targets and cosine (5 L_ce + 1 L_cos) from the copied init",
    "mlm_only": "L_mlm alone (2 L_mlm, no L_ce, no L_cos) from the copied init",
    "random_init": "the distilled students' loss from a random init of the same shape",
    "triple": "DistilBERT's triple loss with L_mlm (5 L_ce + 2 L_mlm + 1 L_cos) from the copied init",
    "tinybert": "TinyBERT's general distillation (embedding + hidden MSE, attention-score MSE) from the copied init",
    "minilm": "MiniLM's last-layer attention KL and value-relation KL from the copied init",
    "minilmv2": "MiniLMv2's last-layer Q-Q / K-K / V-V relations (8 relation heads) from the copied init",
}
# The --objectives rows: the run config's terms: list of each (the loss section's alphas set to 0).
# Student layers 1, 2 sit where the teacher's layers 2, 4 do (it was copied from teacher layers 0
# and 2, and layer i's output is the input of layer i + 1): TinyBERT's uniform map g(m) = 2m.
OBJECTIVES = {
    "triple": "[{kind: kl, weight: 5.0, temperature: 2.0}, {kind: mlm_ce, weight: 2.0}, {kind: hidden_cos}]",
    "tinybert": "[{kind: hidden_mse, layers: [[0, 0], [1, 2], [2, 4]]}, {kind: attention_mse, layers: [[0, 1], [1, 3]]}]",
    "minilm": "[{kind: attention_kl, layers: [[1, 3]]}, {kind: value_relation_kl, layers: [[1, 3]]}]",
    "minilmv2": "[{kind: minilmv2_relations, layers: [[1, 3]], relation_heads: 8}]",
}


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What ``demo`` runs. steps: None = configs/demo.yaml's; finetune_epochs: passes over the
    downstream task's training split; ablation: add the random-init students; objectives: names of
    ``OBJECTIVES`` to add a row for (``--objectives``: all of them); cache: top-k sizes K of teacher
    caches (``jaxdistil cache-teacher``) to distil a ``cached_k<K>`` row from, the distilled row's
    recipe with the cache's renormalised top-k targets in place of the online teacher."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.objectives if k not in OBJECTIVES]
        if unknown:
            raise UserError(f"unknown demo objective {unknown[0]!r}; the objectives are {', '.join(OBJECTIVES)}")
        if any(k < 1 for k in self.cache) or len(set(self.cache)) != len(self.cache):
            raise UserError(f"--cache {','.join(map(str, self.cache))}: give distinct top-k sizes >= 1, e.g. 8,32,128")

    output: str | Path = "demo-out"
    teacher: str | Path = TEACHER
    seeds: tuple[int, ...] = SEEDS
    steps: int | None = None
    finetune_epochs: float = FINETUNE_EPOCHS
    ablation: bool = False
    export: bool = True
    objectives: tuple[str, ...] = ()
    cache: tuple[int, ...] = ()


def cache_kind(k: int) -> str:
    return f"cached_k{k}"


def describe(kind: str) -> str:
    """What a row's runs are (a stage's description)."""
    if kind.startswith("cached_k"):
        return (f"the distilled recipe from a teacher cache of the top {kind[len('cached_k'):]} logits "
                "(bfloat16), no teacher in the step")
    return KINDS[kind]


def run_name(kind: str, seed: int) -> str:
    return f"{kind.replace('_', '-')}-s{seed}"


class Stages:
    """Stage bookkeeping in ``DIR/stages.json``: a finished stage (recorded with its time) is reused
    by a rerun as long as its output is still there."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.reused: list[str] = []

    def run(self, name: str, what: str, fn: Callable[[], Any], output: Path) -> None:
        if name in self.seconds and output.exists():
            print(f"\n== {name}: reusing {output}", flush=True)
            self.reused.append(name)
            return
        print(f"\n== {name}: {what}", flush=True)
        start = time.perf_counter()
        fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.seconds, indent=1) + "\n")
        os.replace(tmp, self.path)


def _finished(result) -> None:
    if result.interrupted is not None:
        raise UserError("the demo was interrupted; run the same command again to resume")


def _copied_student(teacher_dir: Path, output: Path) -> None:
    """The student as copied from the teacher's layers (DistilBERT of half depth), as a Flax model dir."""
    teacher = load_model(str(teacher_dir))
    cfg, params, _ = student_from_teacher(teacher.config, trained_params(teacher), LAYERS, overrides=STUDENT_DROPOUT)
    save_flax_model(cfg, params, output, has_mlm_head=True, tokenizer_dir=teacher.tokenizer_dir, force=True,
                    origin=f"demo: teacher layers {list(LAYERS)} of {teacher_dir}")


def _finetune_dropout(source: Path) -> dict[str, float]:
    """config.json fields giving ``source`` FINETUNE_DROPOUT everywhere (embeddings, attention
    probabilities, hidden states, the classifier head), in its family's names."""
    family = load_model(str(source)).config.model_type
    # BERT's and RoBERTa's heads use the hidden dropout (no classifier_dropout of their own).
    names = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
             "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
             "distilbert": ("dropout", "attention_dropout", "seq_classif_dropout"),
             "gpt2": ("resid_pdrop", "attn_pdrop", "embd_pdrop")}[family]
    return dict.fromkeys(names, FINETUNE_DROPOUT)


def _random_init_overrides(init_dir: Path) -> list[str]:
    """student.init=random with the copied student's shape (and the data's vocabulary)."""
    cfg = load_model(str(init_dir)).config
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DistilBertConfig)
              if f.name not in ("vocab_size", "pad_token_id")}
    return ["student.init=random", "student.model_type=distilbert", f"student.config={json.dumps(fields)}"]


def ood_documents(modules=OOD_MODULES, limit: int = OOD_DOCUMENTS) -> list[str]:
    """The out-of-domain text: docstrings of the public callables of ``modules`` (sorted by name, a
    name documented twice kept once), each cut at its Examples section and joined into one line."""
    docs, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in sorted(n for n in dir(module) if not n.startswith("_")):
            obj = getattr(module, name, None)
            if not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj) or ""
            doc = re.split(r"\n\s*Examples\n\s*-{3,}", doc)[0]
            text = " ".join(doc.split())
            if len(text) >= 200 and text not in docs:
                docs.append(text)
            if len(docs) == limit:
                return docs
    return docs


def _prepare_ood(teacher_dir: Path, out: Path) -> None:
    text = out / "ood" / "numpy-docs.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n".join(ood_documents()) + "\n")
    prepare(PrepareConfig(str(text), str(teacher_dir), out / "ood" / "data", max_len=MAX_LEN, force=True, workers=1,
                          options=SourceOptions(holdout=0.0)), progress=False)


def _score_ood(models: dict[str, Path], out: Path) -> None:
    """[MASK]-only accuracy of every model on the out-of-domain text (fixed masks, all of it)."""
    scores = {}
    for name, source in models.items():
        r = evaluate_model(str(source), str(out / "ood" / "data"), split="train", max_len=MAX_LEN, mask_only=True)
        # mask_only: every chosen position is [MASK]; "accuracy" is the [MASK] accuracy.
        scores[name] = {"mask_accuracy": r["accuracy"], "mask_baseline": r["baseline_accuracy"],
                        "masked_tokens": r["masked_tokens"]}
    documents = len((out / "ood" / "numpy-docs.txt").read_text().splitlines())  # what _prepare_ood wrote
    (out / "ood.json").write_text(json.dumps({"text": f"numpy {np.__version__} docstrings of "
                                              f"{', '.join(OOD_MODULES)} ({documents} documents)",
                                              "scores": scores}, indent=1) + "\n")


def forward_times(models: list[Any], batch: dict[str, np.ndarray], repeats: int = 10) -> list[float]:
    """Best wall time (s) of a jitted forward pass (logits of every token) of each loaded model on
    ``batch``; the models take turns so that a busy machine slows them alike."""
    ids, mask = jax.device_put(batch["input_ids"]), jax.device_put(batch["attention_mask"])
    runs = []
    for loaded in models:
        model = build_model(loaded.config)
        forward = jax.jit(lambda p, i, m, model=model: model.apply({"params": p}, i, attention_mask=m).logits)
        params = jax.device_put(loaded.params)
        forward(params, ids, mask).block_until_ready()  # compile
        runs.append((forward, params))
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for k, (forward, params) in enumerate(runs):
            start = time.perf_counter()
            forward(params, ids, mask).block_until_ready()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def demo(options: DemoOptions = DemoOptions()) -> dict[str, Any]:
    """Runs (or resumes) the demo into ``options.output``; returns the report (also report.json/.png)."""
    out = Path(options.output).expanduser().absolute()
    teacher_dir = Path(options.teacher).expanduser().absolute()
    if not (teacher_dir / "config.json").is_file():
        raise UserError(f"the teacher {teacher_dir} has no config.json; reinstall jaxdistil (it ships "
                        "jaxdistil/assets/teacher-pydocs) or pass --teacher DIR")
    out.mkdir(parents=True, exist_ok=True)
    # Same-shape runs (the second seed, the MLM-only twin, a rerun) load their compiled programs.
    cache = out / "xla-cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    start = time.perf_counter()
    stages = Stages(out)
    data_dir, init_dir = out / "data", out / "copied"
    kinds = (["distilled", "mlm_only"] + (["random_init"] if options.ablation else [])
             + [k for k in OBJECTIVES if k in options.objectives] + [cache_kind(k) for k in options.cache])

    stages.run("data", "the built-in corpus tokenized with the teacher's tokenizer, its held-out documents kept",
               lambda: prepare(PrepareConfig("builtin:python-docs", str(teacher_dir), data_dir, max_len=MAX_LEN,
                                             force=True, options=SourceOptions(holdout=HOLDOUT))),
               data_dir / MANIFEST_NAME)
    stages.run("copied", f"the student as copied from teacher layers {', '.join(map(str, LAYERS))}",
               lambda: _copied_student(teacher_dir, init_dir), init_dir / "config.json")

    common = [f"data.dir={data_dir}", f"loader.max_len={MAX_LEN}"]
    if options.steps:
        common.append(f"train.steps={options.steps}")
    for kind in kinds:
        for seed in options.seeds:
            name = run_name(kind, seed)
            # The seed draws the data order (loader.seed), the masks and the dropout (train.seed).
            over = common + [f"run_dir={out / 'runs' / name}", f"train.seed={seed}", f"loader.seed={seed}"]
            if (kind, seed) != ("distilled", options.seeds[0]):
                # The teacher and the copied init are scored once, at the first run's step 0 (every
                # copied-init run starts from the same weights, and the masks are fixed).
                over.append("train.eval_every=0")
            if kind == "distilled":
                over += [f"teacher.model={teacher_dir}", f"student.init={init_dir}"]
            elif kind == "mlm_only":
                over += ["teacher.model=null", f"student.init={init_dir}", "terms=[{kind: mlm_ce, weight: 2.0}]"]
            elif kind in OBJECTIVES:
                over += [f"teacher.model={teacher_dir}", f"student.init={init_dir}", f"terms={OBJECTIVES[kind]}"]
            elif kind.startswith("cached_k"):
                k = int(kind[len("cached_k"):])
                over += [f"teacher.model={teacher_dir}", f"student.init={init_dir}"]
                cache_dir, note = out / "caches" / f"k{k}-s{seed}", out / "caches" / f"k{k}-s{seed}.json"
                stages.run(f"cache-k{k}-s{seed}", f"the teacher's top {k} logits and last hidden states on the "
                           f"distilled run's batches and masks, seed {seed}",
                           lambda c=load_run_config(CONFIG, over), d=cache_dir, n=note, k=k: _write_cache(c, d, n, k),
                           note)
                over.append(f"teacher.cache={cache_dir}")
            else:
                over += [f"teacher.model={teacher_dir}"] + _random_init_overrides(init_dir)
            cfg = load_run_config(CONFIG, over)
            stages.run(name, f"{describe(kind)}, seed {seed}, {cfg.train.steps} steps",
                       lambda cfg=cfg: _finished(train(cfg)), out / "runs" / name / "metrics.jsonl")

    models = {"teacher": teacher_dir, "copied": init_dir}
    models.update({run_name(k, s): out / "runs" / run_name(k, s) for k in kinds for s in options.seeds})
    stages.run("ood-data", "the out-of-domain text (numpy's docstrings) tokenized with the teacher's tokenizer",
               lambda: _prepare_ood(teacher_dir, out), out / "ood" / "data" / MANIFEST_NAME)
    scored = out / "ood.json"
    if scored.is_file() and set(models) - set(json.loads(scored.read_text())["scores"]):
        scored.unlink()  # rows added since (a rerun with --objectives, --cache): score every model again
    stages.run("ood", "every model's [MASK] accuracy on the out-of-domain text", lambda: _score_ood(models, out),
               scored)
    ft_over = [f"train.max_len={FINETUNE_MAX_LEN}", f"train.epochs={options.finetune_epochs}", "logging.progress=true"]
    for name, source in models.items():
        cfg = load_finetune_config(FINETUNE_CONFIG, ft_over + [f"run_dir={out / 'finetune' / name}", f"model={source}",
                                                               f"model_config={json.dumps(_finetune_dropout(source))}"])
        stages.run(f"finetune-{name}", f"fine-tuning {name} on {cfg.task.name}",
                   lambda cfg=cfg: _finished(finetune(cfg)), out / "finetune" / name / "metrics.jsonl")

    first = out / "runs" / run_name("distilled", options.seeds[0])
    if options.export:
        stages.run("export", "the distilled student as a Hugging Face DistilBertForMaskedLM",
                   lambda: (out / "export.json").write_text(json.dumps(
                       dataclasses.asdict(export_model(str(first), out / "student-hf", force=True)), default=str)),
                   out / "export.json")

    def timing() -> None:
        batch = next(iter(eval_batches(str(data_dir), LoaderConfig(batch_size=32, max_len=MAX_LEN,
                                                                    buckets=(MAX_LEN,)))))
        t, s = forward_times([load_model(str(teacher_dir)), load_model(str(first))], batch)
        (out / "speed.json").write_text(json.dumps({"teacher_forward_ms": t * 1e3, "student_forward_ms": s * 1e3,
                                                    "batch": [32, MAX_LEN]}) + "\n")

    stages.run("speed", "forward-pass time of the teacher and the student", timing, out / "speed.json")
    report = build_report(out, options, kinds, stages, time.perf_counter() - start)
    plot(report, out, out / "report.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- the report: every number from the runs' metrics files (and the demo's speed / export notes)

def _first_eval(records: list[dict], key: str) -> dict:
    found = next((r for r in records if key in r), None)
    if found is None:
        raise UserError(f"no eval record with {key}; delete the run directory and rerun the demo")
    return found


def _mlm_scores(record: dict, prefix: str) -> dict[str, float]:
    return {"mask_accuracy": record[f"{prefix}_mask_accuracy"], "mask_baseline": record[f"{prefix}_mask_baseline"],
            "accuracy": record[f"{prefix}_accuracy"], "perplexity": record[f"{prefix}_perplexity"]}


def _downstream(run: Path) -> float:
    return read_metrics(run)["eval"][-1]["accuracy"]


def _summary(per_seed: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_seed": per_seed}
    for key in ("mask_accuracy", "perplexity", "accuracy", "ood_mask_accuracy", "downstream_accuracy"):
        values = [r[key] for r in per_seed]
        out[key] = statistics.fmean(values)
        out[f"{key}_spread"] = max(values) - min(values)  # the range over seeds
    return out


def _compare(a: dict, b: dict, key: str, lower_is_better: bool = False) -> dict[str, Any]:
    """a's gain over b on ``key`` against the seed spread (the larger range of the two).
    ``beyond_spread``: the difference, either way, is larger than the spread; ``better``: a gains."""
    gain = (b[key] - a[key]) if lower_is_better else (a[key] - b[key])
    spread = max(a.get(f"{key}_spread", 0.0), b.get(f"{key}_spread", 0.0))
    return {"metric": key, "gain": gain, "spread": spread, "better": bool(gain > 0),
            "beyond_spread": bool(abs(gain) > spread)}


def build_report(out: Path, options: DemoOptions, kinds: list[str], stages: Stages, wall: float) -> dict[str, Any]:
    seeds = list(options.seeds)
    first = read_metrics(out / "runs" / run_name("distilled", seeds[0]))
    teacher_eval = _first_eval(first["eval"], "teacher_mask_accuracy")
    copied_eval = next(r for r in first["eval"] if r["step"] == 0)
    ood = json.loads((out / "ood.json").read_text())
    teacher = {**_mlm_scores(teacher_eval, "teacher"), "ood_mask_accuracy": ood["scores"]["teacher"]["mask_accuracy"],
               "ood_mask_baseline": ood["scores"]["teacher"]["mask_baseline"],
               "downstream_accuracy": _downstream(out / "finetune" / "teacher")}
    copied = {**_mlm_scores(copied_eval, "student"), "ood_mask_accuracy": ood["scores"]["copied"]["mask_accuracy"],
              "downstream_accuracy": _downstream(out / "finetune" / "copied")}
    students: dict[str, Any] = {"copied": copied}
    steps = None
    for kind in kinds:
        per_seed = []
        for seed in seeds:
            name = run_name(kind, seed)
            final = read_metrics(out / "runs" / name)["eval"][-1]
            steps = final["step"]
            per_seed.append({"seed": seed, "run": f"runs/{name}", "step": final["step"],
                             **_mlm_scores(final, "student"),
                             "ood_mask_accuracy": ood["scores"][name]["mask_accuracy"],
                             "downstream_accuracy": _downstream(out / "finetune" / name)})
        students[kind] = _summary(per_seed)
    for row in students.values():
        row["retention"] = {"mask_accuracy": row["mask_accuracy"] / teacher["mask_accuracy"],
                            "ood_mask_accuracy": row["ood_mask_accuracy"] / teacher["ood_mask_accuracy"],
                            "downstream_accuracy": row["downstream_accuracy"] / teacher["downstream_accuracy"]}
    comparisons = {}
    for other in ("copied", "mlm_only", *(k for k in kinds if k not in ("distilled", "mlm_only"))):
        comparisons[f"distilled_vs_{other}"] = {
            key: _compare(students["distilled"], students[other], key, lower_is_better=key == "perplexity")
            for key in ("mask_accuracy", "perplexity", "ood_mask_accuracy", "downstream_accuracy")}
    speed = json.loads((out / "speed.json").read_text())
    export = json.loads((out / "export.json").read_text()) if (out / "export.json").is_file() else None
    t_model, s_model = load_model(str(Path(options.teacher).expanduser())), load_model(str(out / "copied"))
    report = {
        "headline": "",
        "teacher": {"source": _shown(Path(options.teacher), TEACHER.parents[2]), "layers": t_model.config.layers, "hidden": t_model.config.hidden,
                    "params": _count(t_model.params), **teacher},
        "student_shape": {"architecture": "DistilBERT", "layers": s_model.config.layers,
                          "hidden": s_model.config.hidden, "params": _count(s_model.params),
                          "from_teacher_layers": list(LAYERS)},
        "students": students,
        "comparisons": comparisons,
        "seeds": seeds,
        "steps": steps,
        "ood_text": ood["text"],
        "downstream_task": "builtin:pydocs-topics (8-way: which standard-library area a paragraph documents)",
        "downstream_majority_baseline": _majority(),
        "speed": {**speed, "speedup": speed["teacher_forward_ms"] / speed["student_forward_ms"]},
        "export": (f"{_shown(Path(export['output']), out.parent)} (transformers logits match within {export['max_abs_diff']:.1e})"
                   if export and export.get("verified") else (export or {}).get("note", "skipped")),
        "machine": {"platform": jax.devices()[0].platform, "devices": jax.device_count(), "cpus": os.cpu_count(),
                    "processor": _processor()},
        "cache": cache_report(out, kinds, seeds),
        "stage_seconds": dict(stages.seconds),
        "reused_stages": list(stages.reused),
        "wall_time_s": round(wall, 1),  # this invocation (reused stages cost nothing)
        "stage_seconds_total": round(sum(stages.seconds.values()), 1),  # what the stages took when they ran
    }
    report["headline"] = headline(report)
    return report


def _write_cache(cfg: Any, cache_dir: Path, note: Path, k: int) -> None:
    """A teacher cache of the run config ``cfg`` (bfloat16, top k), and its note (size, time)."""
    from jaxdistil.cache_teacher import cache_teacher

    result = cache_teacher(  # (an interrupted stage: the writer keeps its finished chunks)
        cfg, cache_dir, top_k=k, dtype="bfloat16", log=print, progress=True)
    note.write_text(json.dumps({"top_k": result.top_k, "steps": result.steps, "bytes": result.bytes,
                                "bytes_per_token": result.bytes_per_token, "seconds": result.seconds}) + "\n")


def train_seconds(records: list[dict]) -> float:
    """Seconds a run spent in its training steps: each logged interval's tokens / tokens per second."""
    return sum(r["tokens"] / r["tokens_per_s"] for r in records if r.get("tokens_per_s"))


def cache_report(out: Path, kinds: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per cached row: the cache's size and writing time, and the training seconds of its runs against
    the online distilled runs of the same seeds (what the teacher cost in each run)."""
    report = {}
    for kind in (k for k in kinds if k.startswith("cached_k")):
        k = int(kind[len("cached_k"):])
        notes = [json.loads((out / "caches" / f"k{k}-s{seed}.json").read_text()) for seed in seeds]
        online = [train_seconds(read_metrics(out / "runs" / run_name("distilled", s))["train"]) for s in seeds]
        cached = [train_seconds(read_metrics(out / "runs" / run_name(kind, s))["train"]) for s in seeds]
        saved = statistics.mean(o - c for o, c in zip(online, cached))
        write = statistics.mean(n["seconds"] for n in notes)
        report[kind] = {"top_k": k, "bytes_per_token": notes[0]["bytes_per_token"],
                        "cache_mb": statistics.mean(n["bytes"] for n in notes) / 2**20, "write_s": write,
                        "online_train_s": statistics.mean(online), "cached_train_s": statistics.mean(cached),
                        "saved_per_run_s": saved, "pays_after_runs": write / saved if saved > 0 else None}
    return report


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when under it (the report names no machine's directories)."""
    path = path.expanduser().absolute()
    try:
        return str(path.relative_to(root.absolute()))
    except ValueError:
        return str(path)


def _processor() -> str:
    try:
        names = [x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                 if x.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def _count(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def _majority() -> float:
    from jaxdistil.finetune.tasks import TaskConfig, load_task

    task = load_task(TaskConfig(name="builtin:pydocs-topics"))
    labels = task.validation["validation"].labels
    return float(np.bincount(labels).max() / len(labels))


def headline(report: dict[str, Any]) -> str:
    """What was measured, in words: including when distillation does not help."""
    t, st, cmp = report["teacher"], report["students"], report["comparisons"]
    d, m, c = st["distilled"], st["mlm_only"], st["copied"]
    n = len(report["seeds"])
    lines = [f"Teacher: {t['mask_accuracy']:.1%} top-1 on held-out [MASK] positions, "
             f"{t['mask_accuracy'] / t['mask_baseline']:.1f}x the most-frequent-token baseline "
             f"({t['mask_baseline']:.1%}); on the out-of-domain text ({report['ood_text']}) "
             f"{t['ood_mask_accuracy']:.1%}, {t['ood_mask_accuracy'] / t['ood_mask_baseline']:.1f}x its baseline "
             f"({t['ood_mask_baseline']:.1%})."]
    metrics = (("mask_accuracy", "[MASK] accuracy"), ("perplexity", "perplexity"),
               ("ood_mask_accuracy", "out-of-domain [MASK] accuracy"), ("downstream_accuracy", "downstream accuracy"))
    verdicts = []
    for other, label in (("mlm_only", "the MLM-only student"), ("copied", "the copied student")):
        parts = []
        for key, name in metrics:
            x = cmp[f"distilled_vs_{other}"][key]
            sign = "better" if x["gain"] > 0 else "worse"
            beyond = "beyond" if x["beyond_spread"] else "within"
            if key == "perplexity":
                amount, spread = f"{abs(x['gain']):.2f}", f"{x['spread']:.2f}"
            else:
                amount, spread = f"{abs(x['gain']) * 100:.1f} points", f"{x['spread'] * 100:.1f} points"
            parts.append(f"{name} {sign} by {amount} ({beyond} the seed spread, {spread})")
        verdicts.append(f"vs {label}: " + "; ".join(parts))
    wins = [name for key, name in metrics
            if all(cmp[f"distilled_vs_{o}"][key]["better"] and cmp[f"distilled_vs_{o}"][key]["beyond_spread"]
                   for o in ("mlm_only", "copied"))]
    rest = [name for _, name in metrics if name not in wins]
    helped = "[MASK] accuracy" in wins
    both = helped and "out-of-domain [MASK] accuracy" in wins

    def figures(row: dict) -> str:
        return (f"{row['mask_accuracy']:.1%} / {row['ood_mask_accuracy']:.1%} / {row['perplexity']:.2f} / "
                f"{row['downstream_accuracy']:.1%}")

    lines.append(
        f"Distilled student ({report['student_shape']['layers']} of {t['layers']} layers, {report['steps']} updates, "
        f"{n} seeds; [MASK] accuracy held-out / out-of-domain, perplexity, downstream accuracy): {figures(d)}; "
        f"MLM-only {figures(m)}; copied {figures(c)}.")
    lines += [v[0].upper() + v[1:] + "." for v in verdicts]
    if helped:
        where = "on both texts" if both else "on the held-out text of its training domain, not out of domain"
        verdict = (f"Distillation helps {where}: the distilled student beats both by more than the seed spread on "
                   f"{', '.join(wins)}")
        verdict += f", not on {', '.join(rest)}. " if rest else ". "
    else:
        verdict = "Distillation does not beat both baselines on [MASK] accuracy by more than the seed spread. "
    lines.append(verdict + f"It keeps {d['retention']['mask_accuracy']:.1%} of the teacher's [MASK] accuracy and "
                 f"{d['retention']['downstream_accuracy']:.1%} of its downstream accuracy.")
    objectives = [k for k in OBJECTIVES if k in st]
    if objectives:
        rows = []
        for k in objectives:
            x = cmp[f"distilled_vs_{k}"]
            ahead = [name for key, name in metrics if x[key]["better"] and x[key]["beyond_spread"]]
            behind = [name for key, name in metrics if not x[key]["better"] and x[key]["beyond_spread"]]
            rows.append(f"{k} {figures(st[k])} (the distilled student ahead beyond the seed spread on "
                        f"{', '.join(ahead) or 'nothing'}; behind on {', '.join(behind) or 'nothing'})")
        lines.append("Other objectives, same init, budget, data and masks: " + "; ".join(rows) + ".")
    cached = [k for k in st if k.startswith("cached_k")]
    if cached:
        rows = []
        for k in cached:
            x, c = cmp[f"distilled_vs_{k}"], report["cache"][k]
            differ = [name for key, name in metrics if x[key]["beyond_spread"]]
            pays = (f"pays after {c['pays_after_runs']:.1f} students" if c["pays_after_runs"]
                    else "saves nothing here")
            rows.append(f"top {c['top_k']}: {figures(st[k])} ({'differs from the online teacher beyond the seed spread on ' + ', '.join(differ) if differ else 'within the seed spread of the online teacher'}; "
                        f"{c['bytes_per_token']:.0f} bytes per token, written in {c['write_s']:.1f} s, "
                        f"{c['saved_per_run_s']:.1f} s saved per run of {c['online_train_s']:.1f} s: {pays})")
        lines.append("Distilled from a teacher cache (renormalised top-k targets, bfloat16), same runs otherwise: "
                     + "; ".join(rows) + ".")
    return " ".join(lines)


def plot(report: dict[str, Any], out: Path, path: Path) -> None:
    """Loss curves of the student runs and the comparison as bars (matplotlib, Agg backend)."""
    fig, (curves, mlm, ood, down) = plt.subplots(1, 4, figsize=(21, 4.6))
    colors = {"distilled": "C0", "mlm_only": "C1", "random_init": "C2", "triple": "C3", "tinybert": "C6",
              "minilm": "C7", "minilmv2": "C8"}
    for kind in (k for k in colors if k in report["students"]):
        for row in report["students"][kind]["per_seed"]:
            train_rows = read_metrics(out / row["run"])["train"]
            style = "-" if row["seed"] == report["seeds"][0] else ":"
            curves.plot([r["step"] for r in train_rows], [r["loss_mlm"] for r in train_rows], style,
                        color=colors[kind], label=f"{kind} L_mlm, seed {row['seed']}")
    curves.set_xlabel("update")
    curves.set_ylabel("training L_mlm")
    curves.set_title("students' masked-LM training loss")
    curves.legend(fontsize=7)
    names = ["teacher", *report["students"]]
    rows = [report["teacher"], *report["students"].values()]
    for ax, key, title in ((mlm, "mask_accuracy", "held-out [MASK] accuracy"),
                           (ood, "ood_mask_accuracy", "out-of-domain [MASK] accuracy (numpy docs)"),
                           (down, "downstream_accuracy", "downstream accuracy (pydocs-topics)")):
        values = [r[key] for r in rows]
        errors = [r.get(f"{key}_spread", 0.0) / 2 for r in rows]
        ax.bar(names, values, yerr=errors, capsize=4, color=["gray", "C4", *[colors.get(n, "C5") for n in names[2:]]])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        baseline = {"mask_accuracy": report["teacher"]["mask_baseline"],
                    "ood_mask_accuracy": report["teacher"]["ood_mask_baseline"]}.get(key, report["downstream_majority_baseline"])
        ax.axhline(baseline, color="k", ls="--", lw=1, label="majority class" if key == "downstream_accuracy"
                   else "most-frequent-token")
        ax.set_title(title + " (bars: mean, whiskers: seed range)", fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a text table, then the headline."""
    t, st = report["teacher"], report["students"]
    header = (f"{'':14}{'[MASK] acc':>12}{'OOD [MASK]':>12}{'perplexity':>12}{'downstream':>12}"
              f"{'keeps (MLM)':>13}{'keeps (down)':>14}")
    lines = [header, f"{'teacher':14}{t['mask_accuracy']:>12.4f}{t['ood_mask_accuracy']:>12.4f}{t['perplexity']:>12.2f}"
             f"{t['downstream_accuracy']:>12.4f}{'':>13}{'':>14}"]
    for name, row in st.items():
        pm = lambda k, row=row: f"±{row[k + '_spread'] / 2:.3f}" if k + "_spread" in row else ""  # noqa: E731
        lines.append(f"{name:14}{row['mask_accuracy']:>12.4f}{row['ood_mask_accuracy']:>12.4f}{row['perplexity']:>12.2f}"
                     f"{row['downstream_accuracy']:>12.4f}{row['retention']['mask_accuracy']:>13.1%}"
                     f"{row['retention']['downstream_accuracy']:>14.1%}"
                     + (f"   (seed range {pm('mask_accuracy')} / {pm('ood_mask_accuracy')} / "
                        f"{pm('downstream_accuracy')})" if pm("mask_accuracy") else ""))
    lines += [
        f"most-frequent-token [MASK] baseline {t['mask_baseline']:.4f} (OOD {t['ood_mask_baseline']:.4f}); "
        f"out-of-domain text: {report['ood_text']}; downstream majority class "
        f"{report['downstream_majority_baseline']:.4f}",
        f"student: {report['student_shape']['params'] / 1e6:.2f}M params vs teacher {t['params'] / 1e6:.2f}M; "
        f"forward pass {report['speed']['speedup']:.2f}x faster",
        f"export: {report['export']}",
        f"wall time {report['wall_time_s']:.0f} s"
        + (f" ({len(report['reused_stages'])} of {len(report['stage_seconds'])} stages reused; they took "
           f"{report['stage_seconds_total']:.0f} s when they ran)" if report["reused_stages"] else "")
        + " (each stage's time: report.json)",
        "",
        report["headline"],
    ]
    return "\n".join(lines)


# ---- the committed sample: what the report is built from, with no machine's directories in it

PUBLISHED = ("report.json", "report.png", "stages.json", "speed.json", "export.json", "ood.json")
PUBLISHED_GLOBS = ("caches/*.json",)  # the teacher caches' notes (not the caches)
PUBLISHED_RUN_FILES = ("metrics.jsonl", "config.yaml", "model/config.json")


def publish(out: str | Path, dest: str | Path) -> list[Path]:
    """Copies the report of the demo in ``out`` and the files it is built from (each run's and each
    fine-tuning's metrics.jsonl and config.yaml) into ``dest``. Paths in them are rewritten relative
    to the demo directory (``runs/distilled-s56``) and the shipped teacher's relative to the source
    tree (``jaxdistil/assets/teacher-pydocs``), so the copy names no machine's directories."""
    out, dest = Path(out).expanduser().absolute(), Path(dest).expanduser().absolute()
    if not (out / "report.json").is_file():
        raise UserError(f"{out} holds no demo report (report.json); run `jaxdistil demo --output {out}` first")
    files = [out / name for name in PUBLISHED if (out / name).is_file()]
    files += sorted(p for pattern in PUBLISHED_GLOBS for p in out.glob(pattern))
    for group in ("runs", "finetune"):
        for run in sorted((out / group).iterdir()) if (out / group).is_dir() else []:
            files += [run / name for name in PUBLISHED_RUN_FILES if (run / name).is_file()]
    prefixes = [(str(out) + "/", ""), (str(out), "."), (str(TEACHER.parents[2]) + "/", "")]
    written = []
    for src in files:
        target = dest / src.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".png":
            target.write_bytes(src.read_bytes())
        else:
            text = src.read_text()
            for prefix, replacement in prefixes:
                text = text.replace(prefix, replacement)
            target.write_text(text)
        written.append(target)
    return written
