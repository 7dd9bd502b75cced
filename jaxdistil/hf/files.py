"""Files of a Hugging Face model directory: weights (safetensors, sharded or not, or PyTorch .bin),
tokenizer files, and writing a directory all-or-nothing.

Nothing here unpickles: safetensors is read directly; ``pytorch_model.bin`` goes through
``torch.load(weights_only=True)`` and only when torch is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxdistil.errors import UserError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# The tokenizer files a run or a model directory may carry; copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")

# safetensors dtype tag -> numpy dtype (bf16 through ml_dtypes, which jax already depends on).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------------------------------------
# Reading weights


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (bf16 as ``ml_dtypes.bfloat16``).

    Parsed directly (8-byte little-endian header length, JSON header, raw little-endian data) because
    safetensors' numpy reader has no bf16; offsets are checked against the file size.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UserError(f"{path}: truncated safetensors file; re-download or re-export it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(f"{path}: corrupt safetensors header; re-download or re-export it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: corrupt safetensors header ({err}); "
                            "re-download or re-export it") from err
        data = np.fromfile(f, dtype=np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}; "
                            "convert the checkpoint to float32/bfloat16/float16")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
        if not 0 <= start <= end <= data.size or end - start != nbytes:
            raise UserError(f"{path}: tensor {name} has bad offsets; the file is corrupt, re-download it")
        out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # lazy: torch is optional and only read here
    except ImportError as err:
        raise UserError(f"{path}: PyTorch .bin weights need torch to read (pip install torch), "
                        "or convert the checkpoint to safetensors") from err
    try:
        with warnings.catch_warnings():  # torch's own warnings would add lines to the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code in the pickle, RuntimeError for a corrupt file
        # torch's message runs over several lines (and suggests weights_only=False, which would run
        # the pickle's code): keep its first line only.
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{path}: torch.load(weights_only=True) refused it ({type(err).__name__}: "
                        f"{first[:200]}); it may hold code rather than only tensors: convert the "
                        "checkpoint to safetensors (save_pretrained(..., safe_serialization=True))") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: not a state dict; save the model with save_pretrained")
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:  # numpy has no bf16: keep the bits
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a HF directory, safetensors first (single file, or the index's shards)."""
    directory = Path(directory)
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (TORCH_WEIGHTS, TORCH_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{directory / index}: not a valid weight index ({err}); "
                                "re-save the model with save_pretrained") from err
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise UserError(f"{directory}: shards listed in {index} are missing: {', '.join(missing)}; "
                                "download the complete model")
            return [directory / s for s in shards]
    raise UserError(f"{directory}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                    f"{TORCH_WEIGHTS} or {TORCH_INDEX}); pass a complete Hugging Face model directory")


def read_state_dict(directory: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a HF model directory (name -> numpy array in PyTorch layout)."""
    state: dict[str, np.ndarray] = {}
    for file in weight_files(directory):
        part = read_safetensors(file) if file.suffix == ".safetensors" else _read_torch_bin(file)
        state.update(part)
    return state


# ---------------------------------------------------------------------------------------------
# Writing weights


def parse_size(size: int | str) -> int:
    """``5GB``, ``500MB``, ``10KB`` or a number of bytes -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise UserError(f"bad size {size!r}; write it like 5GB, 500MB or a number of bytes")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(match.group(1)) * units[match.group(2)])


def write_state_dict(state: Mapping[str, np.ndarray], directory: str | Path,
                     max_shard_size: int | str = "5GB") -> list[str]:
    """Writes ``model.safetensors`` (metadata ``{"format": "pt"}``), or shards
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when the tensors
    exceed ``max_shard_size``. Returns the file names written."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    current = 0
    for name in sorted(state):  # a stable order keeps shard contents reproducible
        nbytes = state[name].nbytes
        if shards[-1] and current + nbytes > limit:
            shards.append({})
            current = 0
        shards[-1][name] = state[name]
        current += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without this tag
    if len(shards) == 1:
        save_file(dict(shards[0]), directory / SAFE_WEIGHTS, metadata=metadata)
        return [SAFE_WEIGHTS]
    names, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), directory / file, metadata=metadata)
        names.append(file)
        weight_map.update({name: file for name in shard})
    index = {
        "metadata": {"total_size": int(sum(a.nbytes for a in state.values())),
                     "total_parameters": int(sum(a.size for a in state.values()))},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFE_INDEX]


# ---------------------------------------------------------------------------------------------
# Tokenizer files and directories


def has_tokenizer(directory: str | Path | None) -> bool:
    if directory is None:
        return False
    directory = Path(directory)
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.txt").is_file()


def copy_tokenizer_files(source: str | Path, target: str | Path) -> list[str]:
    """Copies the known tokenizer files (never weights or config.json) from ``source``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def check_output_dir(output: str | Path, force: bool) -> Path:
    """Refuses an existing non-empty ``output`` unless ``force``; returns it as a Path."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a directory; choose another output path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UserError(f"{output} exists and is not empty; "
                        "choose a new directory or pass --force to replace it")
    return output


def _default_permissions(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside ``output``; on success it replaces ``output``.

    On any error the temporary directory is removed and ``output`` is left as it was, so a failed
    export never leaves a half-written model behind.
    """
    output = check_output_dir(output, force).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if output.exists():
            # Move the old directory aside first so that the swap is two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.rename(output, old / "dir")
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
