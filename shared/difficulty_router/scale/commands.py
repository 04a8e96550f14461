"""The ``--engine ray`` options of ``difficulty-router extract`` and ``serve``, kept here so the main CLI
only registers them."""

from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help=f"'ray': {what} on a Ray cluster (needs pip install 'difficulty-router[ray]')",
    )
    p.add_argument(
        "--ray-address", help="an existing Ray cluster ('auto' for one started with `ray start`); default: start one"
    )


def add_extract_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, "read with Ray Data, extract with a pool of actors, write Parquet shards to --output")
    p.add_argument("--workers", type=int, help="extractor actors (default: one per CPU, or per GPU when there are)")
    p.add_argument("--rows-per-shard", type=int, default=256, help="prompts per batch and Parquet shard")
    p.add_argument("--feature-cache", help="feature cache directory the workers read and write (default: the user's)")
    p.add_argument("--no-feature-cache", action="store_true", help="workers neither read nor write cached features")


def run_extract(args, layers) -> int:
    from ..model_store import cache_root
    from .ray_extract import extract_distributed

    cache = None if args.no_feature_cache else (args.feature_cache or cache_root() / "features")
    shards = extract_distributed(
        args.input,
        args.output,
        model=args.model,
        gguf_file=args.gguf_file,
        layers=layers or 0.5,
        pooling=args.pooling,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        rows_per_shard=args.rows_per_shard,
        feature_cache=cache,
        address=args.ray_address,
        progress=bool(args.progress),
    )
    m = shards.manifest
    print(
        f"{m['rows']} rows -> {len(m['shards'])} Parquet shards in {args.output} (layers {m['layers']}, pooling "
        f"{'+'.join(m['pooling'])}, width {m['width']}) from {m['model_id']} on {m['workers']} workers "
        f"({m['device']}/{m['dtype']}) in {m['seconds']:.1f} s ({m['rows'] / m['seconds']:.1f} rows/s)"
    )
    return 0
