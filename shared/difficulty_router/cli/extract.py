"""``difficulty-router extract``: activation features for a file of queries, written to .npz (or, with
``--engine ray``, to Parquet shards by :mod:`difficulty_router.scale`). A module of its own because it is the
one command that exposes the extractor directly, without training or routing around it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from difficulty_router.cli.common import parse_layers, progress_arg, read_queries
from difficulty_router.extraction.model_store import DEFAULT_MODEL


def cmd_extract(args) -> int:
    from difficulty_router.extraction.extractor import ActivationExtractor

    if args.engine == "ray":
        from difficulty_router.scale.commands import run_extract

        return run_extract(args, parse_layers(args.layers))
    queries = read_queries(Path(args.input))
    start = time.perf_counter()
    extractor = ActivationExtractor(
        args.model,
        gguf_file=args.gguf_file,
        layers=parse_layers(args.layers) or 0.5,
        pooling=args.pooling,
        device=args.device,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    loaded = time.perf_counter()
    result = extractor.extract(queries, progress=args.progress)
    done = time.perf_counter()
    np.savez(
        args.output,
        features=result.features,
        layers=np.array(result.layers),
        pooling=np.array(result.pooling),
        n_tokens=result.n_tokens,
        truncated=result.truncated,
        model_id=np.array(result.model_id),
        model_hash=np.array(result.model_hash),
    )
    print(
        f"{len(queries)} queries -> features {result.shape} (layers {list(result.layers)}, pooling "
        f"{'+'.join(result.pooling)}) from {extractor.model_id} on "
        f"{extractor.device}/{str(extractor.dtype).split('.')[-1]}"
    )
    print(
        f"load {loaded - start:.1f} s, extract {done - loaded:.2f} s ({len(queries) / (done - loaded):.1f} queries/s); "
        f"{int(result.truncated.sum())} truncated to {args.max_tokens} tokens; wrote {args.output}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract activation features for queries")
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, model directory, .gguf file or hub id")
    p.add_argument("--gguf-file", help="GGUF file name inside --model when it is a directory")
    p.add_argument("--layers", nargs="+", help="hidden-state indexes or depth fractions, e.g. 15 -1 0.5")
    p.add_argument("--pooling", default="last", choices=["last", "mean", "both"])
    p.add_argument(
        "--input", required=True, help="JSON Lines of queries (strings or objects with prompt/messages), or .txt"
    )
    p.add_argument("--output", required=True, help="output .npz (with --engine ray: a directory of Parquet shards)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    progress_arg(p)
    from difficulty_router.scale.commands import add_extract_args

    add_extract_args(p)
    p.set_defaults(func=cmd_extract)
