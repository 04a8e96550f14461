"""``difficulty-router report LOG``: what a decision log (shadow mode) says routing would have done.

Per model: the share of calls the router would have sent there and the share actually served. Predicted
savings: the router's predicted cost of its own choices against the predicted cost of the model that
served (the default, in shadow mode), from the costs each decision recorded for every model; the mean
P(success) of both says what the saving would cost in expected accuracy. A plot (matplotlib) shows the
would-be share per model over time and the cumulative predicted saving.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.routing.decision_log import read_log


def summarise(records: Sequence[dict]) -> dict[str, Any]:
    """Shares, predicted costs and expected success of a log's records."""
    if not records:
        raise ValueError("the decision log holds no records")
    chosen = Counter(str(r["chosen"]) for r in records)
    served = Counter(str(r["served_by"]) for r in records if r.get("served_by"))
    models = sorted(set(chosen) | set(served))
    routed_cost = baseline_cost = 0.0
    routed_p, baseline_p, priced = [], [], 0
    for r in records:
        per_model = (r.get("predicted_cost") or {}).get("per_model") or {}
        probabilities = r.get("probabilities") or {}
        base = r.get("served_by")
        if base in per_model and r["chosen"] in per_model:
            routed_cost += float(per_model[r["chosen"]])
            baseline_cost += float(per_model[base])
            priced += 1
        if base in probabilities and r["chosen"] in probabilities:
            routed_p.append(float(probabilities[r["chosen"]]))
            baseline_p.append(float(probabilities[base]))
    sampled = [r for r in records if (r.get("shadow") or {}).get("sampled")]
    labelled = [r for r in sampled if "alternative_answer" in (r.get("shadow") or {})]
    n = len(records)
    return {
        "records": n,
        "shadow": sum(1 for r in records if r.get("shadow")),
        "would_be_share": {m: chosen.get(m, 0) / n for m in models},
        "served_share": {m: served.get(m, 0) / n for m in models},
        "priced": priced,
        "predicted_cost_routed": routed_cost,
        "predicted_cost_served": baseline_cost,
        "predicted_saving": 1 - routed_cost / baseline_cost if baseline_cost > 0 else None,
        "mean_p_success_routed": float(np.mean(routed_p)) if routed_p else None,
        "mean_p_success_served": float(np.mean(baseline_p)) if baseline_p else None,
        "sampled": len(sampled),
        "labels_collected": len(labelled),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['records']} decisions ({summary['shadow']} in shadow mode)", "", "model  would-be  served"]
    for model, share in summary["would_be_share"].items():
        lines.append(f"{model}  {100 * share:.1f}%  {100 * summary['served_share'].get(model, 0):.1f}%")
    if summary["predicted_saving"] is not None:
        lines += [
            "",
            f"predicted cost of the router's choices: {summary['predicted_cost_routed']:.6g} "
            f"vs {summary['predicted_cost_served']:.6g} for the models that served "
            f"({summary['priced']} priced decisions): saving {100 * summary['predicted_saving']:.1f}%",
        ]
    if summary["mean_p_success_routed"] is not None:
        lines.append(
            f"mean predicted P(success): {summary['mean_p_success_routed']:.3f} routed "
            f"vs {summary['mean_p_success_served']:.3f} served"
        )
    lines.append(f"sampled to the alternative: {summary['sampled']} ({summary['labels_collected']} answers collected)")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: str | os.PathLike, bins: int = 20) -> Path:
    """Would-be share per model over time (equal-count bins, in log order) and the cumulative predicted saving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.array([float(r["ts"]) for r in records])
    ts = ts - ts.min()
    models = sorted({r["chosen"] for r in records})
    edges = np.array_split(np.arange(len(records)), min(bins, len(records)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    centres = [ts[e].mean() for e in edges]
    for m in models:
        top.plot(centres, [np.mean([records[i]["chosen"] == m for i in e]) for e in edges], marker="o", label=m)
    top.set_ylabel("would-be share")
    top.legend(fontsize=7)
    routed, served = [], []
    for r in records:
        per_model = (r.get("predicted_cost") or {}).get("per_model") or {}
        base = r.get("served_by")
        ok = base in per_model and r["chosen"] in per_model
        routed.append(float(per_model[r["chosen"]]) if ok else 0.0)
        served.append(float(per_model[base]) if ok else 0.0)
    cum_served = np.cumsum(served)
    saving = np.divide(cum_served - np.cumsum(routed), cum_served, out=np.zeros(len(ts)), where=cum_served > 0)
    bottom.plot(ts, 100 * saving)
    bottom.set_ylabel("cumulative predicted saving (%)")
    bottom.set_xlabel("seconds since the first decision")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    records = list(read_log(args.log))
    print(format_summary(summarise(records)))
    if args.plot:
        print(f"wrote {plot(records, args.plot)}")
    return 0


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="summarise a decision log (shadow mode): would-be shares, predicted savings")
    p.add_argument("log", help="the decision log (JSON Lines, from serve --decision-log or DecisionLog)")
    p.add_argument("--plot", metavar="PNG", help="write the would-be share and saving over time here")
    p.set_defaults(func=cmd_report)
