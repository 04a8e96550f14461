"""What several commands of the command line share: reading query and outcome files, the read-out layers and
feature cache from their options, loading a saved or zero-label router, the training summary, and the options
that more than one command offers (--progress, --extractor, --feature-cache, --pretrained). It exists so that
each command module imports these from here and never from another command module: the commands stay
independent of one another and ``cli.main`` only assembles them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from difficulty_router.extraction.model_store import cache_root


def parse_layers(values: list[str] | None):
    """``--layers`` values (each possibly comma-separated) as hidden-state indexes (int) or depth fractions."""
    if values is None:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(float(part) if "." in part else int(part))
    return out


def feature_cache_from_args(args):
    """The feature cache --feature-cache names (default under the cache root), or None with --no-feature-cache."""
    from difficulty_router.extraction.feature_cache import FeatureCache

    if getattr(args, "no_feature_cache", False):
        return None
    return FeatureCache(args.feature_cache or cache_root() / "features")


def read_queries(path: Path) -> list:
    """One query per line: a JSON string, an object with prompt/messages/query, or (for .txt) raw text."""
    from difficulty_router.data.queries import query_from_json_line

    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    queries = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                queries.append(line.rstrip("\n"))
                continue
            queries.append(query_from_json_line(line, f"{path}, line {lineno}"))
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return queries


def load_outcome_rows(path: str, limit: int | None = None, seed: int = 0):
    """An outcomes file, or a seeded random subset of ``limit`` of its rows (kept in file order)."""
    from difficulty_router.data.outcomes import load_outcomes

    outcomes = load_outcomes(path)
    if limit and limit < len(outcomes):
        keep = np.sort(np.random.default_rng(seed).choice(len(outcomes), limit, replace=False))
        outcomes = outcomes.subset(keep)
    return outcomes


def extractor_choice(args) -> dict:
    """What ``DifficultyRouter.load`` may load as the extractor: the manifest's choice is trusted only for
    the embedded models; a hub id or path must be named with --extractor."""
    return {"model": args.extractor, "allow_other_extractor": args.allow_other_extractor}


def pool_from_spec(spec: str):
    """A pool file (JSON/YAML, models listed cheapest first) or comma-separated model names, cheapest first."""
    from difficulty_router.core.pool import ModelPool

    if Path(spec).is_file():
        return ModelPool.load(spec)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) < 2 or Path(spec).suffix in (".json", ".yaml", ".yml"):
        raise ValueError(
            f"--pretrained {spec!r}: expected a pool file or at least two comma-separated model names, cheapest first"
        )
    return names


def load_router_or_pretrained(args, directory: str | None):
    """``--router DIR`` loads a saved router; ``--pretrained POOL`` builds the zero-label one (one of the two)."""
    from difficulty_router.routing.router import DifficultyRouter

    spec = getattr(args, "pretrained", None)
    if (spec is None) == (directory is None):
        raise ValueError("give --router DIR or --pretrained POOL (a pool file or cheap,...,strong model names)")
    if spec is not None:
        return DifficultyRouter.pretrained(pool_from_spec(spec), transfer_guard=transfer_guard_choice(args))
    if getattr(args, "transfer_guard", False):
        raise ValueError(
            "--transfer-guard goes with --pretrained; a saved router carries the guard it was saved with (if any)"
        )
    assert directory is not None  # one of the two, checked above
    return DifficultyRouter.load(directory, **extractor_choice(args))


def print_training(router) -> None:
    """What training chose and measured: read-out, per-model CV AUROC, feature family, dropped models, policy."""
    info = router.info
    print(
        f"read-out: layer {list(router.layers)}, pooling {'+'.join(router.pooling)} "
        f"(of {router.extractor.n_layers} layers in {router.extractor.model_id})"
    )
    if info.get("readout_sweep"):
        best = sorted(info["readout_sweep"], key=lambda r: -np.nan_to_num(r["cv_auroc"], nan=-1))[:5]
        print(
            "read-out sweep (mean CV AUROC, top 5): "
            + ", ".join(f"L{r['layer']}/{r['pooling']} {r['cv_auroc']:.3f}" for r in best)
        )
    print("cross-validated AUROC of the activation probe per model:")
    for m, a in info["cv_auroc"].items():
        print(f"  {m}: {a:.3f}" if a == a else f"  {m}: - (always right or always wrong in training)")
    if info.get("families"):
        metric = "APGR" if len(router.models) == 2 else "frontier AUC"
        print(
            f"feature families by cross-validated routing quality ({metric} on out-of-fold predictions): "
            + ", ".join(
                f"{r['family']} {r['cv_routing_quality']:.3f}"
                if r["cv_routing_quality"] is not None
                else f"{r['family']} skipped ({r['skipped']})"
                for r in info["families"]
            )
            + f" -> {router.family}"
        )
    for m, reason in router.dropped.items():
        print(f"not routed to {m}: {reason}")
    if router.utility_margin:
        print(
            f"utility margin {router.utility_margin:g}: another model must beat the most capable one by this much "
            "(measured on out-of-fold predictions)"
        )
    point = info["default_operating_point"]
    print(
        f"default operating point ({router.policy.kind} {router.policy.parameter}={router.policy.value:.4g}): "
        f"out-of-fold accuracy {point['accuracy']:.3f} at mean cost {point['cost']:.4g}"
    )
    risk = info.get("risk_controlled_operating_point")
    if risk and "upper_bound" in risk:
        setting = risk["policy"]
        which = (
            "always the most capable model, nothing cheaper certified"
            if risk["fallback"]
            else f"{setting['kind']} {'tau' if setting['kind'] == 'threshold' else 'lambda'}={setting['value']:.4g}"
        )
        share = "" if risk["cost_share_of_best"] is None else f", {100 * risk['cost_share_of_best']:.0f}% of its cost"
        print(
            f"risk-controlled point ({which}): drop from the best model <= {risk['epsilon']:g} with probability "
            f">= {1 - risk['delta']:g}; upper bound {risk['upper_bound']:+.4f}, realised drop "
            f"{risk['realised_drop']:+.4f} on {risk['n']} out-of-fold rows{share}"
        )
    elif risk:
        print(f"risk-controlled point: not computed ({risk['skipped']})")


def progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: on for long work)",
    )


def extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--extractor",
        help="load this extractor (short name, path or hub id); needed when the router "
        "was saved with a hub id or path, which a router file alone cannot allow",
    )
    p.add_argument(
        "--allow-other-extractor",
        action="store_true",
        help="allow --extractor to differ from the one the router was saved with (its weights "
        "must still hash the same)",
    )


def cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature-cache", help=f"feature cache directory (default {cache_root() / 'features'})")
    p.add_argument("--no-feature-cache", action="store_true", help="do not read or write cached features")


def pretrained_arg(p: argparse.ArgumentParser, *, flag_only: bool) -> None:
    """``--pretrained``: ``serve`` takes it as a flag (the served pool) or a pool; ``route`` always with a pool."""
    if flag_only:
        p.add_argument(
            "--pretrained",
            nargs="?",
            const="",
            help="serve the zero-label router built from the shipped head for --pool (models listed cheapest first)",
        )
    else:
        p.add_argument("--pretrained", metavar="POOL", help="zero-label router: a pool file or cheap,...,strong names")
    transfer_guard_arg(p)


def transfer_guard_arg(p: argparse.ArgumentParser) -> None:
    """``--transfer-guard``: the zero-label router watches unlabelled traffic and falls back to the most capable
    model when the head looks not to transfer (:mod:`difficulty_router.learning.transfer_guard`). Off by default:
    measured leave-one-domain-out it caught none of the domains where the head fails (docs/zero-label.md)."""
    p.add_argument(
        "--transfer-guard",
        action="store_true",
        help="with --pretrained: fall back to the most capable model when traffic looks unlike the head's "
        "training queries (off by default; see docs/zero-label.md for what it does and does not catch)",
    )


def transfer_guard_choice(args) -> bool | None:
    """What ``DifficultyRouter.pretrained(transfer_guard=...)`` gets from ``--transfer-guard``."""
    return True if getattr(args, "transfer_guard", False) else None
