"""Which numeric path an extractor runs (float32, bfloat16, float16 or int8), chosen by what the hardware does fast.

A router's overhead is bounded below by the matmul rate of the path it runs. On a CPU, ``dtype="auto"``
measures the paths the CPU offers once per machine and read-out (:mod:`.path_choice`). ``pick_dtype``
here is the capability rule used on GPUs, with ``$DIFFICULTY_ROUTER_AUTO=capability``, and for
explicit or pinned paths: bf16 where the CPU has native bf16 (AVX512-BF16 or AMX) or on a GPU,
dynamic int8 on CPUs without native bf16 for models listed in ``INT8_ACCEPTED``, float32 otherwise;
a pure function of the CPU's flags and the model.

int8 is named by ``torch.qint8``: the weights of every decoder block's linear layers are quantised
per output channel and activations are quantised per call (``torch.ao`` dynamic quantisation, on
x86 run by fbgemm's VNNI kernels); everything else (norms, attention, embeddings) stays float32.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch

DTYPE_ENV = "DIFFICULTY_ROUTER_DTYPE"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "qint8": torch.qint8,
}

#: What the extractor promises about one query's read-out computed twice, alone or batched beside
#: other prompts (left padding changes the kernels' shapes and summation order; int8 also quantises
#: activations with one scale per batch): the relative L2 error ``|a - b| / |b|`` of each (layer,
#: pooling) block stays below this. Measured on SmolLM2-135M: at most 1.0e-6 in float32, 1.1e-2 in
#: bfloat16 (native or emulated); int8 is far looser, 0.165 over 24 MMLU prompts at layer 15, because
#: dynamic quantisation takes one activation scale per batch (a long neighbour changes it).
#: Probabilities then agree to about ``1e-6`` (float32) and ``1e-2`` (bfloat16), so ``route`` and
#: ``route_batch`` can only disagree on a query whose decision margin is within that.
FEATURE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2, torch.qint8: 0.25}

#: What follows from ``FEATURE_RTOL`` for one query's calibrated P(success), routed alone and in a batch
#: (absolute): measured at most 6e-7 in float32 and 7e-3 in bfloat16 on the shipped sample's router.
PROBA_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

#: Local generation's token log-probabilities (nats, absolute) against one full forward pass over prompt
#: and answer (incremental decoding with a KV cache rounds each step differently): measured at most 7e-6
#: in float32 and 0.05 in bfloat16.
LOGPROB_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25}

#: Local generation that starts from the routing read-out's kept prefill (``LocalGenerator`` with
#: ``reuse_routing_prefill``) against a fresh prefill of the same prompt: the log-probabilities (nats,
#: absolute) of the tokens both chose. float32 gives the same answer to rounding (measured at most 9e-6
#: over 30 prompts, 16 tokens each, read-out at layer 9). bfloat16 runs the two prefills through
#: different kernels and rounds them differently: measured at most 0.18 nats on 30 prompts with native
#: bf16 (Intel Xeon with AMX), and the greedy answers parted on 3 of the 30, each at a step where the
#: fresh pass's two best tokens lay within ``2 x`` this bound. bf16 promises that, not the same text.
PREFILL_REUSE_ATOL = {torch.float32: 1e-4, torch.bfloat16: 0.25}

#: Models whose int8 path kept routing quality on RouteLLM MMLU within the 95% interval of float32
#: (benchmarks/int8_quality.py; results in benchmarks/results/int8_quality_*.md) and was faster than
#: float32 (benchmarks/overhead.py). Only these get int8 from ``dtype="auto"``; any model can still ask
#: for ``dtype="int8"``. Empty for now: SmolLM2-135M with the current scheme passed the quality check
#: (1,500 rows) and took 0.76x float32's time on a loaded machine, but turning it on changes the path the
#: test suite and local generation take on every CPU without bf16 and waits for a full test run.
INT8_ACCEPTED: frozenset[str] = frozenset()


#: Linear layers the int8 path leaves in float32. The MLP's down projection reads the SiLU-gated
#: intermediate, whose few huge channels wreck a per-tensor activation scale: on SmolLM2-135M,
#: quantising every linear moved the layer-15 read-out by 26-44% (relative L2) against float32,
#: all but down_proj by 11-13%, down_proj alone by 27-32%. It is a quarter of a block's FLOPs.
INT8_KEEP_FLOAT: tuple[str, ...] = ("down_proj",)
#: Names the int8 scheme in feature-cache keys, so rows of an earlier scheme are never served.
INT8_SCHEME = "dyn-perchannel-keep-down_proj"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', 'float16' or 'int8': how manifests, cache keys and reports name a path."""
    return "int8" if dtype == torch.qint8 else str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=1)
def _cpuinfo_field(*names: str) -> str | None:
    """The first /proc/cpuinfo line starting with one of ``names``, after its colon (None where there is
    no such file or line, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(names):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    return frozenset((_cpuinfo_field("flags", "Features") or "").split())


def cpu_model_name() -> str:
    """The CPU's model name, as ``lscpu`` shows it where /proc/cpuinfo has one."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """VNNI (AVX512 or AVX) or ARM's dot-product instructions: where int8 matmuls beat float32."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "asimddp"})


def int8_supported() -> bool:
    return (
        "x86" in torch.backends.quantized.supported_engines or "qnnpack" in torch.backends.quantized.supported_engines
    )


def pick_dtype(dtype: Any, device: torch.device, model_id: str = "") -> torch.dtype:
    """An explicit dtype wins; ``"auto"`` takes $DIFFICULTY_ROUTER_DTYPE if set, else the device's fast path.

    The variable lets a deployment (or a test run) pin one numeric path for every extractor a
    process builds, the server's and the CLI's included, e.g. bf16 on a CPU without native bf16
    to reproduce what a machine with AMX computes.
    """
    if isinstance(dtype, torch.dtype):
        return _checked(dtype, device)
    if dtype in (None, "auto"):
        forced = os.environ.get(DTYPE_ENV, "").strip().lower()
        if forced and forced != "auto":
            if forced not in _DTYPES:
                raise ValueError(
                    f"${DTYPE_ENV}={forced!r} is not a dtype; expected 'auto', 'float32', "
                    "'bfloat16', 'float16' or 'int8'"
                )
            return _checked(_DTYPES[forced], device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type != "cpu":
            return torch.float32
        if cpu_has_bf16():
            return torch.bfloat16
        if model_id in INT8_ACCEPTED and cpu_has_int8_dot() and int8_supported():
            return torch.qint8
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto', 'float32', 'bfloat16', 'float16' or 'int8'")
    return _checked(_DTYPES[dtype], device)


def auto_unpinned(dtype: Any) -> bool:
    """Whether ``dtype`` leaves the path to the library: "auto" (or None) with $DIFFICULTY_ROUTER_DTYPE unset."""
    if dtype not in (None, "auto"):
        return False
    return os.environ.get(DTYPE_ENV, "").strip().lower() in ("", "auto")


def one_path_for_many_processes(dtype: Any, device: torch.device) -> Any:
    """``dtype`` for an extractor in one of many processes of one job (Ray workers, Serve replicas): "auto"
    becomes the capability rule's path, so the processes run one numeric path (timing the paths in each
    would let them choose differently, and they would race one another while timing)."""
    return dtype_name(pick_dtype(dtype, device)) if auto_unpinned(dtype) else dtype


def _checked(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.qint8 and device.type != "cpu":
        raise ValueError(f"the int8 path is CPU-only (dynamic quantisation); this extractor runs on {device}")
    return dtype


def weights_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the model is loaded in: int8 quantises a float32 model."""
    return torch.float32 if dtype == torch.qint8 else dtype


def quantise_int8(
    blocks: torch.nn.ModuleList,
    keep_float: tuple[str, ...] = INT8_KEEP_FLOAT,
    float_weights: Callable[[str], dict[str, torch.Tensor] | None] | None = None,
) -> None:
    """Dynamic int8 (per output channel) on the nn.Linear layers of the decoder blocks, in place, except
    those named in ``keep_float``.

    ``float_weights(name)``, given a linear's dotted name within ``blocks`` (``"0.self_attn.q_proj"``),
    may return its ``weight`` (and ``bias``) read afresh from the weights file: quantising from those
    leaves the module's memory-mapped float32 weights untouched, so they never become resident.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "qnnpack"
    with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        for parent_name, parent in list(blocks.named_modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and name not in keep_float:
                    fresh = float_weights(f"{parent_name}.{name}".lstrip(".")) if float_weights else None
                    if fresh is not None:
                        shape = (child.in_features, child.out_features)
                        child = torch.nn.Linear(*shape, bias=child.bias is not None, device="meta")
                        child.load_state_dict(fresh, assign=True)
                    qconfig = {torch.nn.Linear: per_channel_dynamic_qconfig}
                    wrapped = quantize_dynamic(torch.nn.Sequential(child), qconfig)
                    setattr(parent, name, wrapped[0])


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def match_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` or, by default, to no more than the usable cores.

    More compute threads than cores makes every matmul wait on the slowest preempted thread; torch
    counts the host's cores, which a cpuset or a shared VM may not give us. Returns the count set.
    """
    want = threads if threads is not None else min(torch.get_num_threads(), usable_cores())
    if want < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return want
