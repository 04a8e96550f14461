"""Routing overhead against the hardware floor, per numeric path, on this machine.

The floor is arithmetic: a prefill of n tokens through the L blocks below the read-out costs
2 x (linear parameters per block) x L x n FLOPs plus attention (4 x n^2 x heads x head_dim per block);
divided by this machine's measured matmul rate in the chosen dtype *at the extractor's shapes*
(the block's own linear layers at n rows), it is the least time any implementation can take.

For each path this CPU runs natively (float32 always; int8 where the CPU has int8 dot products;
bf16 only with AVX512-BF16/AMX, or on request with --emulated-bf16), it reports:

- the matmul rate at 10/100/1,000 rows and at a batch's rows;
- single-query latency p50/p99 of real prompts of about 10, 100 and 1,000 tokens, the floor for
  the same tokens, and the ratio to the floor (the cached template prefix can take a short prompt
  below 1.0: the floor counts every token, the extractor does not recompute the prefix);
- batch-32 throughput (prompts/s and the share of the matmul rate it reaches);
- the path ``dtype="auto"`` chooses on this machine, measured afresh, with each path's timing and read-out
  error (``extraction.path_choice``);
- peak RSS of a fresh process that loads the extractor and extracts 64 prompts in batches of 32;
- where the time of a 100-token query goes (torch profiler: matmuls, attention, the rest);
- on the first path only, route + time to first token of a query routed to the extractor's own
  model, with and without reuse of the routing read-out's prefill (``TTFT_PROMPTS`` prompts x
  ``TTFT_REPEATS`` passes per length, fewer than the latency part, to keep the run short).

The float32 path is also run without the hot-path changes (no prefix cache, batches unbounded by
padding) as the before/after baseline. Run it on an idle machine if you can; the timings of a
shared one are noisy (p99 especially).

    python benchmarks/overhead.py                 # about 4-5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, md_table, write_results

from difficulty_router import ActivationExtractor, load_outcomes
from difficulty_router.datasets import ROUTELLM_MMLU_SAMPLE
from difficulty_router.extraction import path_choice
from difficulty_router.extraction.model_store import fingerprint, resolve
from difficulty_router.extraction.numerics import (
    cpu_flags,
    cpu_has_bf16,
    cpu_has_int8_dot,
    int8_supported,
    match_threads,
    quantise_int8,
)
from difficulty_router.extraction.path_choice import choose_path

TARGET_TOKENS = (10, 100, 1000)
TTFT_PROMPTS, TTFT_REPEATS = 4, 2  # the time-to-first-token sample per length (6 x 3 before a5de709)


def block_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of one decoder block's linear layers: q, k, v, o, gate, up, down."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def block_flops(config, n: int) -> float:
    """FLOPs of one block on n tokens: its linears plus causal-free attention scores and values."""
    linear = 2 * n * sum(i * o for i, o in block_shapes(config))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return linear + 4 * n * n * config.num_attention_heads * head_dim


def matmul_rate(config, dtype: torch.dtype, rows: int, seconds: float = 1.0) -> float:
    """FLOP/s of one block's linear layers at ``rows`` tokens, in the given numeric path (best of repeats)."""
    layers = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for i, o in block_shapes(config)).eval()
    if dtype == torch.qint8:
        wrapped = torch.nn.ModuleList([torch.nn.Sequential(layer) for layer in layers])
        quantise_int8(wrapped)
        layers, act = wrapped, torch.float32
    else:
        layers, act = layers.to(dtype), dtype
    h, inter = config.hidden_size, config.intermediate_size
    inputs = {i: torch.randn(rows, i, dtype=act) for i in {h, inter, *(i for i, _ in block_shapes(config))}}
    shapes = block_shapes(config)
    flops = 2 * rows * sum(i * o for i, o in shapes)
    with torch.inference_mode():
        for layer, (i, _) in zip(layers, shapes):  # warm-up
            layer(inputs[i])
        best, spent = float("inf"), 0.0
        while spent < seconds:
            start = time.perf_counter()
            for layer, (i, _) in zip(layers, shapes):
                layer(inputs[i])
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
    return flops / best


def prompts_of(extractor, queries, target: int, count: int) -> list[str]:
    """Real MMLU text cut or joined to about ``target`` templated tokens."""
    prefix = len(extractor.tokenize(["x"])[0][0]) - 1
    texts = [q if isinstance(q, str) else q[-1]["content"] for q in queries]
    out = []
    for k in range(count):
        body = " ".join(texts[k:] + texts[:k])
        words = body.split()
        lo, hi = 1, len(words)
        while lo < hi:  # the number of words whose prompt is closest to the target from below
            mid = (lo + hi + 1) // 2
            n = len(extractor.tokenize([" ".join(words[:mid])])[0][0])
            lo, hi = (mid, hi) if n <= max(target, prefix + 2) else (lo, mid - 1)
        out.append(" ".join(words[:lo]))
    return out


def latencies(extractor, prompts, repeats: int) -> np.ndarray:
    extractor.extract(prompts[:2], progress=False)  # warm-up
    out = []
    for _ in range(repeats):
        for p in prompts:
            start = time.perf_counter()
            extractor.extract([p], progress=False)
            out.append((time.perf_counter() - start) * 1000)
    return np.array(out)


def profile_share(extractor, prompt: str) -> dict:
    """Where one query's time goes: matmuls (incl. int8 linears), attention, everything else."""
    from torch.profiler import profile

    extractor.extract([prompt], progress=False)
    with profile() as prof:
        for _ in range(5):
            extractor.extract([prompt], progress=False)
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key
        if name.startswith(("aten::mm", "aten::addmm", "aten::bmm", "quantized::linear")):
            groups["matmul"] += event.self_cpu_time_total
        elif "scaled_dot_product" in name or "attention" in name:
            groups["attention"] += event.self_cpu_time_total
        elif name.startswith(("aten::", "quantized::")):
            groups["other"] += event.self_cpu_time_total
    total = sum(groups.values()) or 1.0
    return {k: v / total for k, v in groups.items()}


def ttft_rows(extractor, queries, repeats: int, count: int = 6) -> tuple[list[list[str]], dict]:
    """Time to first token of a query routed to the extractor's own model (a local generator on it):
    the routing read-out, then generation of one token, with the read-out's keys and values reused
    (only the blocks above the read-out run again) and without (a second prefill of the whole prompt)."""
    from difficulty_router import LocalGenerator

    reuse = LocalGenerator(extractor, max_new_tokens=1)
    again = LocalGenerator(extractor, max_new_tokens=1, reuse_routing_prefill=False)
    rows, out = [], {}
    for target in (100, 1000):
        prompts = prompts_of(extractor, queries, target, count)
        times: dict[str, list[float]] = {"reuse": [], "no reuse": []}
        reused = []
        for _ in range(repeats + 1):  # the first pass warms up
            for p in prompts:
                for name, gen in (("reuse", reuse), ("no reuse", again)):
                    start = time.perf_counter()
                    with gen.reusing_routing_prefill():  # one routed call: its read-out, then its generation
                        extractor.extract([p], progress=False)
                        gen.generate(p)
                    times[name].append((time.perf_counter() - start) * 1000)
                    if name == "reuse":
                        reused.append(gen.reused_prefill)
        n_tokens = float(np.mean([len(x) for x in extractor.tokenize(prompts)[0]]))
        with_reuse, without = (np.array(times[k][len(prompts):]) for k in ("reuse", "no reuse"))
        ratio = with_reuse / without
        out[str(target)] = {"tokens_mean": n_tokens, "reuse_p50_ms": float(np.median(with_reuse)),
                            "no_reuse_p50_ms": float(np.median(without)), "ratio_median": float(np.median(ratio)),
                            "reused_every_time": bool(all(reused))}
        rows.append([f"{n_tokens:.0f}", f"{np.median(without):.1f}", f"{np.median(with_reuse):.1f}",
                     f"{np.median(ratio):.2f}", "yes" if all(reused) else "no"])
    return rows, out


def peak_rss_mb(model: str, dtype: str, layer: int, fast: bool, threads: int | None) -> float:
    """Peak RSS of a fresh process that loads the extractor and extracts 64 prompts, batch 32.

    Read from the child's VmHWM (its own address space's high-water mark), not ``ru_maxrss``: Linux carries
    the maximum RSS across exec, so a child of this (large) benchmark process would report the parent's peak.
    """
    code = (
        "from difficulty_router import ActivationExtractor, load_outcomes\n"
        "from difficulty_router.datasets import ROUTELLM_MMLU_SAMPLE\n"
        f"e = ActivationExtractor({model!r}, dtype={dtype!r}, layers={layer}, batch_size=32, max_tokens=512, "
        f"threads={threads!r}"
        + ("" if fast else ", prefix_cache=False, lean_prefill=False, max_padding=0.99, max_batch_tokens=16384") + ")\n"
        "e.extract(load_outcomes(ROUTELLM_MMLU_SAMPLE).queries[:64], progress=False)\n"
        "import re\n"
        "print('RSS', int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(re.search(r"RSS ([0-9.]+)", out.stdout).group(1))


def interleaved_ab(model: str, layer: int, threads: int | None, prompts: list[str] | None, queries,
                   rounds: int = 3) -> tuple[str, dict]:
    """Paths timed query by query in turn, so a neighbour's load hits all of them alike: on a shared
    machine only this comparison is fair. Reports each path's p50 and the median of per-query ratios
    to float32 with a bootstrap 95% interval."""
    paths = {"float32": {}, "float32, framework forward": {"lean_prefill": False},
             "float32, before": {"prefix_cache": False, "lean_prefill": False, "max_padding": 0.99,
                                                "max_batch_tokens": 16384}}
    if cpu_has_int8_dot() and int8_supported():
        paths["int8"] = {"dtype": "int8"}
    extractors = {name: ActivationExtractor(model, layers=layer, max_tokens=2048, threads=threads,
                                            **{"dtype": "float32", **kw}) for name, kw in paths.items()}
    prompts = prompts or prompts_of(extractors["float32"], queries, 100, 8)
    times = {name: [] for name in extractors}
    for e in extractors.values():
        e.extract(prompts[:2], progress=False)
    for _ in range(rounds):
        for p in prompts:
            for name, e in extractors.items():
                start = time.perf_counter()
                e.extract([p], progress=False)
                times[name].append((time.perf_counter() - start) * 1000)
    rng = np.random.default_rng(0)
    base = np.array(times["float32"])
    rows, out = [], {}
    for name, t in times.items():
        ratio = np.array(t) / base
        boot = [np.median(rng.choice(ratio, len(ratio))) for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[name] = {"p50_ms": float(np.median(t)), "ratio_to_float32_median": float(np.median(ratio)),
                     "ratio_ci95": [float(lo), float(hi)], "ms": np.round(t, 2).tolist()}
        rows.append([name, f"{np.median(t):.1f}", f"{np.median(ratio):.2f} [{lo:.2f}, {hi:.2f}]"])
    n_tokens = np.mean([len(x) for x in extractors["float32"].tokenize(prompts)[0]])
    md = (f"Interleaved A/B, {len(prompts)} MMLU prompts of about {n_tokens:.0f} tokens x {rounds} rounds, one "
          f"query at a time, layer {layer}:\n\n"
          + md_table(["path", "p50 ms", "per-query time / float32, median [bootstrap 95% CI]"], rows))
    return md, out


def auto_choice(model: str, layer: int, threads: int | None) -> tuple[str, dict]:
    """What ``dtype="auto"`` chooses here, measured afresh (a temporary choice cache), as markdown and data."""
    build = functools.partial(ActivationExtractor, model, layers=layer, pooling="last", threads=threads)
    with tempfile.TemporaryDirectory() as directory:
        choice = choose_path(build, fingerprint(resolve(model)), layer, "last", 2048, Path(directory))
    rows = [[t.path, f"{t.ms_per_100_tokens:.1f}", f"{100 * t.error:.1f}%",
             "kept" if t.accepted else f"refused: {t.reason}"] for t in choice.trials]
    md = (f"What `dtype=\"auto\"` chose on this machine, measured afresh by `extraction.path_choice` "
          f"({path_choice.PROBE_PROMPTS} MMLU prompts, single queries, median of {path_choice.REPEATS} "
          f"interleaved passes; read-out error = worst relative L2 distance to float32's read-out, kept within "
          f"{100 * path_choice.READOUT_RTOL:.0f}%): **{choice.path}**.\n\n"
          + md_table(["path", "ms per 100 tokens", "read-out error", "verdict"], rows))
    return md, choice.describe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15, help="the router's read-out layer (hidden_states index)")
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts per length")
    parser.add_argument("--repeats", type=int, default=3, help="passes over them (p99 needs a few)")
    parser.add_argument("--emulated-bf16", action="store_true", help="also run bf16 where the CPU lacks it (slow)")
    parser.add_argument("--name", default=None, help="results file suffix (default: from the CPU model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the usable cores; on a machine other jobs load, fewer win)")
    parser.add_argument("--ab-only", action="store_true", help="only the interleaved A/B of the paths")
    args = parser.parse_args()
    load_before = os.getloadavg()
    match_threads(args.threads)  # before machine() below names the thread count
    slug = args.name or re.sub(r"[^a-z0-9]+", "-", machine().split(",")[0].lower()).strip("-")
    if args.ab_only:
        md, out = interleaved_ab(args.model, args.layer, args.threads, None,
                                 load_outcomes(ROUTELLM_MMLU_SAMPLE).queries, rounds=args.repeats)
        md = (f"On **{machine()}**, {torch.get_num_threads()} torch threads, load average "
              f"{tuple(round(x, 1) for x in load_before)} before and {tuple(round(x, 1) for x in os.getloadavg())} "
              f"after (the cores were shared with other jobs). {md}\n\nCommand: "
              f"`python benchmarks/overhead.py {' '.join(sys.argv[1:])}`.\n")
        write_results(f"overhead_ab_{slug}", md, {"machine": machine(), "load_before": load_before,
                                                  "load_after": os.getloadavg(), "paths": out})
        return

    paths = [("float32", True), ("float32", False)]
    if cpu_has_int8_dot() and int8_supported():
        paths.append(("int8", True))
    if cpu_has_bf16() or args.emulated_bf16:
        paths.append(("bfloat16", True))
    queries = load_outcomes(ROUTELLM_MMLU_SAMPLE).queries
    cpu = machine()
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512f"})
    payload: dict = {"machine": cpu, "flags": flags, "model": args.model, "layer": args.layer, "paths": []}
    rate_rows, rows, profile_rows, ttft, floors = [], [], [], [], []
    rates: dict[str, dict[int, float]] = {}
    auto_md, payload["auto_choice"] = auto_choice(args.model, args.layer, args.threads)
    print(auto_md, flush=True)
    for dtype, fast in paths:
        label = dtype if fast else f"{dtype}, before (no prefix cache, unbounded padding)"
        kwargs = {} if fast else {"prefix_cache": False, "lean_prefill": False, "max_padding": 0.99,
                                  "max_batch_tokens": 16384}
        extractor = ActivationExtractor(args.model, dtype=dtype, layers=args.layer, max_tokens=2048,
                                        threads=args.threads, **kwargs)
        config = extractor.model.config
        torch_dtype = extractor.dtype
        if dtype not in rates:
            rates[dtype] = {m: matmul_rate(config, torch_dtype, m) for m in (*TARGET_TOKENS, 4096)}
        entry: dict = {"dtype": dtype, "hot_path": fast, "lengths": {}}
        for target in TARGET_TOKENS:
            prompts = prompts_of(extractor, queries, target, args.prompts)
            n_tokens = np.array([len(x) for x in extractor.tokenize(prompts)[0]])
            lat = latencies(extractor, prompts, args.repeats)
            # The host's matmul rate drifts by 20-30% over minutes: measured again after each run of latencies,
            # the best of all measurements is the floor's rate (the stricter floor); floors are set at the end.
            rates[dtype][target] = max(rates[dtype][target], matmul_rate(config, torch_dtype, target))
            p50, p99 = np.percentile(lat, [50, 99])
            entry["lengths"][str(target)] = {"tokens_mean": float(n_tokens.mean()), "p50_ms": p50, "p99_ms": p99,
                                             "latencies_ms": lat.round(3).tolist()}
            rows.append([label, f"{n_tokens.mean():.0f}", f"{p50:.1f}", f"{p99:.1f}", "", "", "", "", ""])
            floors.append((len(rows) - 1, entry["lengths"][str(target)], n_tokens, dtype, target, config))
            print(rows[-1], flush=True)
        batch = queries[:64]
        extractor.batch_size = 32
        extractor.extract(batch[:4], progress=False)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            extractor.extract(batch, progress=False)
            times.append(time.perf_counter() - start)
        n_tokens = np.array([len(x) for x in extractor.tokenize(batch)[0]])
        flops = sum(args.layer * block_flops(config, n) for n in n_tokens)
        best = min(times)
        share = flops / best / rates[dtype][4096]
        rss = peak_rss_mb(args.model, dtype, args.layer, fast, args.threads)
        entry.update({"batch32_prompts_per_s": len(batch) / best, "batch32_share_of_matmul_rate": share,
                      "batch32_tokens_mean": float(n_tokens.mean()), "peak_rss_mb_batch32": rss,
                      "batch32_seconds": times})
        rows[-1][6:] = [f"{len(batch) / best:.1f}", f"{100 * share:.0f}%", f"{rss:.0f}"]
        if fast:
            hundred = prompts_of(extractor, queries, 100, 1)[0]
            shares = profile_share(extractor, hundred)
            entry["profile_100_tokens"] = shares
            profile_rows.append([dtype, *(f"{100 * shares[k]:.0f}%" for k in ("matmul", "attention", "other"))])
        if fast and dtype == paths[0][0]:
            ttft, payload["ttft_local_generation"] = ttft_rows(extractor, queries, repeats=TTFT_REPEATS,
                                                               count=TTFT_PROMPTS)
        payload["paths"].append(entry)
        print(rows[-1], flush=True)
        del extractor
    rate_rows = [[d, *(f"{r[m] / 1e9:.0f}" for m in (*TARGET_TOKENS, 4096))] for d, r in rates.items()]
    for row, length, n_tokens, dtype, target, config in floors:
        floor_ms = float(np.median([args.layer * block_flops(config, n) / rates[dtype][target] * 1000
                                    for n in n_tokens]))
        length.update({"floor_ms": floor_ms, "ratio_to_floor": length["p50_ms"] / floor_ms})
        rows[row][4:6] = [f"{floor_ms:.1f}", f"{length['p50_ms'] / floor_ms:.2f}x"]
    load = {"before": load_before, "after": os.getloadavg(), "threads": torch.get_num_threads()}
    payload["load_average"] = load
    payload["matmul_gflops"] = {d: {str(m): r / 1e9 for m, r in v.items()} for d, v in rates.items()}
    md = (f"Routing overhead vs the hardware floor on **{cpu}** (flags: {', '.join(flags) or 'none'}); "
          f"{args.model}, read-out layer {args.layer} (blocks above it never run).\n\n"
          + auto_md + "\n\n"
          "Matmul rate (GFLOP/s) of one block's linear layers at the given rows (best of a measurement before "
          "and one after each length's latencies):\n\n"
          + md_table(["path", *(f"{m} rows" for m in (*TARGET_TOKENS, 4096))], rate_rows)
          + "\n\nSingle query (one at a time, real MMLU text) and batch 32 (64 MMLU prompts, mean "
          f"{payload['paths'][0]['batch32_tokens_mean']:.0f} tokens); floor = FLOPs of the prompt's tokens through "
          "the blocks below the read-out / the matmul rate at those rows:\n\n"
          + md_table(["path", "tokens", "p50 ms", "p99 ms", "floor ms", "p50 / floor", "batch-32 prompts/s",
                      "batch share of matmul rate", "peak RSS MB (batch 32, fresh process)"], rows)
          + "\n\nWhere a 100-token query's time goes (torch profiler, self CPU time):\n\n"
          + md_table(["path", "matmuls", "attention", "other ops"], profile_rows)
          + f"\n\nTime to first token of a query routed to the extractor's own model ({paths[0][0]}, one token "
          "generated after the routing read-out), without and with reuse of the read-out's keys and values "
          "(with reuse only the blocks above the read-out run again):\n\n"
          + md_table(["tokens", "route + TTFT, no reuse, p50 ms", "with reuse, p50 ms", "ratio (median per query)",
                      "reused every call"], ttft)
          + f"\n\n{args.prompts} prompts x {args.repeats} passes per length (time to first token: {TTFT_PROMPTS} "
          f"prompts x {TTFT_REPEATS} passes), {load['threads']} torch threads; "
          f"load average (1, 5, 15 min) {tuple(round(x, 1) for x in load['before'])} before and "
          f"{tuple(round(x, 1) for x in load['after'])} after ({busy(load)}). The floor counts every prompt token, "
          "including the chat template's fixed prefix that the prefix cache skips, so very short prompts can run "
          f"under it. Command: `python benchmarks/overhead.py {' '.join(sys.argv[1:])}`.\n")
    write_results(f"overhead_{slug}", md, payload)


def busy(load: dict) -> str:
    """Whether other work shared the cores: the 1-minute load before the run against the core count."""
    cores = os.cpu_count() or 1
    if load["before"][0] < 0.5 * cores:
        return "the machine was otherwise idle; the load after is the benchmark's own"
    return "above half the core count before the run: other jobs shared the cores, so every figure is slower and noisier"


if __name__ == "__main__":
    main()
