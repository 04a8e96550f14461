"""Reading saved bundles (routers, P(IK) probes) as untrusted input.

A bundle is a JSON manifest plus one safetensors file whose sha256 the manifest records.
Loading must never execute anything (safetensors holds plain arrays, JSON plain values),
and a malformed or edited bundle must fail with a ``ValueError`` that names the file and the
field at fault, never an ``AttributeError``/``KeyError`` from deep inside. The manifest also
names the extractor to load; that name is a hub id or a path chosen by whoever wrote the
file, so :func:`check_extractor_allowed` lets only the embedded models through unless the
caller names the extractor itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_arrays(path: Path, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """Save named arrays as safetensors (int64 for integer arrays, float64 for the rest) and return the
    file's sha256, which the bundle's manifest records so that :func:`load_arrays` can check it."""
    from safetensors.numpy import save_file

    dtypes = {k: np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer) else np.float64 for k, v in arrays.items()}
    save_file({k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in arrays.items()}, str(path), metadata=metadata)
    return sha256_file(path)


def read_manifest(path: Path) -> dict:
    """The manifest as a dict; ValueError when it is not a JSON object."""
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; not a manifest") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "dict": dict,
    "list": list,
    "float": (int, float),
}


def field(obj: dict, key: str, kind: str, where: str, *, optional: bool = False, default: Any = None) -> Any:
    """``obj[key]`` checked against ``kind`` ("str", "int", "bool", "dict", "list", "float", "str|None", ...)."""
    if key not in obj:
        if optional:
            return default
        raise ValueError(f"{where}: the field '{key}' is missing")
    value = obj[key]
    kinds = kind.split("|")
    if value is None and "None" in kinds:
        return value
    ok = any(
        isinstance(value, _TYPES[k]) and not (k in ("int", "float") and isinstance(value, bool))
        for k in kinds
        if k != "None"
    )
    if not ok:
        raise ValueError(f"{where}: the field '{key}' must be {' or '.join(kinds)}, got {type(value).__name__}")
    return value


def check_router_manifest(manifest: dict, where: str, fmt: str) -> None:
    """Every field a router's load reads, with its type; errors name the field."""
    if manifest.get("format") != fmt:
        raise ValueError(f"{where}: format is {str(manifest.get('format'))[:40]!r}, expected {fmt!r}")
    digest = field(manifest, "arrays_sha256", "str", where)
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"{where}: the field 'arrays_sha256' is not a sha256 hex digest")
    extractor = field(manifest, "extractor", "dict", where)
    for key, kind in (("model_id", "str"), ("model_hash", "str"), ("n_layers", "int"), ("hidden_size", "int")):
        field(extractor, key, kind, f"{where}: extractor")
    if not extractor["model_id"].strip():
        raise ValueError(f"{where}: the field 'extractor.model_id' is empty")
    max_tokens = field(extractor, "max_tokens", "int", f"{where}: extractor", optional=True, default=2048)
    if max_tokens < 1:
        raise ValueError(f"{where}: the field 'extractor.max_tokens' must be positive, got {max_tokens}")
    readout = field(manifest, "readout", "dict", where)
    layers = field(readout, "layers", "list", f"{where}: readout")
    pooling = field(readout, "pooling", "list", f"{where}: readout")
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"{where}: the field 'readout.layers' must be a non-empty list of integers")
    if not pooling or not all(isinstance(x, str) for x in pooling):
        raise ValueError(f"{where}: the field 'readout.pooling' must be a non-empty list of strings")
    field(manifest, "pool", "dict", where)
    policy = field(manifest, "policy", "dict", where)
    field(policy, "kind", "str", f"{where}: policy")
    field(policy, "value", "float", f"{where}: policy")
    field(policy, "margin", "float", f"{where}: policy", optional=True)
    field(manifest, "has_difficulty_probe", "bool", where, optional=True)
    field(manifest, "family", "str", where, optional=True)
    field(manifest, "lexical", "dict|None", where, optional=True)
    dropped = field(manifest, "dropped", "dict|None", where, optional=True) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in dropped.items()):
        raise ValueError(f"{where}: the field 'dropped' must map model names to reasons (strings)")
    field(manifest, "info", "dict", where, optional=True)
    field(manifest, "novelty", "dict|None", where, optional=True)
    field(manifest, "transfer_guard", "dict", where, optional=True)


def load_arrays(path: Path, expected_sha256: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of a safetensors file whose sha256 must be ``expected_sha256``."""
    from safetensors import SafetensorError, safe_open

    if sha256_file(path) != expected_sha256:
        raise ValueError(f"{path} does not match the hash in its manifest; the bundle was altered")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
            arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    return arrays, metadata


def check_extractor_allowed(
    named: str, requested: str | None, allow_other: bool, where: str, known: frozenset[str]
) -> str:
    """Which model to load for a bundle whose manifest names ``named``.

    The embedded short names (``known``) load as named: their weights are pinned by the package.
    Any other name is a hub id or a path chosen by the bundle's author, so the caller must name it
    too (``requested == named``). Naming a different model needs ``allow_other`` (a local copy of
    the same weights, say); the weights hash is checked either way.
    """
    if requested is None:
        if named.lower() in known:
            return named
        raise ValueError(
            f"{where} names the extractor {named[:200]!r}, a hub id or path; loading it downloads or "
            f"reads whatever that names, so pass it yourself to allow it (model={named[:200]!r}, "
            f"or --extractor on the command line)"
        )
    if requested != named and not allow_other:
        raise ValueError(
            f"{where} was saved with the extractor {named[:200]!r}, not {requested!r}; pass "
            f"allow_other_extractor=True (--allow-other-extractor) to load another copy of the same "
            f"weights (their hash is still checked)"
        )
    return requested
