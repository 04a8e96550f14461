"""Held-out evaluation of a router next to the surface baselines and the oracle."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.core.metrics import apgr_cpt, pool_summary
from difficulty_router.data.outcomes import Outcomes
from difficulty_router.evaluation.baselines import BASELINES, baseline_proba
from difficulty_router.learning.families import routing_quality
from difficulty_router.learning.policies import Policy, sweep
from difficulty_router.routing.calibration import realised_costs
from difficulty_router.routing.router import DifficultyRouter


def _two_model_score(proba: np.ndarray, kind: str, weak: int, strong: int) -> np.ndarray:
    """The ranking a two-model policy implies: utility sends high P(strong)-P(weak) up, threshold low P(weak)."""
    return proba[:, strong] - proba[:, weak] if kind == "utility" else 1.0 - proba[:, weak]


def evaluate_proba(
    proba, outcomes: Outcomes, costs, capability, kind: str | Policy, seed: int = 0, eligible: np.ndarray | None = None
) -> dict:
    """Curve and headline numbers for one predictor of P(success).

    ``kind`` is a policy kind, or a :class:`Policy` whose margin the sweep keeps; ``eligible``
    masks models a router does not route to (dominated ones it dropped in training).
    """
    policy = kind if isinstance(kind, Policy) else Policy(kind)
    kind = policy.kind
    realised = realised_costs(outcomes, costs)
    points = sweep(policy, proba, costs, capability, outcomes.scores, realised, eligible)
    model_costs = realised.mean(axis=0)
    out = pool_summary(points, outcomes.scores, model_costs, outcomes.models)
    out["curve"] = points
    if len(outcomes.models) == 2:
        weak, strong = np.argsort(capability)
        try:
            out.update(
                apgr_cpt(
                    _two_model_score(proba, kind, weak, strong),
                    outcomes.scores[:, weak],
                    outcomes.scores[:, strong],
                    seed,
                )
            )
        except ValueError:
            out.update({"apgr": None, "cpt50": None, "cpt80": None})
    return out


def bootstrap_quality(
    predictions: dict[str, np.ndarray], outcomes: Outcomes, costs, capability, n_boot: int = 200, seed: int = 0
) -> dict[str, list[float]]:
    """95% percentile intervals of each predictor's routing quality over bootstrap resamples of the rows.

    Every predictor is scored on the same resamples, so intervals of differences are paired too
    (keys ``a - b`` for each pair asked for via ``predictions`` order: the first minus each other).
    """
    rng = np.random.default_rng(seed)
    names = list(predictions)
    draws: dict[str, list] = {name: [] for name in names}
    n = len(outcomes)
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        for name in names:
            draws[name].append(
                routing_quality(predictions[name][rows], outcomes.scores[rows], costs[rows], capability, seed)
            )
    out = {name: np.percentile(v, [2.5, 97.5]).tolist() for name, v in draws.items()}
    first = np.array(draws[names[0]])
    for name in names[1:]:
        out[f"{names[0]} - {name}"] = np.percentile(first - np.array(draws[name]), [2.5, 97.5]).tolist()
    return out


def evaluate_router(
    router: DifficultyRouter,
    outcomes: Outcomes,
    *,
    train: Outcomes | None = None,
    seed: int = 0,
    proba: np.ndarray | None = None,
    progress: bool | None = None,
    features: np.ndarray | None = None,
    train_features: np.ndarray | None = None,
    n_boot: int = 200,
) -> dict:
    """Everything ``difficulty-router evaluate --json`` prints.

    The router's own policy kind decides; the other policy is reported too, under ``policies``.
    ``features``/``train_features`` are the router's read-out of the rows (extracted when not
    given); the kNN baseline votes over them. ``intervals`` holds 95% bootstrap intervals of
    the routing quality (APGR for two models, frontier AUC otherwise) of the router and each
    baseline on these rows, and of the router's margin over the best baseline.
    """
    router.pool.check_against(outcomes.models, "the evaluation data")
    outcomes = outcomes.select_models(router.models)
    if features is None:
        features = router.features(outcomes.queries, progress).features
    if proba is None:
        proba = router.proba_from(outcomes.queries, features)
    if train is not None and train_features is None:
        train_features = router.features(train.queries, progress).features
    costs = router.estimated_costs(outcomes)
    capability = router.capability
    report: dict[str, Any] = {
        "n": len(outcomes),
        "models": list(router.models),
        "policy": router.policy.kind,
        "operating_point": router.policy.to_dict(),
    }
    eligible = router.eligibility(len(outcomes), None)
    policies = {
        kind: evaluate_proba(
            proba,
            outcomes,
            costs,
            capability,
            Policy(kind, margin=router.utility_margin if kind == "utility" else 0.0),
            seed,
            eligible,
        )
        for kind in ("utility", "threshold")
    }
    report.update(policies[router.policy.kind])
    report["policies"] = {
        k: {key: v for key, v in p.items() if key not in ("curve", "pgr_curve")} for k, p in policies.items()
    }
    # the policy's current setting on these rows
    chosen = router.policy.choose(proba, costs, capability, eligible)
    rows = np.arange(len(outcomes))
    report["at_operating_point"] = {
        "accuracy": float(outcomes.scores[rows, chosen].mean()),
        "cost": float(realised_costs(outcomes, costs)[rows, chosen].mean()),
        "share": {m: int((chosen == j).sum()) for j, m in enumerate(router.models)},
    }
    report["single_models"] = {
        m: {
            "accuracy": float(outcomes.scores[:, j].mean()),
            "cost": float(realised_costs(outcomes, costs)[:, j].mean()),
        }
        for j, m in enumerate(router.models)
    }
    report["baselines"] = {}
    predictions = {}
    for name in BASELINES:
        predictions[name] = baseline_proba(
            name,
            outcomes,
            train=train.select_models(router.models) if train is not None else None,
            seed=seed,
            train_features=train_features,
            test_features=features,
        )
        report["baselines"][name] = evaluate_proba(
            predictions[name], outcomes, costs, capability, router.policy.kind, seed, eligible
        )
    metric = "apgr" if report.get("apgr") is not None else "auc"
    contenders = [b for b in BASELINES if b not in ("random", "oracle")]
    best = max(
        contenders,
        key=lambda b: report["baselines"][b][metric] if report["baselines"][b].get(metric) is not None else -1,
    )
    if n_boot:
        intervals = bootstrap_quality(
            {"router": proba, **{b: predictions[b] for b in contenders}},
            outcomes,
            costs,
            capability,
            n_boot=n_boot,
            seed=seed,
        )
        report["intervals"] = {"metric": metric, "n_boot": n_boot, **intervals}
        report["margin"] = {
            "metric": metric,
            "baseline": best,
            "difference": report[metric] - report["baselines"][best][metric]
            if report.get(metric) is not None
            else None,
            "interval": intervals[f"router - {best}"],
        }
    return report


HEADLINE = ("auc", "apgr", "cpt50", "cpt80", "cost_to_match_best", "oracle_gap_closed", "best_accuracy")


def _fmt(value, pct=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def report_table(report: dict) -> str:
    """A plain-text table of the router and the baselines on the same rows."""
    keys = [k for k in HEADLINE if k in report]
    pct = {"cpt50", "cpt80", "cost_to_match_best"}
    header = ["predictor", *keys]
    rows = [["router (" + report["policy"] + ")"] + [_fmt(report.get(k), k in pct) for k in keys]]
    for name, base in report["baselines"].items():
        rows.append([name] + [_fmt(base.get(k), k in pct) for k in keys])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    singles = ", ".join(
        f"{m}: acc {v['accuracy']:.3f}, cost {v['cost']:.3g}" for m, v in report["single_models"].items()
    )
    op = report["at_operating_point"]
    lines.append("")
    lines.append(f"n = {report['n']}; single models: {singles}")
    if "margin" in report and report["margin"]["difference"] is not None:
        margin, metric = report["margin"], report["margin"]["metric"].upper()
        lo, hi = margin["interval"]
        lines.append(
            f"95% bootstrap intervals ({report['intervals']['n_boot']} resamples of these rows), {metric}: "
            + ", ".join(
                f"{k} [{v[0]:.3f}, {v[1]:.3f}]"
                for k, v in report["intervals"].items()
                if isinstance(v, list) and " - " not in k
            )
        )
        verdict = "beats" if lo > 0 else "loses to" if hi < 0 else "is not distinguishable from"
        lines.append(
            f"router {verdict} the best baseline ({margin['baseline']}) on these rows: "
            f"{metric} margin {margin['difference']:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}]"
        )
    lines.append(
        f"at the saved operating point ({report['operating_point']['kind']} "
        f"{report['operating_point']['value']:.4g}): accuracy {op['accuracy']:.3f}, cost {op['cost']:.3g}, "
        f"calls {op['share']}"
    )
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path, title: str = "") -> Path:
    """Cost-accuracy curves of the router and baselines (and PGR vs strong calls for two models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = report.get("apgr") is not None
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12 if two else 6.5, 4.8))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    series = [("router", report), *list(report["baselines"].items())]
    for name, rep in series:
        pts = sorted(rep["curve"], key=lambda p: p["cost"])
        ax.plot(
            [p["cost"] for p in pts],
            [p["accuracy"] for p in pts],
            marker=".",
            ms=3,
            lw=2.2 if name == "router" else 1.1,
            label=f"{name} (auc {rep['auc']:.3f})",
        )
    for m, v in report["single_models"].items():
        ax.scatter([v["cost"]], [v["accuracy"]], marker="*", s=120, zorder=5)
        ax.annotate(
            m.split("/")[-1], (v["cost"], v["accuracy"]), fontsize=7, xytext=(4, -10), textcoords="offset points"
        )
    ax.set_xlabel("mean cost per query")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "cost-accuracy on held-out rows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if two:
        ax = axes[1]
        for name, rep in series:
            frac, pgr = zip(*rep["pgr_curve"], strict=False)
            ax.plot(frac, pgr, lw=2.2 if name == "router" else 1.1, label=f"{name} (APGR {rep['apgr']:.3f})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("strong-model call fraction")
        ax.set_ylabel("PGR")
        ax.set_title("performance gap recovered")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
