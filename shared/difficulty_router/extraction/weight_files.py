"""Read safetensors weights one tensor at a time with plain reads, to keep a load's peak memory low.

``from_pretrained`` maps the weights file into memory. Pages of a mapping count in the process's
resident set once touched, and two loads touch them all: converting float32 weights to bfloat16
at load (the float32 copy and the bf16 one are resident together: a 1.3 GB peak for SmolLM2-135M,
whose weights are 0.5 GB) and quantising the linear layers to int8 (every float32 weight is read).
Plain reads go through the page cache, which is not the process's memory. So:

- :func:`write_dtype_copy` writes the weights once in the path's dtype, tensor by tensor; later
  loads map that file and touch only the blocks the read-out runs;
- :func:`read_tensor` hands the int8 path one float32 weight at a time to quantise.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

WEIGHTS_FILE = "model.safetensors"
_NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}
_TORCH = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (name -> dtype, shape, data_offsets) and where the data starts."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensor(path: Path, name: str, header: dict[str, Any], start: int) -> torch.Tensor:
    """One tensor of a safetensors file, read (not mapped) into fresh memory."""
    entry = header[name]
    begin, end = entry["data_offsets"]
    if entry["dtype"] == "BF16":
        raw = np.fromfile(path, dtype=np.int16, count=(end - begin) // 2, offset=start + begin)
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(entry["shape"])
    if entry["dtype"] not in _NUMPY:
        raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which this reader does not handle")
    dtype = _NUMPY[entry["dtype"]]
    count = (end - begin) // np.dtype(dtype).itemsize
    return torch.from_numpy(np.fromfile(path, dtype=dtype, count=count, offset=start + begin)).reshape(entry["shape"])


def write_dtype_copy(source: Path, target: Path, dtype: torch.dtype) -> None:
    """A copy of the model directory ``source`` whose floating-point weights are in ``dtype``.

    Written tensor by tensor into a temporary directory renamed into place, so a concurrent
    reader sees the whole copy or none; the float32 weights are never all in memory at once.
    """
    from safetensors.torch import save_file

    if dtype not in _TORCH:
        raise ValueError(f"no weights copy for {dtype}; expected one of {sorted(map(str, _TORCH))}")
    weights = source / WEIGHTS_FILE
    header, start = read_header(weights)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.name != WEIGHTS_FILE:
            shutil.copy2(item, tmp / item.name)
    tensors = {}
    for name in header:
        tensor = read_tensor(weights, name, header, start)
        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    del tensors
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)


def block_weights_from_file(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> Callable[[str], dict | None] | None:
    """For :func:`~.numerics.quantise_int8`: a linear's float weights by its name within ``blocks``, read
    from the single weights file ``model`` was loaded from; None where there is no such file (sharded
    or hub weights), and then the module's own weights are quantised."""
    weights = Path(str(getattr(model, "name_or_path", "") or "")) / WEIGHTS_FILE
    prefix = next((name for name, module in model.named_modules() if module is blocks), None)
    if prefix is None or not weights.is_file():
        return None
    header, start = read_header(weights)

    def read(name: str) -> dict | None:
        names = {part: f"{prefix}.{name}.{part}" for part in ("weight", "bias")}
        if names["weight"] not in header or header[names["weight"]]["dtype"] != "F32":
            return None
        return {part: read_tensor(weights, key, header, start) for part, key in names.items() if key in header}

    return read
