"""One table between Hugging Face (PyTorch) tensor names and the jaxdistil Flax parameter tree.

Both directions read the same table, so import and export cannot drift apart. Each row says:
the Flax path, the Hugging Face name (without the ``bert.`` / ``distilbert.`` base-model prefix;
``{i}`` is the layer index), how the tensor is reshaped, and its Hugging Face shape in symbols.

Reshapes (PyTorch ``nn.Linear`` stores ``weight`` as [out, in]; a Flax kernel is [in, out]):
  COPY       embeddings, LayerNorm weight/bias, plain biases, GPT-2's ``Conv1D`` weights ([in, out]
             already): same array.
  LINEAR     [out, in] -> kernel [in, out].
  HEADS_IN   q/k/v weight [N*H, D] -> kernel [D, N, H] (Flax DenseGeneral with per-head output).
  HEADS_BIAS q/k/v bias [N*H] -> [N, H].
  HEADS_OUT  out_lin weight [D, N*H] -> kernel [N, H, D].
  CONV_HEADS_OUT  GPT-2's attn.c_proj ``Conv1D`` weight [N*H, D] -> kernel [N, H, D].
  QKV_IN0..2, QKV_BIAS0..2  GPT-2's fused c_attn [D, 3D] / [3D]: the q, k or v third -> [D, N, H] /
             [N, H]; three rows share the HF name and export concatenates them back.
Per-layer rows are stacked on a leading ``layers`` axis (the encoder runs under ``nn.scan``).

Symbols: V vocab, P positions, T token types, D hidden, E = 3 D, F feed-forward width, L layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.models.configs import BertConfig, DistilBertConfig, GPT2Config, ModelConfig, RobertaConfig

COPY, LINEAR, HEADS_IN, HEADS_BIAS, HEADS_OUT = "copy", "linear", "heads_in", "heads_bias", "heads_out"
CONV_HEADS_OUT, QKV_IN, QKV_BIAS = "conv_heads_out", "qkv_in", "qkv_bias"

# (flax path, HF name, reshape, HF shape) -- model-level tensors (the encoder's, under the base prefix).
_BERT_EMBEDDINGS = [
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", COPY, "VD"),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", COPY, "PD"),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", COPY, "TD"),
    ("embeddings/LayerNorm/scale", "embeddings.LayerNorm.weight", COPY, "D"),
    ("embeddings/LayerNorm/bias", "embeddings.LayerNorm.bias", COPY, "D"),
]
_DISTILBERT_EMBEDDINGS = [row for row in _BERT_EMBEDDINGS if "token_type" not in row[0]]

# Per-layer rows: flax path under encoder/layers, HF suffix after "<encoder>.layer.{i}.".
_BERT_LAYER = [
    ("q_lin/kernel", "attention.self.query.weight", HEADS_IN, "DD"),
    ("q_lin/bias", "attention.self.query.bias", HEADS_BIAS, "D"),
    ("k_lin/kernel", "attention.self.key.weight", HEADS_IN, "DD"),
    ("k_lin/bias", "attention.self.key.bias", HEADS_BIAS, "D"),
    ("v_lin/kernel", "attention.self.value.weight", HEADS_IN, "DD"),
    ("v_lin/bias", "attention.self.value.bias", HEADS_BIAS, "D"),
    ("out_lin/kernel", "attention.output.dense.weight", HEADS_OUT, "DD"),
    ("out_lin/bias", "attention.output.dense.bias", COPY, "D"),
    ("sa_layer_norm/scale", "attention.output.LayerNorm.weight", COPY, "D"),
    ("sa_layer_norm/bias", "attention.output.LayerNorm.bias", COPY, "D"),
    ("lin1/kernel", "intermediate.dense.weight", LINEAR, "FD"),
    ("lin1/bias", "intermediate.dense.bias", COPY, "F"),
    ("lin2/kernel", "output.dense.weight", LINEAR, "DF"),
    ("lin2/bias", "output.dense.bias", COPY, "D"),
    ("output_layer_norm/scale", "output.LayerNorm.weight", COPY, "D"),
    ("output_layer_norm/bias", "output.LayerNorm.bias", COPY, "D"),
]
_DISTILBERT_LAYER = [
    ("q_lin/kernel", "attention.q_lin.weight", HEADS_IN, "DD"),
    ("q_lin/bias", "attention.q_lin.bias", HEADS_BIAS, "D"),
    ("k_lin/kernel", "attention.k_lin.weight", HEADS_IN, "DD"),
    ("k_lin/bias", "attention.k_lin.bias", HEADS_BIAS, "D"),
    ("v_lin/kernel", "attention.v_lin.weight", HEADS_IN, "DD"),
    ("v_lin/bias", "attention.v_lin.bias", HEADS_BIAS, "D"),
    ("out_lin/kernel", "attention.out_lin.weight", HEADS_OUT, "DD"),
    ("out_lin/bias", "attention.out_lin.bias", COPY, "D"),
    ("sa_layer_norm/scale", "sa_layer_norm.weight", COPY, "D"),
    ("sa_layer_norm/bias", "sa_layer_norm.bias", COPY, "D"),
    ("lin1/kernel", "ffn.lin1.weight", LINEAR, "FD"),
    ("lin1/bias", "ffn.lin1.bias", COPY, "F"),
    ("lin2/kernel", "ffn.lin2.weight", LINEAR, "DF"),
    ("lin2/bias", "ffn.lin2.bias", COPY, "D"),
    ("output_layer_norm/scale", "output_layer_norm.weight", COPY, "D"),
    ("output_layer_norm/bias", "output_layer_norm.bias", COPY, "D"),
]

# MLM head rows: HF names are top-level (outside the base-model prefix).
_BERT_HEAD = [
    ("mlm_head/transform/kernel", "cls.predictions.transform.dense.weight", LINEAR, "DD"),
    ("mlm_head/transform/bias", "cls.predictions.transform.dense.bias", COPY, "D"),
    ("mlm_head/transform_norm/scale", "cls.predictions.transform.LayerNorm.weight", COPY, "D"),
    ("mlm_head/transform_norm/bias", "cls.predictions.transform.LayerNorm.bias", COPY, "D"),
    ("mlm_head/bias", "cls.predictions.bias", COPY, "V"),
]
_DISTILBERT_HEAD = [
    ("mlm_head/transform/kernel", "vocab_transform.weight", LINEAR, "DD"),
    ("mlm_head/transform/bias", "vocab_transform.bias", COPY, "D"),
    ("mlm_head/transform_norm/scale", "vocab_layer_norm.weight", COPY, "D"),
    ("mlm_head/transform_norm/bias", "vocab_layer_norm.bias", COPY, "D"),
    ("mlm_head/bias", "vocab_projector.bias", COPY, "V"),
]


# RoBERTa: BERT's encoder names under "roberta."; the head is lm_head.{dense,layer_norm,bias}.
_ROBERTA_HEAD = [
    ("mlm_head/transform/kernel", "lm_head.dense.weight", LINEAR, "DD"),
    ("mlm_head/transform/bias", "lm_head.dense.bias", COPY, "D"),
    ("mlm_head/transform_norm/scale", "lm_head.layer_norm.weight", COPY, "D"),
    ("mlm_head/transform_norm/bias", "lm_head.layer_norm.bias", COPY, "D"),
    ("mlm_head/bias", "lm_head.bias", COPY, "V"),
]

# GPT-2 (under "transformer."): no embedding LayerNorm, Conv1D weights stored [in, out], fused c_attn.
_GPT2_EMBEDDINGS = [
    ("embeddings/word_embeddings/embedding", "wte.weight", COPY, "VD"),
    ("embeddings/position_embeddings/embedding", "wpe.weight", COPY, "PD"),
]
_GPT2_LAYER = [
    ("sa_layer_norm/scale", "ln_1.weight", COPY, "D"),
    ("sa_layer_norm/bias", "ln_1.bias", COPY, "D"),
    *[(f"{n}_lin/kernel", "attn.c_attn.weight", f"{QKV_IN}{i}", "DE") for i, n in enumerate("qkv")],
    *[(f"{n}_lin/bias", "attn.c_attn.bias", f"{QKV_BIAS}{i}", "E") for i, n in enumerate("qkv")],
    ("out_lin/kernel", "attn.c_proj.weight", CONV_HEADS_OUT, "DD"),
    ("out_lin/bias", "attn.c_proj.bias", COPY, "D"),
    ("output_layer_norm/scale", "ln_2.weight", COPY, "D"),
    ("output_layer_norm/bias", "ln_2.bias", COPY, "D"),
    ("lin1/kernel", "mlp.c_fc.weight", COPY, "DF"),
    ("lin1/bias", "mlp.c_fc.bias", COPY, "F"),
    ("lin2/kernel", "mlp.c_proj.weight", COPY, "FD"),
    ("lin2/bias", "mlp.c_proj.bias", COPY, "D"),
]
_GPT2_FINAL = [
    ("encoder/final_layer_norm/scale", "ln_f.weight", COPY, "D"),
    ("encoder/final_layer_norm/bias", "ln_f.bias", COPY, "D"),
]

# Sequence-classification heads: (flax path, HF name, reshape, HF shape, under the base prefix?).
# BERT's pooler belongs to BertModel (``bert.pooler.dense``); the classifier layers are top-level.
_CLASSIFIER_HEADS = {
    "bert": [
        ("pooler/kernel", "pooler.dense.weight", LINEAR, "DD", True),
        ("pooler/bias", "pooler.dense.bias", COPY, "D", True),
        ("classifier/kernel", "classifier.weight", LINEAR, "LD", False),
        ("classifier/bias", "classifier.bias", COPY, "L", False),
    ],
    "distilbert": [
        ("pre_classifier/kernel", "pre_classifier.weight", LINEAR, "DD", False),
        ("pre_classifier/bias", "pre_classifier.bias", COPY, "D", False),
        ("classifier/kernel", "classifier.weight", LINEAR, "LD", False),
        ("classifier/bias", "classifier.bias", COPY, "L", False),
    ],
    # RobertaClassificationHead (no pooler: RobertaModel(add_pooling_layer=False)).
    "roberta": [
        ("classifier/dense/kernel", "classifier.dense.weight", LINEAR, "DD", False),
        ("classifier/dense/bias", "classifier.dense.bias", COPY, "D", False),
        ("classifier/out_proj/kernel", "classifier.out_proj.weight", LINEAR, "LD", False),
        ("classifier/out_proj/bias", "classifier.out_proj.bias", COPY, "L", False),
    ],
    # GPT2ForSequenceClassification's score: an nn.Linear without bias.
    "gpt2": [
        ("score/kernel", "score.weight", LINEAR, "LD", False),
    ],
}
# The transformers class of each family's sequence classifier (config.json "architectures").
CLASSIFIER_ARCHITECTURES = {"bert": "BertForSequenceClassification",
                            "distilbert": "DistilBertForSequenceClassification",
                            "roberta": "RobertaForSequenceClassification",
                            "gpt2": "GPT2ForSequenceClassification"}


class _Family:
    """Names of one model family: base prefix, encoder layer stem, tied and ignorable tensors."""

    def __init__(self, prefix, layer_stem, embeddings, layer, head, tied, tied_bias, ignorable,
                 final=(), kind=""):
        self.prefix = prefix  # "bert." / "distilbert." / "roberta." / "transformer."
        self.layer_stem = layer_stem  # "encoder.layer" / "transformer.layer" / "h"
        self.embeddings, self.layer, self.head = embeddings, layer, head
        self.final = list(final)  # model-level rows after the layers (GPT-2's ln_f)
        self.tied = tied  # decoder weight = word embeddings, left out of exports
        self.tied_bias = tied_bias  # a second name of the head's output bias (BERT, RoBERTa)
        self.ignorable = ignorable  # regexes of tensors the LM does not use
        self.kind = kind  # the architectures, for messages

    @property
    def bias_name(self) -> str | None:
        """HF name of the head's output bias (what ``tied_bias`` must equal)."""
        return next((name for path, name, *_ in self.head if path == "mlm_head/bias"), None)


_FAMILIES = {
    "bert": _Family(
        "bert.", "encoder.layer", _BERT_EMBEDDINGS, _BERT_LAYER, _BERT_HEAD,
        tied="cls.predictions.decoder.weight", tied_bias="cls.predictions.decoder.bias",
        ignorable=[
            r"embeddings\.position_ids",  # non-persistent buffers that old checkpoints saved
            r"embeddings\.token_type_ids",
            r"pooler\.dense\.(weight|bias)",  # BertModel's pooler: not part of the MLM model
            r"cls\.seq_relationship\.(weight|bias)",  # BertForPreTraining's next-sentence head
        ],
        kind="BertForMaskedLM/BertModel",
    ),
    "distilbert": _Family(
        "distilbert.", "transformer.layer", _DISTILBERT_EMBEDDINGS, _DISTILBERT_LAYER, _DISTILBERT_HEAD,
        tied="vocab_projector.weight", tied_bias=None,
        ignorable=[r"embeddings\.position_ids"],
        kind="DistilBertForMaskedLM/DistilBertModel",
    ),
    "roberta": _Family(
        "roberta.", "encoder.layer", _BERT_EMBEDDINGS, _BERT_LAYER, _ROBERTA_HEAD,
        tied="lm_head.decoder.weight", tied_bias="lm_head.decoder.bias",
        ignorable=[r"embeddings\.position_ids", r"embeddings\.token_type_ids", r"pooler\.dense\.(weight|bias)"],
        kind="RobertaForMaskedLM/RobertaModel",
    ),
    "gpt2": _Family(
        "transformer.", "h", _GPT2_EMBEDDINGS, _GPT2_LAYER, [], final=_GPT2_FINAL,
        tied="lm_head.weight", tied_bias=None,
        ignorable=[r"h\.\d+\.attn\.(masked_)?bias"],  # the causal-mask buffers old checkpoints saved
        kind="GPT2LMHeadModel/GPT2Model",
    ),
}

_FAMILY_OF = {BertConfig: "bert", DistilBertConfig: "distilbert", RobertaConfig: "roberta", GPT2Config: "gpt2"}


def family_name(cfg: ModelConfig) -> str:
    return _FAMILY_OF[type(cfg)]


def family(cfg: ModelConfig) -> _Family:
    return _FAMILIES[family_name(cfg)]


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "V": cfg.vocab_size, "P": cfg.max_position_embeddings, "T": cfg.token_types,
        "D": cfg.hidden, "E": 3 * cfg.hidden, "F": cfg.mlp,
    }


def _table(cfg: ModelConfig, with_head: bool) -> list[tuple[str, str, str, tuple[int, ...], int | None]]:
    """Rows (flax path, HF name without prefix, reshape, HF shape, layer index or None)."""
    fam, dims = family(cfg), _dims(cfg)
    rows = [(path, name, kind, tuple(dims[s] for s in shape), None)
            for path, name, kind, shape in fam.embeddings]
    for i in range(cfg.layers):
        for path, suffix, kind, shape in fam.layer:
            rows.append((f"encoder/layers/{path}", f"{fam.layer_stem}.{i}.{suffix}", kind,
                         tuple(dims[s] for s in shape), i))
    rows += [(path, name, kind, tuple(dims[s] for s in shape), None) for path, name, kind, shape in fam.final]
    if with_head:
        rows += [(path, name, kind, tuple(dims[s] for s in shape), None)
                 for path, name, kind, shape in fam.head]
    return rows


def head_names(cfg: ModelConfig) -> list[str]:
    """HF names of the MLM head tensors (top-level, no prefix)."""
    return [name for _, name, _, _ in family(cfg).head]


# ---------------------------------------------------------------------------------------------
# Reshapes.  N heads, H = D // N per-head width.


def _part(kind: str) -> tuple[str, int | None]:
    """"qkv_in1" -> ("qkv_in", 1); other kinds -> (kind, None)."""
    for base in (QKV_IN, QKV_BIAS):
        if kind.startswith(base) and kind != base:
            return base, int(kind[len(base):])
    return kind, None


def _to_flax(x: np.ndarray, kind: str, heads: int) -> np.ndarray:
    kind, part = _part(kind)
    if kind == COPY:
        return x
    if kind == LINEAR:
        return x.T
    if kind == HEADS_IN:  # [N*H, D] -> [D, N, H]
        return x.T.reshape(x.shape[1], heads, -1)
    if kind == HEADS_BIAS:  # [N*H] -> [N, H]
        return x.reshape(heads, -1)
    if kind == HEADS_OUT:  # [D, N*H] -> [N*H, D] -> [N, H, D]
        return x.T.reshape(heads, -1, x.shape[0])
    if kind == CONV_HEADS_OUT:  # [N*H, D] -> [N, H, D]
        return x.reshape(heads, -1, x.shape[1])
    if kind == QKV_IN:  # [D, 3D] -> third `part` [D, D] -> [D, N, H]
        width = x.shape[1] // 3
        return x[:, part * width:(part + 1) * width].reshape(x.shape[0], heads, -1)
    if kind == QKV_BIAS:  # [3D] -> [D] -> [N, H]
        width = x.shape[0] // 3
        return x[part * width:(part + 1) * width].reshape(heads, -1)
    raise AssertionError(kind)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """Flax -> HF layout; for a fused-QKV part, that part's [D, D] / [D] slice (see ``_fuse``)."""
    kind, _ = _part(kind)
    if kind == COPY:
        return x
    if kind == LINEAR:
        return x.T
    if kind == HEADS_IN:  # [D, N, H] -> [N*H, D]
        return x.reshape(x.shape[0], -1).T
    if kind == HEADS_BIAS:  # [N, H] -> [N*H]
        return x.reshape(-1)
    if kind == HEADS_OUT:  # [N, H, D] -> [D, N*H]
        return x.reshape(-1, x.shape[-1]).T
    if kind == CONV_HEADS_OUT:  # [N, H, D] -> [N*H, D]
        return x.reshape(-1, x.shape[-1])
    if kind == QKV_IN:  # [D, N, H] -> [D, N*H]
        return x.reshape(x.shape[0], -1)
    if kind == QKV_BIAS:  # [N, H] -> [N*H]
        return x.reshape(-1)
    raise AssertionError(kind)


def _get(tree: Mapping[str, Any], path: str):
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _leaf_paths(value, path + "/")
        else:
            out.append(path)
    return out


def _listing(label: str, names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
    return f"{label} ({len(names)}): {shown}"


# ---------------------------------------------------------------------------------------------
# Hugging Face -> Flax


def normalize_names(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Drops the base-model prefix (``bert.`` / ``distilbert.``) and renames legacy LayerNorm
    ``gamma``/``beta`` to ``weight``/``bias``; checkpoints with and without the prefix then agree."""
    fam = family(cfg)
    out: dict[str, np.ndarray] = {}
    duplicates = []
    for name, value in state.items():
        short = name.removeprefix(fam.prefix)
        short = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", short)
        short = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", short)
        if short in out:
            duplicates.append(name)
        out[short] = value
    if duplicates:
        raise UserError(f"checkpoint holds the same tensor twice (with and without '{fam.prefix}'): "
                        f"{', '.join(duplicates[:5])}; re-save it with transformers' save_pretrained")
    return out


def hf_to_flax(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "checkpoint"
) -> tuple[dict, bool, list[str]]:
    """Hugging Face state dict -> (Flax params, has_mlm_head, ignored tensor names).

    ``state`` maps HF names (with or without the base-model prefix) to arrays in PyTorch layout.
    Accepts BertForMaskedLM / BertModel / BertForPreTraining and DistilBertForMaskedLM /
    DistilBertModel tensors. A checkpoint without any MLM head tensor gives ``has_mlm_head=False``
    and no ``mlm_head`` subtree (the caller decides what to put there). Missing or unexpected
    tensors and shape mismatches raise ONE ``UserError`` listing all of them.
    """
    fam = family(cfg)
    state = normalize_names(state, cfg)
    heads = cfg.heads
    present_head = [n for n in head_names(cfg) if n in state]
    has_head = bool(present_head) or not fam.head  # GPT-2's head is the tied projection alone
    rows = _table(cfg, with_head=has_head)
    known = {name for _, name, _, _, _ in rows}

    missing = [name for name in known if name not in state]
    mismatched = [
        f"{name} {tuple(state[name].shape)} != {shape}"
        for _, name, _, shape, _ in rows if name in state and tuple(state[name].shape) != shape
    ]
    ignored, unexpected = [], []
    tied_names = {fam.tied, fam.tied_bias} - {None}
    for name in state:
        if name in known:
            continue
        if name in tied_names or any(re.fullmatch(p, name) for p in fam.ignorable):
            ignored.append(name)
        else:
            unexpected.append(name)
    problems = []
    if missing:
        problems.append(_listing("missing", sorted(missing)))
    if unexpected:
        problems.append(_listing("unexpected", sorted(unexpected)))
    if mismatched:
        problems.append(_listing("wrong shape", mismatched))
    if problems:
        raise UserError(f"{source}: tensors do not match a {fam.kind} with this config.json: "
                        + "; ".join(problems) + "; check that config.json belongs to these weights")

    # A decoder weight stored explicitly must be the word embeddings: the Flax head is always tied.
    word = state[fam.embeddings[0][1]]  # the word embeddings
    if fam.tied in state and not np.array_equal(np.asarray(state[fam.tied]), np.asarray(word)):
        raise UserError(f"{source}: {fam.tied} differs from the word embeddings (untied output layer), "
                        "which jaxdistil does not support; use a checkpoint with tie_word_embeddings=true")
    if fam.tied_bias and fam.tied_bias in state and has_head and not np.array_equal(
            np.asarray(state[fam.tied_bias]), np.asarray(state[fam.bias_name])):
        raise UserError(f"{source}: {fam.tied_bias} differs from {fam.bias_name}; "
                        "re-save the model with transformers so that the two are tied")

    params: dict = {}
    stacked: dict[str, list] = {}
    for path, name, kind, _, layer in rows:
        value = np.ascontiguousarray(_to_flax(np.asarray(state[name]), kind, heads))
        if layer is None:
            _set(params, path, value)
        else:
            stacked.setdefault(path, []).append(value)
    for path, values in stacked.items():
        _set(params, path, np.stack(values, axis=0))
    return params, has_head, sorted(ignored)


# ---------------------------------------------------------------------------------------------
# Flax -> Hugging Face


def _flax_shape(kind: str, hf_shape: tuple[int, ...], heads: int) -> tuple[int, ...]:
    kind, _ = _part(kind)
    if kind == CONV_HEADS_OUT:  # [N*H, D] -> [N, H, D]
        return (heads, hf_shape[0] // heads, hf_shape[1])
    if kind == QKV_IN:  # [D, 3D] -> [D, N, H]
        return (hf_shape[0], heads, hf_shape[1] // 3 // heads)
    if kind == QKV_BIAS:  # [3D] -> [N, H]
        return (heads, hf_shape[0] // 3 // heads)
    if kind in (COPY,):
        return hf_shape
    if kind == LINEAR:
        return hf_shape[::-1]
    if kind == HEADS_IN:  # [N*H, D] -> [D, N, H]
        return (hf_shape[1], heads, hf_shape[0] // heads)
    if kind == HEADS_BIAS:
        return (heads, hf_shape[0] // heads)
    if kind == HEADS_OUT:  # [D, N*H] -> [N, H, D]
        return (heads, hf_shape[1] // heads, hf_shape[0])
    raise AssertionError(kind)


def flax_shapes(cfg: ModelConfig, with_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Flax path -> parameter shape for a config (layer rows carry the leading ``layers`` axis)."""
    out = {}
    for path, _, kind, hf_shape, layer in _table(cfg, with_head):
        shape = _flax_shape(kind, hf_shape, cfg.heads)
        out[path] = shape if layer is None else (cfg.layers, *shape)
    return out


def check_flax_params(params: Mapping[str, Any], cfg: ModelConfig, with_head: bool = True,
                      source: str = "params") -> None:
    """Raises one ``UserError`` listing missing, unexpected and wrongly shaped Flax parameters."""
    wanted = flax_shapes(cfg, with_head)
    have = {path: tuple(np.shape(_get(params, path))) for path in _leaf_paths(params)}
    if not with_head:  # a head may be present; it is simply not written
        have = {p: s for p, s in have.items() if not p.startswith("mlm_head/")}
    problems = []
    missing = sorted(set(wanted) - set(have))
    unexpected = sorted(set(have) - set(wanted))
    wrong = sorted(f"{p} {have[p]} != {wanted[p]}" for p in set(wanted) & set(have) if have[p] != wanted[p])
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected:
        problems.append(_listing("unexpected", unexpected))
    if wrong:
        problems.append(_listing("wrong shape", wrong))
    if problems:
        raise UserError(f"{source}: parameters do not match the model config: " + "; ".join(problems)
                        + "; use the params together with the config.json they were trained with")


def flax_to_hf(params: Mapping[str, Any], cfg: ModelConfig, with_head: bool = True,
               dtype: Any = None, prefixed: bool | None = None) -> dict[str, np.ndarray]:
    """Flax params -> Hugging Face state dict with full ``*ForMaskedLM`` names (PyTorch layout).

    The tied decoder weight is left out (transformers ties it on load), as ``save_pretrained``
    does. ``with_head=False`` writes only the encoder, under bare ``BertModel``/``DistilBertModel``
    names. ``dtype`` (numpy dtype, e.g. ``ml_dtypes.bfloat16``) casts every tensor; None keeps it.
    ``prefixed`` (default: ``with_head``) writes the encoder under the base-model prefix, as a model
    with a head does (``with_head=False, prefixed=True``: the encoder of a sequence classifier).
    Raises one ``UserError`` listing missing, unexpected or wrongly shaped parameters.
    """
    check_flax_params(params, cfg, with_head)
    fam = family(cfg)
    prefixed = with_head if prefixed is None else prefixed
    out: dict[str, np.ndarray] = {}
    fused: dict[str, list[tuple[int, np.ndarray]]] = {}
    for path, name, kind, _, layer in _table(cfg, with_head):
        value = np.asarray(_get(params, path))
        tensor = _to_hf(value if layer is None else value[layer], kind)
        if dtype is not None:
            tensor = tensor.astype(dtype)
        full = name if (path.startswith("mlm_head/") or not prefixed) else fam.prefix + name
        part = _part(kind)[1]
        if part is None:
            out[full] = np.ascontiguousarray(tensor)
        else:
            fused.setdefault(full, []).append((part, tensor))
    for full, parts in fused.items():  # GPT-2's c_attn: q, k, v side by side on the last axis
        out[full] = np.ascontiguousarray(np.concatenate([t for _, t in sorted(parts, key=lambda p: p[0])], axis=-1))
    return out


# ---------------------------------------------------------------------------------------------
# Sequence-classification heads


def _classifier_rows(cfg: ModelConfig, num_labels: int):
    dims = {**_dims(cfg), "L": num_labels}
    return [(path, name, kind, tuple(dims[s] for s in shape), prefixed)
            for path, name, kind, shape, prefixed in _CLASSIFIER_HEADS[family_name(cfg)]]


def classifier_architecture(cfg: ModelConfig) -> str:
    """``BertForSequenceClassification``, ... : the transformers class of ``cfg``'s classifier."""
    return CLASSIFIER_ARCHITECTURES[family_name(cfg)]


def split_classifier(state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "checkpoint",
                     num_labels: int | None = None) -> tuple[dict[str, np.ndarray], dict, int]:
    """A ``*ForSequenceClassification`` state dict -> (the encoder's tensors, the head's Flax params,
    its number of labels). Missing head tensors or wrong shapes raise one ``UserError``."""
    state = normalize_names(state, cfg)
    head_rows = _CLASSIFIER_HEADS[family_name(cfg)]
    names = [name for _, name, *_ in head_rows]
    output = next(name for _, name, _, shape, _ in head_rows if shape == "LD")  # [labels, D]
    if output not in state:
        raise UserError(f"{source}: no {output}: not a {classifier_architecture(cfg)} checkpoint; "
                        "fine-tune the model with `jaxdistil finetune` instead")
    labels = int(state[output].shape[0]) if num_labels is None else num_labels
    rows = _classifier_rows(cfg, labels)
    missing = [name for _, name, _, _, _ in rows if name not in state]
    wrong = [f"{name} {tuple(state[name].shape)} != {shape}" for _, name, _, shape, _ in rows
             if name in state and tuple(state[name].shape) != shape]
    if missing or wrong:
        problems = ([_listing("missing", missing)] if missing else []) + ([_listing("wrong shape", wrong)] if wrong else [])
        raise UserError(f"{source}: the classification head does not match config.json: " + "; ".join(problems))
    head: dict = {}
    for path, name, kind, _, _ in rows:
        _set(head, path, _to_flax(np.asarray(state[name]), kind, cfg.heads))
    rest = {k: v for k, v in state.items() if k not in names}
    return rest, head, labels


def classifier_to_hf(params: Mapping[str, Any], cfg: ModelConfig, num_labels: int,
                     dtype: Any = None) -> dict[str, np.ndarray]:
    """A sequence classifier's Flax params (encoder + head) -> the full HF state dict of its
    ``*ForSequenceClassification`` (``classifier_architecture``)."""
    encoder = {k: params[k] for k in ("embeddings", "encoder")}
    out = flax_to_hf(encoder, cfg, with_head=False, dtype=dtype, prefixed=True)
    prefix = family(cfg).prefix
    for path, name, kind, shape, prefixed in _classifier_rows(cfg, num_labels):
        tensor = _to_hf(np.asarray(_get(params, path)), kind)
        if tuple(tensor.shape) != shape:
            raise UserError(f"classifier parameter {path} has shape {tuple(tensor.shape)}, expected {shape}")
        if dtype is not None:
            tensor = tensor.astype(dtype)
        out[prefix + name if prefixed else name] = np.ascontiguousarray(tensor)
    return out


def expected_hf_names(cfg: ModelConfig, with_head: bool = True) -> list[str]:
    """Full HF names ``flax_to_hf`` writes for a config (sorted)."""
    fam = family(cfg)
    return sorted({name if (path.startswith("mlm_head/") or not with_head) else fam.prefix + name
                   for path, name, *_ in _table(cfg, with_head)})


__all__ = [
    "CLASSIFIER_ARCHITECTURES",
    "check_flax_params",
    "classifier_architecture",
    "classifier_to_hf",
    "expected_hf_names",
    "flax_shapes",
    "flax_to_hf",
    "head_names",
    "hf_to_flax",
    "normalize_names",
    "split_classifier",
]
