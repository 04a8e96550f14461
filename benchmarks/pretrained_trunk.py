"""Pretraining the shared success representation across corpora: does a new pool need fewer labels? (issue 29, item 2)

For each evaluated pool the trunk (:func:`difficulty_router.learning.pretraining.pretrain_trunk`: one
:class:`~difficulty_router.learning.shared_success.SharedSuccessModel` over the stacked corpora, rank and
penalty by 3-fold CV) is fitted on the *other* corpora only, leaving out the one being evaluated:

- MMLU-Pro seven-model ladder (``routing_pools.py``'s 3,000 seeded rows; 1,000 fixed test rows, labels drawn
  from the other 2,000) <- LLMRouter (2,500 rows, 9 models) + RouteLLM MMLU (6,000 clean rows, 2 models);
- LLMRouter, 9 models (its 500 test rows; labels drawn from its 2,000 seeded training rows) <- MMLU-Pro
  (the 3,000 rows, all 29 models, missing records left missing) + RouteLLM MMLU;
- RouteLLM MMLU, GPT-4 vs Mixtral (2,500 fixed test rows; labels from the other 3,500) <- MMLU-Pro + LLMRouter.

Arms, all on the same read-out (``--readout``, default L15 mean of SmolLM2-135M, max 512 tokens) and, per seed,
the same labelled rows: per-model probes (``SuccessProbe``, the activation family), the shared model fitted
from scratch (the shared family), the shared model on the frozen pretrained trunk (heads only), and the
shared model started from the trunk with ``fine_tune=True`` (cross-validation picks frozen or fine-tuned).
Defaults as ``train_router`` uses them (5-fold CV, no PCA).

Reported per label count: mean per-model AUROC of P(success) on the test rows, and for the many-model pools
the utility sweep's frontier AUC, best-to-oracle gap closed and cost to match the best single model
(``routing_pools.score``: every model eligible, each arm's margin fitted on its own out-of-fold
predictions, capability = the labelled rows' accuracy), plus inversions. Mean over ``--seeds`` label
draws with a 95% t-interval, and each arm's paired difference to the per-model probes.

With zero labels a pool has no heads to fit; the zero-label router is the shipped difficulty head
(``DifficultyRouter.pretrained``), measured leave-one-domain-out by ``zero_label_guard.py``.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/pretrained_trunk.py            # all three pools
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/pretrained_trunk.py --pools llmrouter --seeds 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import RESULTS, extract_cached, machine, md_table, routellm_clean, write_results
from routing_pools import MMLU_PRO_LADDER, inversions
from routing_pools import load as load_pool_rows
from routing_pools import score as pool_score
from routing_routellm import interval
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from zero_label import BLOCKS, blocks, mmlu_pro_all_models

from difficulty_router import ModelPool
from difficulty_router.data.queries import conversation_text
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.learning.policies import fit_margin
from difficulty_router.learning.pretraining import pretrain_trunk
from difficulty_router.learning.probes import SuccessProbe
from difficulty_router.learning.shared_success import SharedSuccessModel

ARMS = ("per-model probes", "shared, scratch", "shared, frozen trunk", "shared, from trunk (fine-tune allowed)")
POOLS = ("mmlu-pro", "llmrouter", "routellm")
LABELS = {"mmlu-pro": (100, 300, 1000, 2000), "llmrouter": (100, 300, 1000, 2000), "routellm": (100, 300, 1000, 3000)}
ROUTING = ("auc", "oracle_gap_closed", "cost_to_match_best", "inversions")


def corpora(readout: list[str], extractor_id: str, max_tokens: int, progress: bool) -> dict:
    """Every corpus: features, labels (NaN = no record), model names, its pool, fixed test rows."""
    mp, mp_pool, _ = load_pool_rows("mmlu-pro", 3000, 0)
    mp_all, all_models = mmlu_pro_all_models(mp.ids)
    lr, lr_pool, lr_test = load_pool_rows("llmrouter", 2000, 0)
    rl, _, _ = routellm_clean(6000, 0)
    rl_pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    rl = rl.select_models(rl_pool.names)
    out = {}
    for name, rows, pool, labels, models, test in (
        ("mmlu-pro", mp, mp_pool, mp_all, all_models, None),
        ("llmrouter", lr, lr_pool, lr.scores, list(lr.models), lr_test),
        ("routellm", rl, rl_pool, rl.scores, list(rl.models), None),
    ):
        extractor, feats, _ = extract_cached(extractor_id, max_tokens, rows.queries, [12, 15], progress)
        x = blocks(feats.features, readout, extractor.hidden_size)
        if test is None:
            order = np.random.default_rng(0).permutation(len(rows))
            n_test = 1000 if name == "mmlu-pro" else 2500
            test, candidates = np.sort(order[:n_test]), order[n_test:]
        else:
            candidates = np.setdiff1d(np.arange(len(rows)), test)
        out[name] = {"x": x, "pretrain_y": labels, "outcomes": rows, "pool": pool, "test": test,
                     "candidates": candidates, "models": models, "extractor": extractor}
    return out


def mean_auroc(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean over models of AUROC(P(success), success); soft scores count as success at >= 0.5."""
    out = []
    for j in range(y.shape[1]):
        hit = (y[:, j] >= 0.5).astype(int)
        if 0 < hit.mean() < 1:
            out.append(roc_auc_score(hit, proba[:, j]))
    return float(np.mean(out))


def arms(x, y, trunk, seed: int) -> dict:
    """(test-ready model, out-of-fold P(success) on the labelled rows) per arm."""
    probe = SuccessProbe(seed=seed).fit(x, y)
    scratch = SharedSuccessModel(seed=seed).fit(x, y)
    frozen = SharedSuccessModel(trunk=trunk, seed=seed).fit(x, y)
    started = SharedSuccessModel(trunk=trunk, fine_tune=True, seed=seed).fit(x, y)
    return {ARMS[0]: (probe, probe.oof_proba_), ARMS[1]: (scratch, scratch.oof_proba_),
            ARMS[2]: (frozen, frozen.oof_proba_), ARMS[3]: (started, started.oof_proba_)}


def run_pool(name: str, data: dict, labels, seeds: int, progress: bool) -> dict:
    target = data[name]
    others = [n for n in POOLS if n != name]
    start = time.perf_counter()
    pretrained = pretrain_trunk([(data[n]["x"], data[n]["pretrain_y"]) for n in others], ranks=(4, 8, 16),
                                alphas=(0.003, 0.01, 0.03), n_components=None)
    pretrain_s = time.perf_counter() - start
    outcomes, pool = target["outcomes"], target["pool"]
    if name == "mmlu-pro":
        outcomes = outcomes.select_models(list(MMLU_PRO_LADDER))
    x, y, test_idx = target["x"], outcomes.scores, target["test"]
    costs = pool.costs([len(conversation_text(c)) for c in outcomes.queries])
    test = outcomes.subset(test_idx)
    eligible = np.ones((len(test_idx), len(outcomes.models)), dtype=bool)
    results = {arm: {k: {"mean_auroc": [], **{m: [] for m in ROUTING}, "mode": []} for k in labels} for arm in ARMS}
    bar = tqdm(total=len(labels) * seeds, desc=name, disable=not progress)
    for seed in range(seeds):
        order = np.random.default_rng(1000 + seed).permutation(target["candidates"])
        for k in labels:
            rows = np.sort(order[:k])
            capability = y[rows].mean(axis=0)
            for arm, (model, oof) in arms(x[rows], y[rows], pretrained.trunk(), seed).items():
                proba = model.predict_proba(x[test_idx])
                cell = results[arm][k]
                cell["mean_auroc"].append(mean_auroc(proba, y[test_idx]))
                cell["mode"].append(getattr(model, "mode_", "per-model"))
                if len(outcomes.models) > 2:
                    margin = fit_margin(oof, y[rows], costs[rows], capability, np.ones_like(oof, dtype=bool))[0]
                    rep = pool_score(proba, margin, test, costs[test_idx], capability, eligible)
                    for m in ROUTING:
                        cell[m].append(np.nan if rep[m] is None else float(rep[m]))
                else:
                    cell["inversions"].append(inversions(proba, capability))
            bar.update(1)
    bar.close()
    return {"pool": name, "pretrained_on": others, "trunk_rank": int(pretrained.rank_),
            "trunk_alpha": float(pretrained.alpha_), "pretrain_s": pretrain_s, "labels": list(labels),
            "models": list(outcomes.models), "n_test": len(test_idx), "n_candidates": len(target["candidates"]),
            "results": results}


def fmt(values, percent: bool = False) -> str:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return "-"
    mean, lo, hi = interval(values)
    f = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3f}")
    return f"{f(mean)} [{f(lo)}, {f(hi)}]"


def paired(a, b) -> str:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean, lo, hi = interval(diff)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def pool_markdown(rep: dict, seeds: int) -> str:
    res, labels = rep["results"], rep["labels"]
    title = {"mmlu-pro": "MMLU-Pro seven-model ladder", "llmrouter": "LLMRouter, 9 models",
             "routellm": "RouteLLM MMLU, 2 models"}[rep["pool"]]
    md = (f"### {title}\n\nTrunk pretrained on {' + '.join(rep['pretrained_on'])} (rank {rep['trunk_rank']}, "
          f"penalty {rep['trunk_alpha']:g}, {rep['pretrain_s']:.0f} s); {rep['n_test']} fixed test rows; "
          f"{seeds} label draws from {rep['n_candidates']} candidate rows (draws overlap more as the count nears "
          f"{rep['n_candidates']}; at {rep['n_candidates']} they are the same rows and the interval shows only "
          "the folds' seed).\n\nMean per-model test AUROC of P(success):\n\n")
    rows = [[arm] + [fmt(res[arm][k]["mean_auroc"]) for k in labels] for arm in ARMS]
    rows += [[f"{arm} minus per-model probes (paired)"] +
             [paired(res[arm][k]["mean_auroc"], res[ARMS[0]][k]["mean_auroc"]) for k in labels] for arm in ARMS[1:]]
    md += md_table(["arm \\ labels"] + [str(k) for k in labels], rows)
    modes = [[ARMS[3]] + [", ".join(f"{m} {res[ARMS[3]][k]['mode'].count(m)}" for m in ("frozen", "fine-tuned")
                                     if m in res[ARMS[3]][k]["mode"]) for k in labels]]
    md += "\n\nWhat cross-validation chose for the trunk-started arm:\n\n" + md_table(
        ["arm \\ labels"] + [str(k) for k in labels], modes)
    if len(rep["models"]) > 2:
        for metric, label, percent in (("auc", "Frontier AUC", False),
                                       ("oracle_gap_closed", "Best-to-oracle gap closed", False),
                                       ("cost_to_match_best", "Cost to match the best model (share of its cost; "
                                        "'-': no draw reached it)", True),
                                       ("inversions", "Inversions", True)):
            rows = [[arm] + [fmt(res[arm][k][metric], percent) for k in labels] for arm in ARMS]
            md += f"\n\n{label}:\n\n" + md_table(["arm \\ labels"] + [str(k) for k in labels], rows)
    return md + "\n"


def plot(reports: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), squeeze=False)
    for ax, rep in zip(axes[0], reports, strict=True):
        for arm in ARMS:
            means = [interval(rep["results"][arm][k]["mean_auroc"]) for k in rep["labels"]]
            ax.errorbar(rep["labels"], [m[0] for m in means],
                        yerr=[[m[0] - m[1] for m in means], [m[2] - m[0] for m in means]], label=arm, capsize=3,
                        marker="o")
        ax.set_xscale("log")
        ax.set_title(f"{rep['pool']} (trunk from {' + '.join(rep['pretrained_on'])})", fontsize=9)
        ax.set_xlabel("labelled rows")
        ax.set_ylabel("mean per-model test AUROC")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--labels", nargs="+", type=int,
                        help="label counts (default: 100 300 1000 and the pool's most)")
    parser.add_argument("--readout", nargs="+", choices=list(BLOCKS), default=["L15 mean"])
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 for an interval")
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = corpora(args.readout, args.extractor, args.max_tokens, args.progress)
    reports = [run_pool(name, data, args.labels or LABELS[name], args.seeds, args.progress) for name in args.pools]
    plot(reports, RESULTS / "pretrained_trunk.png")
    md = (f"Cross-corpus pretraining of the shared success representation (issue 29, item 2): read-out "
          f"{'+'.join(args.readout)} of {args.extractor} (max {args.max_tokens} tokens); {args.seeds} label draws "
          f"per count, mean and 95% t-interval; {time.perf_counter() - start:.0f} s on {machine()}. "
          "Protocol: the docstring of benchmarks/pretrained_trunk.py. Plot: pretrained_trunk.png.\n\n"
          + "\n".join(pool_markdown(rep, args.seeds) for rep in reports))
    write_results("pretrained_trunk", md, {"machine": machine(), "readout": args.readout, "seeds": args.seeds,
                                           "reports": reports})


if __name__ == "__main__":
    main()
