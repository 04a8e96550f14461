"""Learning curves for labelling: random vs active (``label --select``) rows, from scratch vs the head as a prior.

Two data sets, one cheap-vs-strong pair each, read-outs from the feature cache (no extraction):

- RouteLLM MMLU (GPT-4 vs Mixtral-8x7B): the 6,000 clean rows ``zero_label.py`` uses. The prior is
  the shipped head, which saw nothing of RouteLLM.
- MMLU-Pro: Mixtral-8x7B-Instruct-v0.1 (weak, $0.60/1M) vs gemini-1.5-pro-002 (strong, $1.25/$5 per 1M),
  chosen because it mirrors RouteLLM's pair (Mixtral as the cheap model, a frontier model as the strong
  one), both are in the product's MMLU-Pro price ladder, and the gap is wide (0.42 vs 0.70) so APGR is
  stable. The rows are the 3,000 cached MMLU-Pro rows, which the shipped head was trained on; so
  here the prior of each row is the difficulty from the head refitted without that row's subject
  (``zero_label_loso.py``, run it first): no row's label or subject reaches its own prior.

Protocol (``--seeds`` seeds, default 5): a fixed set of test rows (``--test``), the same for every arm
and seed; the other rows are candidates, and each seed's unlabelled pool is a seeded 80% of them,
shared by all arms of that seed. Arms, each evaluated at every count in ``--labels``:

- random: a seeded random order of the pool, nested prefixes;
- active: rounds at the label counts. Round 1 ranks the pool with the zero-label ladder router for the
  pair (``DifficultyRouter.pretrained`` from the head: the starting router ``label --select`` uses
  without ``--router``); each later round refits on all labels so far and adds the rows ranked first by
  ``difficulty_router.data.labelling.uncertainty_order`` -- the rule ``label --select`` applies;
- "+ prior": the pretrained head's difficulty as a prior, stacked with the probe: per model, a logistic
  regression on (the probe's out-of-fold logit, the head's difficulty) over the labelled rows -- three
  parameters, so even 50 labels set how far to trust the prior and how far the read-out. Random + prior
  uses the random arm's rows and probe; active + prior selects with its own stacked probabilities.
  (Tried first: the difficulty appended to the read-out as 100 identical columns, i.e. a 100x weaker L2
  penalty on it; close to stacking with random labels, but it hurt active selection -- docs/results/zero-label.md gives
  the numbers.)

The learner is the router's activation probe (``difficulty_router.learning.probes.SuccessProbe``: standardise,
L2 logistic per model with C by 5-fold CV, Platt-calibrated) on a fixed read-out, the head's
L12+L15 last+mean projected on the top ``--components`` (128) principal components of the candidate
rows (unlabelled read-outs only; the test rows are not used). ``train_router``'s read-out/family
sweep is left out, and the read-out is compressed, because active selection refits after every round:
on the full 2,304-wide read-out one fit took 190-460 s on this shared box (load ~20), the full
sweep more. Rows go to the strong model in order of
P(strong) - P(weak) (the utility rule); APGR from ``difficulty_router.core.metrics.apgr_cpt`` on the test
rows. Intervals: mean and 95% t-interval over seeds; the target comparison also gets a paired
bootstrap over test rows (seed means per resample).

    python benchmarks/zero_label_loso.py && python benchmarks/learning_curve.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import torch
from _common import RESULTS, extract_cached, machine, md_table, routellm_clean, write_results
from routing_pools import load as load_pool_rows
from scipy import stats
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from difficulty_router import DifficultyRouter, ModelPool, cache_root
from difficulty_router.core.metrics import apgr_cpt
from difficulty_router.data.labelling import uncertainty_order
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.learning.probes import SuccessProbe
from difficulty_router.routing.pretrained import TOP_ABILITY, DifficultyHead

LAYERS = (12, 15)
HIDDEN_BLOCK = {"L12 last": 0, "L12 mean": 1, "L15 last": 2, "L15 mean": 3}  # extract(layers, pooling="both") order
LEARNER_READOUT = ("L12 last", "L12 mean", "L15 last", "L15 mean")
STACK_C = 1.0  # L2 strength of the three-parameter stacker of the probe and the prior
ARMS = ("random", "random + prior", "active", "active + prior")
MMLU_PRO_PAIR = ("Mixtral-8x7B-Instruct-v0.1", "gemini-1.5-pro-002")


def features(extractor_id: str, max_tokens: int, queries, ids, progress: bool) -> tuple[np.ndarray, object]:
    """Read-outs at L12/L15, last+mean, through the feature cache; the stacked matrix is memoised by row ids."""
    key = hashlib.sha256(json.dumps([extractor_id, max_tokens, LAYERS, list(ids)]).encode()).hexdigest()[:20]
    memo = cache_root() / "benchmark-matrices" / f"{key}.npy"
    extractor, extraction, _ = extract_cached(extractor_id, max_tokens, queries, list(LAYERS), progress)
    if memo.is_file():
        return np.load(memo), extractor
    x = np.asarray(extraction.features, dtype=np.float32)
    memo.parent.mkdir(parents=True, exist_ok=True)
    np.save(memo, x)
    return x, extractor


def blocks(x: np.ndarray, names, hidden: int) -> np.ndarray:
    return np.concatenate([x[:, HIDDEN_BLOCK[n] * hidden:(HIDDEN_BLOCK[n] + 1) * hidden] for n in names], axis=1)


def ladder_proba(difficulty: np.ndarray, boundary, discrimination) -> np.ndarray:
    """P(success) of the two rungs of the zero-label ladder router at even shares (``pretrained.set_ladder``):
    rung 0 at the median training difficulty, the top rung 2 sd above it and at least ``TOP_ABILITY``."""
    boundary = np.broadcast_to(np.asarray(boundary, dtype=np.float64), difficulty.shape)
    a = np.broadcast_to(np.asarray(discrimination, dtype=np.float64), difficulty.shape)
    thetas = np.stack([boundary, np.maximum(boundary + 2.0, TOP_ABILITY)], axis=1)
    return 1.0 / (1.0 + np.exp(-a[:, None] * (thetas - difficulty[:, None])))


def load_routellm(args):
    rows, n_clean, _ = routellm_clean(6000, 0)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    rows = rows.select_models(pool.names)
    weak_j, strong_j = np.argsort(rows.scores.mean(axis=0))
    x, extractor = features(args.extractor, args.max_tokens, rows.queries, rows.ids, args.progress)
    head = DifficultyHead.load()
    prior = head.difficulty(blocks(x, list(HIDDEN_BLOCK), extractor.hidden_size))
    start = ladder_proba(prior, head.quantile(0.5), head.discrimination)
    # the formula must be the shipped router's own probabilities (same head, even shares)
    router = DifficultyRouter.pretrained([rows.models[weak_j], rows.models[strong_j]], head=head, extractor=extractor)
    check = router.probe.predict_proba(blocks(x[:50], list(HIDDEN_BLOCK), extractor.hidden_size))
    if not np.allclose(check, start[:50], atol=1e-6):
        raise SystemExit("ladder_proba disagrees with DifficultyRouter.pretrained's probabilities")
    y = rows.scores[:, [weak_j, strong_j]]
    return {"name": "RouteLLM MMLU", "pair": (rows.models[weak_j], rows.models[strong_j]), "x": x, "y": y,
            "prior": prior, "start": start, "hidden": extractor.hidden_size,
            "default_test": 2500,
            "rows_note": f"{len(rows)} of {n_clean} clean rows (seed 0)", "prior_note": "shipped head (no RouteLLM)"}


def load_mmlu_pro(args):
    path = RESULTS / "zero_label_loso.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run benchmarks/zero_label_loso.py first (it makes the held-out priors)")
    loso = json.loads(path.read_text())
    if tuple(loso["pair"]) != MMLU_PRO_PAIR:
        raise SystemExit(f"{path} is for the pair {loso['pair']}, expected {MMLU_PRO_PAIR}")
    rows, _, _ = load_pool_rows("mmlu-pro", 3000, 0)
    if list(rows.ids) != loso["rows"]["ids"]:
        raise SystemExit(f"{path} rows differ from the cached MMLU-Pro rows; re-run zero_label_loso.py")
    x, extractor = features(args.extractor, args.max_tokens, rows.queries, rows.ids, args.progress)
    prior = np.array(loso["rows"]["held_out_difficulty"], dtype=np.float64)
    heads = loso["heads"]
    subject = loso["rows"]["subject"]
    boundary = np.array([heads[s]["median_difficulty"] for s in subject])
    discrimination = np.array([heads[s]["discrimination"] for s in subject])
    y = rows.scores[:, [rows.models.index(m) for m in MMLU_PRO_PAIR]]
    return {"name": "MMLU-Pro", "pair": MMLU_PRO_PAIR, "x": x, "y": y, "prior": prior,
            "start": ladder_proba(prior, boundary, discrimination), "hidden": extractor.hidden_size,
            "default_test": 1000,
            "rows_note": f"the {len(rows)} cached rows", "prior_note": "head refitted without the row's subject"}


def t_interval(values) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def fmt(values) -> str:
    mean, lo, hi = t_interval(values)
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def pca_readout(x: np.ndarray, unlabelled: np.ndarray, components: int) -> np.ndarray:
    """z-score and project onto the top principal components of the candidate rows' read-outs (no labels used):
    keeps each of the ~200 probe fits per data set to about a second on a shared 2-core box."""
    x = np.asarray(x, dtype=np.float64)
    mean, scale = x[unlabelled].mean(0), x[unlabelled].std(0) + 1e-6
    z = (x - mean) / scale
    _, _, vt = np.linalg.svd(z[unlabelled], full_matrices=False)
    return z @ vt[:components].T


def signed(values) -> str:
    mean, lo, hi = t_interval(values)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


class Learner:
    """The router's activation probe on the labelled rows; ``with_prior`` stacks it with the head's difficulty:
    per model, a logistic regression on (the probe's out-of-fold logit, the prior difficulty) -- three
    parameters, so even 50 labels can set how far to trust the prior (the stacked family's recipe)."""

    def __init__(self, x, y, prior, rows, seed, with_prior: bool) -> None:
        self.x, self.prior = x, prior
        self.probe = SuccessProbe(seed=seed).fit(x[rows], y[rows])
        self.stack = None
        hard = (y[rows] >= 0.5).astype(int)
        if with_prior and all(0 < hard[:, m].mean() < 1 for m in range(y.shape[1])):
            self.stack = [
                LogisticRegression(C=STACK_C).fit(np.c_[self.probe.oof_logit_[:, m], prior[rows]], hard[:, m])
                for m in range(y.shape[1])
            ]

    def without_prior(self) -> Learner:
        plain = object.__new__(Learner)
        plain.x, plain.prior, plain.probe, plain.stack = self.x, self.prior, self.probe, None
        return plain

    def proba(self, rows) -> np.ndarray:
        if self.stack is None:
            return self.probe.predict_proba(self.x[rows])
        logit = self.probe.decision_function(self.x[rows])
        return np.column_stack([s.predict_proba(np.c_[logit[:, m], self.prior[rows]])[:, 1]
                                for m, s in enumerate(self.stack)])


def run_dataset(data, args, bar) -> dict:
    y = data["y"]
    n = len(y)
    order = np.random.default_rng(args.split_seed).permutation(n)
    n_test = args.test or data["default_test"]
    test, candidates = np.sort(order[:n_test]), order[n_test:]
    x_learn = pca_readout(blocks(data["x"], LEARNER_READOUT, data["hidden"]), candidates, args.components)
    prior = data["prior"]
    labels = sorted(args.labels)
    pool_size = int(0.8 * len(candidates))
    if labels[-1] > pool_size:
        raise SystemExit(f"{data['name']}: {labels[-1]} labels exceed the per-seed pool of {pool_size} rows")
    weak_t, strong_t = y[test, 0], y[test, 1]

    scores = {arm: {k: [] for k in labels} for arm in ARMS}  # per-seed test scores (for the bootstrap)
    apgr = {arm: {k: [] for k in labels} for arm in ARMS}
    chosen_overlap = {k: [] for k in labels}

    def record(arm, k, learner):
        p = learner.proba(test)
        scores[arm][k].append(p[:, 1] - p[:, 0])
        apgr[arm][k].append(apgr_cpt(p[:, 1] - p[:, 0], weak_t, strong_t)["apgr"])

    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        pool = rng.choice(candidates, pool_size, replace=False)
        random_order = rng.permutation(pool)
        for k in labels:  # random rows: one probe serves both arms (the prior only adds the stacker)
            learner = Learner(x_learn, y, prior, random_order[:k], seed, with_prior=True)
            record("random + prior", k, learner)
            record("random", k, learner.without_prior())
            bar.update(2)
        for arm in ("active", "active + prior"):
            labelled, learner = np.array([], dtype=int), None
            for k in labels:
                rest = np.setdiff1d(pool, labelled)
                proba = data["start"][rest] if learner is None else learner.proba(rest)
                labelled = np.r_[labelled, rest[uncertainty_order(proba)[: k - len(labelled)]]]
                learner = Learner(x_learn, y, prior, labelled, seed, with_prior=arm.endswith("prior"))
                record(arm, k, learner)
                if arm == "active":
                    chosen_overlap[k].append(float(np.isin(labelled, random_order[:k]).mean()))
                bar.update(1)
    zero = apgr_cpt(prior[test], weak_t, strong_t)["apgr"]
    return {"test": test, "labels": labels, "apgr": apgr, "scores": scores, "zero_label": zero,
            "weak": weak_t, "strong": strong_t, "pool_size": pool_size, "overlap": chosen_overlap}


def bootstrap_diff(result, arm_a, k_a, arm_b, k_b, n_boot, seed) -> tuple[float, float]:
    """95% interval of (mean over seeds of APGR arm_a@k_a) - (same for arm_b@k_b), resampling test rows."""
    weak, strong = result["weak"], result["strong"]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        r = rng.integers(0, len(weak), len(weak))
        a = np.mean([apgr_cpt(s[r], weak[r], strong[r])["apgr"] for s in result["scores"][arm_a][k_a]])
        b = np.mean([apgr_cpt(s[r], weak[r], strong[r])["apgr"] for s in result["scores"][arm_b][k_b]])
        draws.append(a - b)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def target_rows(result, args) -> tuple[list[list], dict]:
    labels, apgr = result["labels"], result["apgr"]
    top = labels[-1]
    goal = float(np.mean(apgr["random"][top]))
    rows, out = [], {}
    for arm in ("active", "active + prior", "random + prior"):
        reach = next((k for k in labels if np.mean(apgr[arm][k]) >= goal), None)
        k = max(c for c in labels if c <= 600)
        diff = np.array(apgr[arm][k]) - np.array(apgr["random"][top])
        boot = bootstrap_diff(result, arm, k, "random", top, args.bootstrap, args.split_seed)
        met = reach is not None and reach <= 600
        rows.append([arm, f"{goal:.3f}", reach if reach is not None else f"> {top}",
                     signed(diff), f"[{boot[0]:+.3f}, {boot[1]:+.3f}]",
                     "met" if met else "not met"])
        out[arm] = {"random_top_apgr": goal, "reaches_at": reach, "diff_at_600": t_interval(diff),
                    "diff_at_600_bootstrap": boot, "met": met}
    return rows, out


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        labels = result["labels"]
        colors = ("tab:blue", "tab:cyan", "tab:red", "tab:orange")
        for arm, style, color in zip(ARMS, ("-", "--", "-", "--"), colors, strict=True):
            st = [t_interval(result["apgr"][arm][k]) for k in labels]
            ax.plot(labels, [m for m, _, _ in st], style, marker="o", color=color, label=arm)
            ax.fill_between(labels, [lo for _, lo, _ in st], [hi for _, _, hi in st], color=color, alpha=0.08)
        ax.axhline(result["zero_label"], color="black", ls=":", lw=1, label="pretrained head, 0 labels")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8, label="random routing")
        ax.set_xscale("log")
        ax.set_xticks(labels, [str(k) for k in labels])
        ax.set_xlabel("labelled rows")
        ax.set_ylabel("APGR on the fixed test rows")
        ax.set_title(f"{name}: {result['pair'][1]} vs {result['pair'][0]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("random vs active (label --select) labelling; mean and 95% t-interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["routellm", "mmlu-pro"], choices=["routellm", "mmlu-pro"])
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--labels", type=int, nargs="+", default=[50, 150, 300, 600, 1500])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--test", type=int, help="fixed test rows per data set (default: RouteLLM 2500, MMLU-Pro 1000)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--components", type=int, default=128, help="PCA components of the learner's read-out")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--out", default="learning_curve")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the results JSON")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())["datasets"]
        names = {"routellm": "RouteLLM MMLU", "mmlu-pro": "MMLU-Pro"}
        plot({names[n]: {"labels": d["labels"], "pair": d["pair"], "zero_label": d["zero_label_apgr"],
                         "apgr": {a: {int(k): v for k, v in d["apgr"][a].items()} for a in ARMS}}
              for n, d in saved.items()}, RESULTS / f"{args.out}.png")
        return
    torch.set_num_threads(1)
    # one BLAS thread: the ~200 small logistic fits run 5-10x slower with threads spinning on a busy 2-core box
    threadpool_limits(1)
    start = time.perf_counter()

    loaders = {"routellm": load_routellm, "mmlu-pro": load_mmlu_pro}
    data = {name: loaders[name](args) for name in args.datasets}
    bar = tqdm(total=len(data) * args.seeds * len(ARMS) * len(args.labels), desc="fits", disable=not args.progress)
    results = {}
    for name, d in data.items():
        results[name] = run_dataset(d, args, bar)
        results[name]["pair"] = d["pair"]
    bar.close()

    sections, payload = [], {"machine": machine(), "args": vars(args), "datasets": {}}
    for name, result in results.items():
        d = data[name]
        labels = result["labels"]
        rows = [[arm] + [fmt(result["apgr"][arm][k]) for k in labels] for arm in ARMS]
        prior_gain = [np.array(result["apgr"][f"{base} + prior"][k]) - np.array(result["apgr"][base][k])
                      for base in ("random", "active") for k in labels]
        rows.append(["active minus random (paired)"] + [
            signed(np.array(result["apgr"]["active"][k]) - np.array(result["apgr"]["random"][k])) for k in labels])
        rows.append(["prior minus scratch, random rows (paired)"] + [signed(g) for g in prior_gain[: len(labels)]])
        rows.append(["prior minus scratch, active rows (paired)"] + [signed(g) for g in prior_gain[len(labels):]])
        rows.append(["active rows also in the random sample"] + [
            f"{100 * np.mean(result['overlap'][k]):.0f}%" for k in labels])
        target, target_json = target_rows(result, args)
        weak, strong = result["weak"].mean(), result["strong"].mean()
        sections.append(
            f"### {d['name']}: {d['pair'][1]} (strong, test accuracy {strong:.3f}) vs {d['pair'][0]} "
            f"(weak, {weak:.3f})\n\n"
            f"{d['rows_note']}; {len(result['test'])} fixed test rows, per-seed pool of {result['pool_size']} rows "
            f"from the other {len(d['y']) - len(result['test'])}. Prior: {d['prior_note']}; its zero-label APGR on "
            f"the test rows is {result['zero_label']:.3f}.\n\n"
            + md_table(["arm \\ labels"] + [str(k) for k in labels], rows)
            + "\n\nTarget: active selection reaches the APGR of random labels at the largest count with <= 600 "
            "labels. Difference at 600 labels minus random at the largest count: t-interval over seeds, and a "
            "bootstrap over test rows.\n\n"
            + md_table(["arm", f"random @ {labels[-1]}", "first count reaching it", "@600 minus random@top (seeds)",
                        "same (test-row bootstrap)", "target"], target) + "\n")
        payload["datasets"][name] = {
            "pair": list(d["pair"]), "labels": labels, "test_rows": len(result["test"]), "pool": result["pool_size"],
            "zero_label_apgr": result["zero_label"], "apgr": {a: {str(k): v for k, v in result["apgr"][a].items()}
                                                              for a in ARMS},
            "target": target_json, "overlap": {str(k): v for k, v in result["overlap"].items()}}
    seconds = time.perf_counter() - start
    png = RESULTS / f"{args.out}.png"
    plot({data[n]["name"]: r for n, r in results.items()}, png)
    md = (f"Learning curves for labelling (issue 17): {args.seeds} seeds, labels {sorted(args.labels)}; learner "
          f"SuccessProbe on the top {args.components} principal components (fitted on the unlabelled candidate rows) "
          f"of "
          f"{'+'.join(LEARNER_READOUT)} of {args.extractor} (max {args.max_tokens} tokens); '+ prior' stacks the "
          f"probe's out-of-fold logit with the head's difficulty (a per-model logistic regression, C {STACK_C:g}). "
          f"APGR: mean and 95% t-interval over seeds on the "
          f"same fixed test rows for every arm. {seconds:.0f} s in all on {machine()} (shared box). "
          f"Protocol: see the docstring of benchmarks/learning_curve.py. Plot: {png.name}.\n\n" + "\n".join(sections))
    payload["seconds"] = seconds
    write_results(args.out, md, payload)


if __name__ == "__main__":
    main()
