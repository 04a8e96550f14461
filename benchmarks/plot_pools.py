"""The many-model pool results as one figure: per pool and predictor, the cost to match the best single model
and the share of the best-to-oracle gap closed, each a mean over splits with its 95% t-interval.

Reads the results ``routing_pools.py`` wrote (``results/pool_<data>_<extractor>.json``) and draws nothing
it did not measure; a pool run with one split has no interval over splits and is left out (its table has a
bootstrap interval instead).

    python benchmarks/plot_pools.py        # -> benchmarks/results/pools.png
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _common import RESULTS
from routing_routellm import interval

POOLS = {"mmlu-pro": "MMLU-Pro 7-model ladder", "mmlu-pro-5": "MMLU-Pro 5 models (27x prices)",
         "llmrouter": "LLMRouter 9 models"}
PANELS = (("cost_to_match_best", "cost to match the best model\n(share of its cost; lower is better)", 100.0, 50.0),
          ("oracle_gap_closed", "best-to-oracle gap closed\n(higher is better)", 1.0, 0.25))  # last: issue 29's target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for key in POOLS:
        path = RESULTS / f"pool_{key}_{args.extractor}.json"
        if path.exists():
            run = json.loads(path.read_text())
            if run["splits"] > 1:
                runs[key] = run
    if not runs:
        raise SystemExit("no pool results with several splits to plot; run routing_pools.py first")
    predictors = [p for p in next(iter(runs.values()))["results"] if p != "random"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 4.2))
    width = 0.8 / len(runs)
    for ax, (metric, label, scale, target) in zip(axes, PANELS, strict=True):
        for i, (key, run) in enumerate(runs.items()):
            means, errors = [], [[], []]
            for p in predictors:
                values = np.asarray(run["results"][p][metric], dtype=np.float64)
                values = values[np.isfinite(values)]
                mean, lo, hi = interval(values) if len(values) > 1 else (np.nan, np.nan, np.nan)
                means.append(scale * mean)
                errors[0].append(scale * (mean - lo))
                errors[1].append(scale * (hi - mean))
            x = np.arange(len(predictors)) + (i - (len(runs) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errors, capsize=2, label=f"{POOLS[key]} ({run['splits']} splits)")
        ax.set_xticks(np.arange(len(predictors)), predictors, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        ax.axhline(100.0 if metric == "cost_to_match_best" else 0.0, color="grey", lw=0.8)
        ax.axhline(target, color="red", lw=0.8, ls="--", label="target")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = RESULTS / "pools.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
