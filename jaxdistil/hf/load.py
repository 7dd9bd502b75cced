"""Load a model from anywhere jaxdistil meets one, into a plain numpy Flax param tree.

``load_model(path_or_hub_id)`` reads, in this order of checks:
  - a jaxdistil run directory (``config.yaml`` / ``checkpoints/``) through
    ``restore_run_params`` (a checkpoint of ``jaxdistil.training.checkpoint``);
  - a Flax model directory (``config.json`` + ``params/``, an orbax checkpoint; written by
    ``save_flax_model`` / ``jaxdistil import``);
  - a Hugging Face directory (``config.json`` + safetensors, sharded safetensors, or
    ``pytorch_model.bin``);
  - otherwise a Hugging Face Hub id, fetched with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from huggingface_hub import snapshot_download

from jaxdistil.errors import UserError
from jaxdistil.hf import files
from jaxdistil.hf.names import (
    CLASSIFIER_ARCHITECTURES,
    check_flax_params,
    classifier_architecture,
    family,
    hf_to_flax,
    split_classifier,
)
from jaxdistil.models import build_model, init_params, load_config
from jaxdistil.models.classification import (
    HEAD_PARAMS,
    ClassifierHead,
    build_classifier,
    check_classifier_config,
    family_of,
)
from jaxdistil.models.configs import ConfigError, ModelConfig, config_from_hf_dict
from jaxdistil.training.checkpoint import RunCheckpointer

# Architectures whose tensors the importer understands (the head-less ones give has_mlm_head=False;
# BertForPreTraining's next-sentence head and BertModel's pooler are ignored; a sequence
# classifier's head is read into LoadedModel.classifier).
CLASSIFIERS = tuple(CLASSIFIER_ARCHITECTURES.values())
SUPPORTED_ARCHITECTURES = ("BertForMaskedLM", "BertModel", "BertForPreTraining",
                           "DistilBertForMaskedLM", "DistilBertModel", "RobertaForMaskedLM", "RobertaModel",
                           "GPT2LMHeadModel", "GPT2Model", *CLASSIFIERS)
PARAMS_DIR = "params"
# Key in a Flax model directory's config.json for what is not part of the HF config.
META_KEY = "jaxdistil"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for ``build_model(config)`` + ``model.apply({"params": params}, ...)``.

    params: nested dict of numpy arrays (the tree of ``jaxdistil.models``; unboxed).
    has_mlm_head: False when the checkpoint had no MLM head (e.g. ``BertModel``); ``params`` then
      holds a freshly initialised head so that the model runs, but its logits mean nothing.
    source: "hf", "flax" or "run"; path: the local directory read (the snapshot for a hub id).
    tokenizer_dir: a directory with the tokenizer files, or None.
    classifier / head: a sequence classifier's head params ({pooler | pre_classifier, classifier})
      and what it predicts (``ClassifierHead``); None for other models. ``classifier_params()`` is
      the whole classifier tree of ``jaxdistil.models.classification``.
    """

    config: ModelConfig
    params: dict
    has_mlm_head: bool
    source: str
    tokenizer_dir: str | None
    path: str = ""
    step: int | None = None
    ignored: tuple[str, ...] = ()  # HF tensors not used (pooler, NSP head, tied copies, buffers)
    classifier: dict | None = None
    head: ClassifierHead | None = None

    def classifier_params(self) -> dict:
        """Encoder + classification head: the params of ``build_classifier(config, head)``."""
        if self.classifier is None:
            raise UserError(f"{self.path}: not a sequence classifier (no classification head); "
                            "fine-tune it first with `jaxdistil finetune`")
        return {"embeddings": self.params["embeddings"], "encoder": self.params["encoder"], **self.classifier}


def default_mlm_head(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """An untrained MLM head initialised as transformers does (normal(initializer_range), zero
    biases, unit LayerNorm), for encoders imported without one."""
    rng = np.random.default_rng(seed)
    d = cfg.hidden
    return {
        "transform": {"kernel": rng.normal(0.0, cfg.initializer_range, (d, d)).astype(np.float32),
                      "bias": np.zeros(d, np.float32)},
        "transform_norm": {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)},
        "bias": np.zeros(cfg.vocab_size, np.float32),
    }


def _cast(tree: Any, dtype) -> Any:
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype, copy=False)


def _read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json; pass a Hugging Face model directory, "
                        "a Flax model directory or a jaxdistil run directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-export the model") from err


def config_from_dict(data: dict, source: str) -> ModelConfig:
    """HF config dict -> typed config, with every unsupported feature reported as a UserError."""
    try:
        cfg = config_from_hf_dict(data, source)
    except ConfigError as err:
        raise UserError(str(err)) from err
    pos_type = data.get("position_embedding_type", "absolute")
    if pos_type not in (None, "absolute"):
        raise UserError(f"{source}: position_embedding_type {pos_type!r} is not supported; "
                        "jaxdistil models use absolute position embeddings")
    if data.get("is_decoder") or data.get("add_cross_attention"):
        raise UserError(f"{source}: decoder/cross-attention BERT models are not supported; "
                        "use an encoder (BertForMaskedLM/BertModel) checkpoint")
    return cfg


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def load_hf_dir(directory: str | Path, param_dtype=np.float32) -> LoadedModel:
    """A Hugging Face model directory -> LoadedModel (params cast to ``param_dtype``)."""
    directory = Path(directory)
    data = _read_config_json(directory)
    archs = data.get("architectures") or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UserError(f"{directory}: architecture {', '.join(archs)} is not supported; jaxdistil imports "
                        + ", ".join(SUPPORTED_ARCHITECTURES))
    cfg = config_from_dict(data, str(directory / "config.json"))
    state = files.read_state_dict(directory)
    classifier = head = None
    if any(a in CLASSIFIERS for a in archs):
        try:
            head = ClassifierHead.from_hf_dict(data)
            check_classifier_config(cfg)
        except ConfigError as err:
            raise UserError(f"{directory / 'config.json'}: {err}") from None
        state, classifier, _ = split_classifier(state, cfg, str(directory), head.num_labels)
        classifier = _cast(classifier, param_dtype)
    params, has_head, ignored = hf_to_flax(state, cfg, source=str(directory))
    # hf_to_flax refuses a stored decoder weight that differs from the embeddings; an untied head
    # whose decoder weight is absent would be random in transformers: refuse that too.
    if data.get("tie_word_embeddings") is False and has_head and family(cfg).tied not in ignored:
        raise UserError(f"{directory}: tie_word_embeddings is false but {family(cfg).tied} is missing; "
                        "jaxdistil's MLM head is tied to the word embeddings: use a tied checkpoint")
    params = _cast(params, param_dtype)
    if not has_head:
        params["mlm_head"] = _cast(default_mlm_head(cfg), param_dtype)
    return LoadedModel(cfg, params, has_head, "hf",
                       str(directory) if files.has_tokenizer(directory) else None,
                       path=str(directory), ignored=tuple(ignored), classifier=classifier, head=head)


# ---------------------------------------------------------------------------------------------
# Flax model directories: config.json (HF format) + params/ (orbax) [+ tokenizer files]


def is_flax_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / PARAMS_DIR).is_dir()


def save_flax_model(cfg: ModelConfig, params: dict, output: str | Path, *, has_mlm_head: bool = True,
                    tokenizer_dir: str | Path | None = None, force: bool = False,
                    origin: str | None = None, classifier: dict | None = None,
                    head: ClassifierHead | None = None) -> Path:
    """Writes a Flax model directory (all-or-nothing); ``train`` and ``load_model`` read it.

    params: the unboxed param tree (numpy or jax arrays; gathered to host numpy first).
    classifier / head: a sequence classifier's head, saved beside the encoder.
    """
    check_flax_params(params, cfg, with_head=True, source="params to save")
    host = _to_host({**params, **(classifier or {})})
    with files.atomic_output_dir(output, force) as tmp:
        config = cfg.to_hf_dict()
        config.pop("tie_weights_", None)
        config["tie_word_embeddings"] = True
        if head is not None:
            config.update(head.to_hf_dict(), architectures=[classifier_architecture(cfg)])
        config[META_KEY] = {"format": "flax", "has_mlm_head": bool(has_mlm_head)}
        if classifier is not None:
            config[META_KEY]["classifier"] = True
        if origin:
            config[META_KEY]["origin"] = origin
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / PARAMS_DIR).absolute(), host)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if tokenizer_dir is not None:
            files.copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(output)


def _to_host(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_flax_dir(directory: str | Path, param_dtype=np.float32) -> LoadedModel:
    """A Flax model directory -> LoadedModel."""
    directory = Path(directory)
    data = _read_config_json(directory)
    cfg = config_from_dict(data, str(directory / "config.json"))
    meta = data.get(META_KEY) or {}
    try:
        checkpointer = ocp.StandardCheckpointer()
        params = checkpointer.restore((directory / PARAMS_DIR).absolute())
        checkpointer.close()
    except Exception as err:  # orbax raises several types for a damaged or partial checkpoint
        raise UserError(f"{directory / PARAMS_DIR}: cannot restore the orbax checkpoint "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        "re-run `jaxdistil import`") from err
    params = _cast(params, param_dtype)
    classifier = head = None
    if meta.get("classifier"):
        head = ClassifierHead.from_hf_dict(data)
        classifier = {k: params.pop(k) for k in HEAD_PARAMS[family_of(cfg)] if k in params}
    check_flax_params(params, cfg, with_head=True, source=str(directory))
    return LoadedModel(cfg, params, bool(meta.get("has_mlm_head", True)), "flax",
                       str(directory) if files.has_tokenizer(directory) else None, path=str(directory),
                       classifier=classifier, head=head)


# ---------------------------------------------------------------------------------------------
# Run directories (RUN/config.yaml, RUN/student/config.json, RUN/tokenizer/, RUN/checkpoints/<step>/)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()
            or (path / "student" / "config.json").is_file() or (path / "model" / "config.json").is_file())


def run_model_config(run_dir: str | Path) -> tuple[ModelConfig, ClassifierHead | None]:
    """The model a run trains: ``RUN/student/config.json`` (distillation, MLM) or
    ``RUN/model/config.json`` (fine-tuning: a sequence classifier, with its head)."""
    run_dir = Path(run_dir)
    for sub in ("student", "model"):
        path = run_dir / sub / "config.json"
        if path.is_file():
            try:
                cfg = load_config(path)
                head = ClassifierHead.from_hf_dict(json.loads(path.read_text())) if sub == "model" else None
            except (ConfigError, json.JSONDecodeError) as err:
                raise UserError(f"{path}: {err}") from err
            return cfg, head
    raise UserError(f"{run_dir} is not a jaxdistil run directory (no student/config.json or model/config.json)")


def restore_run_params(run_dir: str | Path, step: int | None = None) -> tuple[int, ModelConfig, Any]:
    """The trained model of a run: (step, model config, params as numpy arrays).

    run_dir: a jaxdistil run directory (``RUN/student/`` or ``RUN/model/config.json`` + ``RUN/checkpoints``);
    a fine-tuning run's params are its classifier's (encoder + head).
    step: a saved step; default the latest readable one.
    """
    run_dir = Path(run_dir)
    model_cfg, head = run_model_config(run_dir)
    ckpt = RunCheckpointer(run_dir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise UserError(f"run {run_dir} has no checkpoint yet; train it for at least one save first")
        if step is not None and step not in steps:
            raise UserError(f"run {run_dir} has no checkpoint at step {step}; saved steps: {steps}")
        model = build_model(model_cfg) if head is None else build_classifier(model_cfg, head)
        abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), abstract)
        try:
            restored_step, params = ckpt.restore_params(abstract, step)
        except UserError as err:
            if "different model" in str(err):
                raise UserError(f"run {run_dir}: stored params do not match its config.json "
                                f"({str(err).split('(', 1)[1].split(');')[0]})") from None
            raise
    finally:
        ckpt.manager.close()
    return restored_step, model_cfg, jax.tree.map(np.asarray, params)


def load_run(run_dir: str | Path, step: int | None = None, param_dtype=np.float32) -> LoadedModel:
    """The model of a jaxdistil run at ``step`` (latest when None): a distillation run's student, or
    a fine-tuning run's classifier (its head in ``classifier``)."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir() or not [p for p in ckpt.iterdir() if not p.name.startswith(".")]:
        raise UserError(f"{run_dir}: the run has no checkpoint in {ckpt}; train it first "
                        "(jaxdistil train) or pass a run directory that has checkpoints")
    try:
        restored_step, cfg, params = restore_run_params(run_dir, step)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        which = "the latest step" if step is None else f"step {step}"
        raise UserError(f"{run_dir}: cannot restore {which} ({err}); "
                        f"list {ckpt} for the saved steps") from err
    params = _cast(_to_host(params), param_dtype)
    tok = run_dir / "tokenizer"
    tok_dir = str(tok) if files.has_tokenizer(tok) else None
    _, head = run_model_config(run_dir)
    if head is None:
        return LoadedModel(cfg, params, True, "run", tok_dir, path=str(run_dir), step=int(restored_step))
    names = HEAD_PARAMS[family_of(cfg)]
    encoder = {"embeddings": params["embeddings"], "encoder": params["encoder"]}
    if family(cfg).head:  # the placeholder MLM head of an encoder (GPT-2's LM head is the tied projection)
        encoder["mlm_head"] = _cast(default_mlm_head(cfg), param_dtype)
    return LoadedModel(cfg, encoder, False, "run", tok_dir, path=str(run_dir), step=int(restored_step),
                       classifier={k: params[k] for k in names}, head=head)


# ---------------------------------------------------------------------------------------------
# Hub ids


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def download_hub_model(hub_id: str) -> Path:
    """Fetches config, tokenizer and weights of a Hub model into the local cache (safetensors
    preferred; ``pytorch_model.bin`` only when the repository has no safetensors)."""
    try:
        patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", *files.TOKENIZER_FILES]
        path = Path(snapshot_download(hub_id, allow_patterns=patterns))
        if not ((path / files.SAFE_WEIGHTS).is_file() or (path / files.SAFE_INDEX).is_file()):
            path = Path(snapshot_download(hub_id, allow_patterns=patterns + ["pytorch_model.bin*"]))
    except Exception as err:  # offline mode, no network, unknown repo, bad id: all mean the same here
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"cannot fetch {hub_id!r} from the Hugging Face Hub ({type(err).__name__}: {first}); "
                        "if you are offline or meant a local path, "
                        "pass an existing local model directory") from err
    return path


def load_model(path_or_hub_id: str | Path, step: int | None = None, param_dtype=np.float32) -> LoadedModel:
    """Loads a run directory, Flax model directory, HF directory or Hub id (see module doc).

    ``step`` picks a checkpoint of a run directory (latest when None); it is an error elsewhere.
    """
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; pass the model directory that holds it")
        if is_run_dir(path):
            return load_run(path, step, param_dtype)
        if step is not None:
            raise UserError(f"{path}: --step applies to run directories only; this is a model directory")
        if is_flax_dir(path):
            return load_flax_dir(path, param_dtype)
        return load_hf_dir(path, param_dtype)
    if _looks_like_path(text) or isinstance(path_or_hub_id, Path):
        raise UserError(f"{text}: no such directory; pass an existing model or run directory")
    if step is not None:
        raise UserError(f"{text}: --step applies to run directories only")
    loaded = load_hf_dir(download_hub_model(text), param_dtype)
    return loaded


def load_model_arg(source: str, step: int | None = None, what: str = "model directory") -> LoadedModel:
    """``load_model(source)`` of a command-line argument, with a one-line error naming ``what`` for a
    local path that does not exist (rather than trying the Hub)."""
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") > 1
    if looks_local and not Path(source).expanduser().exists():
        raise UserError(f"{what} {source} does not exist; pass a model directory or a hub id")
    return load_model(str(Path(source).expanduser()) if looks_local else source, step=step)
