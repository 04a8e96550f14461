"""Multi-turn sessions from MMLU-Pro: per-call vs sticky vs cache-aware routing, with the real `Sessions` code.

What the simulation assumes (it re-extracts nothing):

- Rows and pool: those of ``cost_model.py`` (MMLU-Pro, the four models with recorded answer lengths, assumed
  late-2024 list prices), with a cached-input price of 10% of each model's input price.
- Sessions: the rows in a seeded random order, cut into sessions of 5-20 questions (uniform). Turn k's
  prompt is the transcript so far: every earlier question and the answer of the model that served it
  (its recorded length), then question k. Tokens are characters / 4 (the extractor's tokenizer times a
  ratio of 1 is what a deployment would use; characters keep the simulation free of extraction).
- Success: a turn is correct when the serving model's recorded answer to question k alone was correct,
  and the router's P(success) for a turn is its prediction for question k alone: 2-fold cross-fitted
  (the router and length head trained on one half predict the other), so every row has an
  out-of-fold prediction. So the transcript is assumed to change neither difficulty nor success.
- Cost: a turn on the same model as the previous turn reads the previous turn's prompt from the
  provider's cache (10% price) and the rest fresh; a turn on another model (or the first) reads the
  whole prompt fresh; plus the recorded answer at the output price. Every policy is charged this way
  (per-call routing also gets cache hits when consecutive turns happen to land on one model).
- Decisions: per call, the utility policy at lambda with the router's per-call costs (the whole prompt
  fresh, predicted output tokens); ``Sessions`` ("sticky" with margin 0.05, "cache_aware") turns each
  per-call decision into the served one, exactly as the Binding and the server do.

Intervals: 95% percentile bootstrap over sessions (paired: the same resampled sessions for every policy).

    python benchmarks/sessions.py --limit 3000
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import extract_cached, machine, md_table, write_results
from cost_model import PRICES, load_rows
from tqdm.auto import tqdm

from difficulty_router import ModelPool, PoolModel, train_router
from difficulty_router.data.queries import conversation_text
from difficulty_router.learning.length_head import OutputLengthHead
from difficulty_router.learning.policies import Policy
from difficulty_router.routing.decision import RouteDecision
from difficulty_router.routing.sessions import Sessions, SessionStore

CACHED_SHARE = 0.10
POLICIES = ("per_call", "sticky", "cache_aware")


def cross_fit(outcomes, tokens, X, pool, extractor, seed):
    """Out-of-fold P(success) and predicted output tokens for every row (2 folds), and the capability order."""
    proba, predicted = np.zeros(outcomes.scores.shape), np.zeros(tokens.shape)
    order = np.random.default_rng(seed).permutation(len(outcomes))
    halves = [np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])]
    capability_orders = []
    for fit_rows, predict_rows in (halves, halves[::-1]):
        router = train_router(outcomes.subset(fit_rows), pool, extractor, layers=[12], pooling="mean",
                              families=("activation",), cv=3, seed=seed, progress=False)
        proba[predict_rows] = router.probe.predict_proba(X[predict_rows])
        predicted[predict_rows] = OutputLengthHead().fit(X[fit_rows], tokens[fit_rows]).predict_tokens(X[predict_rows])
        capability_orders.append(router.capability_order())
    return proba, predicted, capability_orders[0]


def simulate(policy, lam, sessions_rows, q_tokens, tokens, proba, predicted, correct, pool, order):
    """Per session: (cost, correct answers, turns, switches)."""
    models = pool.names
    sessions = Sessions(policy, store=SessionStore(max_sessions=100_000), pool=pool, capability_order=order)
    chooser = Policy("utility", lam)
    capability = np.array([order.index(m) for m in models], dtype=np.float64)
    out = []
    for s, rows in enumerate(sessions_rows):
        key, context, prev_model, prev_prompt = f"s{s}", 0.0, None, 0.0
        cost = hits = switches = 0.0
        for r in rows:
            prompt = context + q_tokens[r]
            per_call_costs = np.array([pool[m].cost(input_tokens=prompt, output_tokens=predicted[r, j])
                                       for j, m in enumerate(models)])
            j = int(chooser.choose(proba[r][None, :], per_call_costs[None, :], capability)[0])
            decision = RouteDecision(
                model=models[j], probabilities=dict(zip(models, proba[r].tolist(), strict=True)), difficulty=3.0,
                difficulty_level=3, expected_cost=float(per_call_costs[j]),
                costs=dict(zip(models, per_call_costs.tolist(), strict=True)), policy="utility", parameter="lambda",
                parameter_value=lam, capability_order=tuple(order),
                output_tokens=dict(zip(models, predicted[r].tolist(), strict=True)))
            served = sessions.apply(key if policy != "per_call" else None, decision, context_tokens=int(prompt))
            k = models.index(served.model)
            cached = prev_prompt if served.model == prev_model else 0.0
            cost += pool[served.model].cost(input_tokens=prompt, cached_tokens=cached, output_tokens=tokens[r, k])
            hits += correct[r, k]
            switches += prev_model is not None and served.model != prev_model
            prev_model, prev_prompt = served.model, prompt
            context = prompt + tokens[r, k]
        out.append((cost, hits, len(rows), switches))
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.05, 0.2, 0.5, 1.0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    outcomes, tokens = load_rows(args.limit, args.seed)
    models = list(outcomes.models)
    pool = ModelPool(tuple(PoolModel(name=m, input_cost_per_1m=i, output_cost_per_1m=o,
                                     cached_input_cost_per_1m=CACHED_SHARE * i) for m, (i, o) in PRICES.items()))
    extractor, features, _ = extract_cached(args.extractor, args.max_tokens, outcomes.queries, [0.4, 0.5],
                                            args.progress)
    X = features.select(layers=[12], pooling=["mean"]).features
    proba, predicted, order = cross_fit(outcomes, tokens, X, pool, extractor, args.seed)
    q_tokens = np.array([len(conversation_text(c)) / 4.0 for c in outcomes.queries])

    rng = np.random.default_rng(args.seed)
    perm, sessions_rows, i = rng.permutation(len(outcomes)), [], 0
    while i + 5 <= len(perm):
        size = int(rng.integers(5, 21))
        sessions_rows.append(perm[i: i + size])
        i += size
    n_sessions = len(sessions_rows)

    results, rows_md, payload = {}, [], {}
    draws = np.random.default_rng(args.seed + 1).integers(0, n_sessions, (args.bootstrap, n_sessions))
    for lam in tqdm(args.lambdas, desc="lambda", disable=not args.progress):
        sims = {p: simulate(p, lam, sessions_rows, q_tokens, tokens, proba, predicted, outcomes.scores, pool, order)
                for p in POLICIES}

        def stats(sim, base=None):
            cost = sim[:, 0].sum() / n_sessions
            acc = sim[:, 1].sum() / sim[:, 2].sum()
            sw = sim[:, 3].mean()
            b_cost = sim[draws, 0].sum(axis=1) / n_sessions
            b_acc = sim[draws, 1].sum(axis=1) / sim[draws, 2].sum(axis=1)
            b_sw = sim[draws, 3].mean(axis=1)
            out = {"cost": (cost, *np.percentile(b_cost, [2.5, 97.5])), "accuracy": (acc, *np.percentile(b_acc,
                   [2.5, 97.5])), "switches": (sw, *np.percentile(b_sw, [2.5, 97.5]))}
            if base is not None:
                saving = 1 - sim[:, 0].sum() / base[:, 0].sum()
                b_saving = 1 - sim[draws, 0].sum(axis=1) / base[draws, 0].sum(axis=1)
                d_acc = acc - base[:, 1].sum() / base[:, 2].sum()
                b_d_acc = b_acc - base[draws, 1].sum(axis=1) / base[draws, 2].sum(axis=1)
                out["saving_vs_per_call"] = (saving, *np.percentile(b_saving, [2.5, 97.5]))
                out["accuracy_vs_per_call"] = (d_acc, *np.percentile(b_d_acc, [2.5, 97.5]))
            return out

        results[lam] = {p: stats(sims[p], None if p == "per_call" else sims["per_call"]) for p in POLICIES}
        payload[str(lam)] = {p: {k: list(map(float, v)) for k, v in r.items()} for p, r in results[lam].items()}

        def f(v, kind):
            if kind == "usd":
                return f"${v[0]:.5f} [{v[1]:.5f}, {v[2]:.5f}]"
            if kind == "pct":
                return f"{100 * v[0]:.1f}% [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"
            if kind == "pts":
                return f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"
            return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"

        for p in POLICIES:
            r = results[lam][p]
            rows_md.append([f"{lam:g}", p, f(r["cost"], "usd"), f(r["accuracy"], "pct"), f(r["switches"], "num"),
                            f(r["saving_vs_per_call"], "pct") if p != "per_call" else "-",
                            f(r["accuracy_vs_per_call"], "pts") if p != "per_call" else "-"])

    turns = np.array([len(r) for r in sessions_rows])
    single = [[m, f"{outcomes.scores[:, j].mean():.3f}", f"{PRICES[m][0]:g} / {CACHED_SHARE * PRICES[m][0]:g} / "
               f"{PRICES[m][1]:g}"] for j, m in enumerate(models)]
    md = (f"# Sessions: per-call vs sticky vs cache-aware routing (MMLU-Pro)\n\n{n_sessions} sessions of 5-20 "
          f"questions (mean {turns.mean():.1f} turns) from {len(outcomes)} MMLU-Pro rows; pool of four models with "
          f"recorded answer lengths, assumed late-2024 list prices with the cached-input price at 10% of the input "
          f"price; probabilities and predicted lengths 2-fold cross-fitted (extractor {extractor.model_id}, "
          f"read-out L12 mean) on {machine()}. The simulation's assumptions are listed in "
          f"`benchmarks/sessions.py`: the transcript grows by each served answer; success and P(success) are the "
          f"question's own. Sticky margin 0.05. Intervals: 95% bootstrap over sessions ({args.bootstrap} "
          f"resamples, paired across policies).\n\n"
          + md_table(["model", "accuracy", "USD per 1M input / cached input / output"], single) + "\n\n"
          + md_table(["lambda", "policy", "cost per session", "accuracy", "switches per session",
                      "saving vs per-call", "accuracy vs per-call (points)"], rows_md) + "\n")
    write_results("sessions", md, {"machine": machine(), "n_rows": len(outcomes), "n_sessions": n_sessions,
                                   "results": payload, "cached_share": CACHED_SHARE})


if __name__ == "__main__":
    main()
