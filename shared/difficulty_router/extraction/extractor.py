"""Pre-generation activations of a representative causal LM, read where generation starts.

The read-out is the residual stream after decoder block ``l`` (Hugging Face's
``hidden_states[l]``: 0 is the embeddings, the last one is post final-norm), taken at the
end of the chat-templated prompt with the generation prompt appended. The forward pass
stops after the deepest requested block: routing needs no logits.

Around it: the read-out specs and :class:`Extraction` in :mod:`.readout`, batching, padding and
pooling in :mod:`.batching`, the framework's hooked forward in :mod:`.framework_forward`, the lean
path in :mod:`.lean_prefill`.

Why this module is long: what stays here (a little over 400 lines) is the state one extractor owns
and must keep consistent under its forward lock: the model, the cached prefix, the feature cache,
the checked lean path and the kept prefill. Split further, each piece would reach into the others'
state across a module boundary, and the lock's reasoning would be spread over files. (The numeric
path is chosen in :mod:`.path_choice`.)
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from difficulty_router.data.queries import to_conversations
from difficulty_router.extraction.batching import left_padded, length_batches, pooled_features
from difficulty_router.extraction.feature_cache import FeatureCache
from difficulty_router.extraction.framework_forward import decoder_layers, framework_readout, pick_device
from difficulty_router.extraction.lean_prefill import LeanPrefill, matches_reference
from difficulty_router.extraction.model_store import (
    DEFAULT_MODEL,
    ModelSource,
    fingerprint,
    load_model_and_tokenizer,
    resolve,
)
from difficulty_router.extraction.numerics import (
    FEATURE_RTOL,
    INT8_SCHEME,
    dtype_name,
    match_threads,
    quantise_int8,
    weights_dtype,
)
from difficulty_router.extraction.path_choice import NumericPath, ReadoutQuality, resolve_numeric_path
from difficulty_router.extraction.prefix_kv import PrefixState, compute_prefix
from difficulty_router.extraction.prompting import PromptTokenizer
from difficulty_router.extraction.readout import (
    Extraction,
    normalise_layers,
    normalise_pooling,
)
from difficulty_router.extraction.weight_files import block_weights_from_file

logger = logging.getLogger(__name__)


@dataclass
class KeptPrefill:
    """One prompt's read-out prefill, stopped after block ``depth``: what generation needs to go on from there."""

    ids: tuple[int, ...]
    depth: int
    hidden: torch.Tensor  # hidden_states[depth] of the positions that ran (the suffix after a cached prefix)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # blocks below depth: keys and values over the whole prompt
    position_ids: torch.Tensor
    skip: int  # tokens of the cached prefix in front


class ActivationExtractor:
    """Turn queries into pre-generation activation features of a causal LM.

    Args:
        model: a short name (``"smollm2-135m"``, the embedded default), a local
            directory with safetensors, a ``.gguf`` file, or a Hugging Face hub id.
        gguf_file: name of the GGUF file inside ``model`` when ``model`` is a directory.
        layers: default read-out layers (ints index ``hidden_states``; floats are depth fractions).
        pooling: ``"last"`` (end-of-prompt token), ``"mean"`` (masked mean) or ``"both"``.
        device: ``"auto"`` picks cuda, then mps, then cpu.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"int8"`` (CPU dynamic quantisation of the
            decoder blocks' linear layers) or ``"auto"``: $DIFFICULTY_ROUTER_DTYPE when set; else, on a
            CPU, the fastest path whose read-out stays within 5% of float32's (or, with ``quality``, whose
            consumer's output does), measured once per machine and read-out and cached
            (:mod:`.path_choice`; the choice and its timings are in ``numeric_path``, and logged);
            with ``$DIFFICULTY_ROUTER_AUTO=capability``, or on a GPU, by capability: bf16 on GPUs and on
            CPUs with native bf16 (AVX512-BF16 or AMX), float32 otherwise. Features agree across dtypes
            and batch compositions only to the dtype's precision: see ``FEATURE_RTOL``.
        max_tokens: longer prompts keep their last ``max_tokens`` tokens (the question sits at the end).
        batch_size, max_batch_tokens: bounds of one forward pass (queries, and padded tokens: this bounds
            the activations' memory).
        max_padding: the largest share of a batch's tokens that may be padding; prompts are sorted by
            length and a batch is closed before it would pad more.
        prefix_cache: reuse the chat template's fixed prefix (keys, values, hidden-state sums), computed once.
        lean_prefill: run Llama-style blocks in a plain loop instead of the framework's forward (no per-call
            mask, rotary or cache objects; see ``lean_prefill``); used only after it matched the framework's
            read-out at start-up, so False is for measuring the difference.
        threads: torch's compute threads; by default no more than the cores this process may use.
        feature_cache: a directory or FeatureCache that memoises rows across runs.
        quality: how "auto" judges a path for a known consumer of the read-out (a router's probe; see
            :class:`.path_choice.ReadoutQuality`); by default the read-out's distance to float32's.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        gguf_file: str | None = None,
        layers: Any = 0.5,
        pooling: str | Sequence[str] = "last",
        device: str = "auto",
        dtype: Any = "auto",
        max_tokens: int = 2048,
        batch_size: int = 16,
        max_batch_tokens: int = 4096,
        max_padding: float = 0.125,
        prefix_cache: bool = True,
        lean_prefill: bool = True,
        threads: int | None = None,
        feature_cache: FeatureCache | str | None = None,
        quality: ReadoutQuality | None = None,
    ) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"max_padding must lie in [0, 1), got {max_padding!r}")
        self.source: ModelSource = resolve(model, gguf_file)
        self.device = pick_device(device)
        self.threads = match_threads(threads) if self.device.type == "cpu" else None

        # one numeric path's extractor, for "auto" to time: the same model and read-out, no feature cache
        build = functools.partial(ActivationExtractor, model, gguf_file=gguf_file, layers=layers, pooling=pooling)
        build = functools.partial(build, device=device, max_tokens=max_tokens, threads=threads)
        self.numeric_path: NumericPath = resolve_numeric_path(
            dtype, self.device, self.source, build, (layers, pooling, max_tokens), quality
        )
        self.dtype = self.numeric_path.dtype
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.model, tokenizer = load_model_and_tokenizer(self.source, weights_dtype(self.dtype), self.device)
        self.model_hash = fingerprint(self.source)
        self.n_layers = int(self.model.config.num_hidden_layers)
        self.hidden_size = int(self.model.config.hidden_size)
        self._blocks = decoder_layers(self.model)
        if self.dtype == torch.qint8:
            quantise_int8(self._blocks, float_weights=block_weights_from_file(self.model, self._blocks))
        self._base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        self.prompts = PromptTokenizer(tokenizer, max_tokens)
        self.layers = normalise_layers(layers, self.n_layers)
        self.pooling = normalise_pooling(pooling)
        if isinstance(feature_cache, (str, os.PathLike)):
            feature_cache = FeatureCache(feature_cache)
        self.feature_cache = feature_cache
        # Read-outs are captured by hooks on the shared model: concurrent forwards would see each other's.
        self._forward_lock = threading.Lock()
        self.prefix_cache = prefix_cache
        self.prefix: PrefixState | None = None
        self._prefix_for(max(self.layers))
        self._lean: LeanPrefill | None = None
        # A local generator on this model can finish a single-query read-out instead of redoing it, within
        # the scope of the routed call that asked for it (keeping_prefill): nothing outlives that call.
        self._keeping_prefill = 0
        self._kept: KeptPrefill | None = None
        if lean_prefill:
            self._lean = self._checked_lean()

    @property
    def tokenizer(self):
        return self.prompts.tokenizer

    @property
    def max_tokens(self) -> int:
        return self.prompts.max_tokens

    @max_tokens.setter
    def max_tokens(self, value: int) -> None:
        self.prompts.max_tokens = value

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def _cache_key(self) -> str:
        """What cached rows are filed under: the weights, and the numeric path unless it is float32
        (bf16 and int8 rows differ from float32 ones by 1-3%, so one must never be served for another;
        float32 keeps the plain weight hash, so caches written before this distinction stay valid)."""
        if self.dtype == torch.float32:
            return self.model_hash
        if self.dtype == torch.qint8:
            return f"{self.model_hash}|int8:{INT8_SCHEME}"
        return f"{self.model_hash}|{dtype_name(self.dtype)}"

    def describe(self) -> dict:
        """What a saved router records to recognise this extractor later."""
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "max_tokens": self.max_tokens,
        }

    # -- prompt rendering -------------------------------------------------------------
    def render(self, query: Any) -> str:
        """The exact text the model reads: chat template plus generation prompt."""
        return self.prompts.render(to_conversations([query])[0])

    def tokenize(self, queries: Sequence[Any]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per query (left-truncated to max_tokens) and whether each was truncated."""
        return self.prompts.tokenize(queries)

    # -- extraction -------------------------------------------------------------------
    def extract(
        self,
        queries: Sequence[Any],
        *,
        layers: Any = None,
        pooling: str | Sequence[str] | None = None,
        progress: bool | None = None,
    ) -> Extraction:
        """Features for ``queries`` (strings or chat conversations), one row each, float32."""
        layer_idx = self.layers if layers is None else normalise_layers(layers, self.n_layers)
        pools = self.pooling if pooling is None else normalise_pooling(pooling)
        ids, truncated = self.tokenize(queries)
        with self._forward_lock:
            self._prefix_for(max(layer_idx))
        n = len(ids)
        width = len(layer_idx) * len(pools) * self.hidden_size
        features = np.empty((n, width), dtype=np.float32)
        todo = list(range(n))
        cache = self.feature_cache
        if cache is not None:
            todo = []
            for i, x in enumerate(ids):
                row = cache.load(self._cache_key, layer_idx, pools, x, self.hidden_size)
                if row is None:
                    todo.append(i)
                else:
                    features[i] = row
        if progress is None:
            progress = len(todo) > 4 * self.batch_size
        with tqdm(total=len(todo), disable=not progress, desc="extracting", unit="query") as bar:
            for batch, prefixed in self._batches(todo, ids):
                features[batch] = self._forward([ids[i] for i in batch], layer_idx, pools, prefixed)
                if cache is not None:
                    for i in batch:
                        cache.store(self._cache_key, layer_idx, pools, ids[i], features[i], self.hidden_size)
                bar.update(len(batch))
        if n > 1:  # a batch's read-outs serve no one routed call: keep none (its buckets may run one by one)
            with self._forward_lock:
                self._kept = None
        if truncated.any():
            logger.info(
                "%d of %d prompts were longer than %d tokens and kept their last tokens",
                int(truncated.sum()),
                n,
                self.max_tokens,
            )
        return Extraction(
            features=features,
            layers=layer_idx,
            pooling=pools,
            hidden_size=self.hidden_size,
            n_tokens=np.array([len(x) for x in ids], dtype=np.int64),
            truncated=truncated,
            model_id=self.model_id,
            model_hash=self.model_hash,
        )

    __call__ = extract

    def readout_latency_ms(self, queries: Sequence[Any], layer: int) -> float:
        """Median wall time (ms) of one query's forward up to ``layer``, one at a time, feature cache bypassed:
        what routing a query costs on this machine with this read-out (tokenising excluded, ~1%)."""
        layer_idx = normalise_layers(layer, self.n_layers)
        ids, _ = self.tokenize(queries)
        with self._forward_lock:
            self._prefix_for(max(layer_idx))
        times = []
        for x in [ids[0], *ids]:  # the first run warms up
            start = time.perf_counter()
            self._forward([x], layer_idx, ("last",), self._uses_prefix(x))
            times.append((time.perf_counter() - start) * 1000)
        return float(np.median(times[1:]))

    def _prefix_for(self, deepest: int) -> None:
        """Have the cached prefix cover blocks up to ``deepest`` (computed at most once per depth)."""
        if self.prefix_cache and (self.prefix is None or len(self.prefix.hidden_sum) <= deepest):
            self.prefix = compute_prefix(
                self._base, self._blocks, self.model.config, self.prompts.prefix_ids, max(deepest, 1), self.device
            )

    def _checked_lean(self) -> LeanPrefill | None:
        """The lean prefill if this model's blocks are Llama's and it reproduces the framework's read-out:
        two prompts of different lengths (so padding is covered), with and without the cached prefix,
        through the first blocks (every block runs the same code)."""
        positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        lean = LeanPrefill.build(self._base, self._blocks, self.model.config, positions, self.device)
        if lean is None:
            return None
        ids = self.tokenize(["Is the lean path exact?", "Which of these is a prime number: 4, 6 or 7?"])[0]
        layer = (max(1, min(2, max(self.layers))),)
        variants = [False]
        if self.prefix is not None and all(self._uses_prefix(x) for x in ids):
            variants.append(True)
        rtol = FEATURE_RTOL.get(self.dtype, 1e-5)
        for prefixed in variants:
            reference = self._forward(ids, layer, ("last", "mean"), prefixed)
            self._lean = lean
            try:
                candidate = self._forward(ids, layer, ("last", "mean"), prefixed)
            finally:
                self._lean = None
            if not matches_reference(torch.from_numpy(candidate), torch.from_numpy(reference), rtol):
                logger.warning(
                    "%s: the lean prefill disagreed with the framework's forward; using the latter", self.model_id
                )
                return None
        return lean

    @contextmanager
    def keeping_prefill(self) -> Iterator[ActivationExtractor]:
        """Within this block, a single-query read-out keeps its keys and values for :meth:`take_prompt_cache`;
        on leaving it, whatever is still kept is dropped. One routed call opens it around its routing
        read-out and its generation, so a server never holds the last query's keys and values."""
        with self._forward_lock:
            self._keeping_prefill += 1
        try:
            yield self
        finally:
            with self._forward_lock:
                self._keeping_prefill -= 1
                if not self._keeping_prefill:
                    self._kept = None

    @property
    def holds_prefill(self) -> bool:
        """Does this extractor hold a read-out's keys and values (kept for a generation to take)?"""
        return self._kept is not None

    def take_prompt_cache(self, ids: Sequence[int]):
        """Every layer's keys and values for ``ids[:-1]`` (a transformers cache), made by finishing the kept
        read-out of exactly these token ids through the blocks above it; None when none was kept (a
        cached feature row, a batch, the framework's forward, another prompt since, or outside
        :meth:`keeping_prefill`). Used once.

        This is the routing prefill reused for generation: a query routed to this very model pays only
        the blocks above the read-out, not a second prefill of the whole prompt."""
        from transformers import DynamicCache

        with self._forward_lock:
            kept, self._kept = self._kept, None
            if kept is None or self._lean is None or kept.ids != tuple(ids) or len(ids) < 2:
                return None
            prefix_kv = None
            if kept.skip:
                self._prefix_for(self.n_layers)
                assert self.prefix is not None and len(self.prefix) == kept.skip
                prefix_kv = self.prefix.kv
            kv = list(kept.kv)
            self._lean.resume(kept.hidden, kept.depth, self.n_layers, kept.position_ids, prefix_kv, kv)
            cut = len(ids) - 1  # generation runs the last token itself, through every layer
            data = [(k[:, :, :cut].contiguous(), v[:, :, :cut].contiguous()) for k, v in kv]
            return DynamicCache(ddp_cache_data=data, config=self.model.config)

    def _uses_prefix(self, x: list[int]) -> bool:
        p = self.prefix
        return p is not None and len(x) > len(p) and tuple(x[: len(p)]) == p.ids

    def _batches(self, todo: list[int], ids: list[list[int]]) -> list[tuple[list[int], bool]]:
        """Length buckets of ``todo`` (see :func:`.batching.length_batches`)."""
        prefix_len = len(self.prefix) if self.prefix is not None else 0
        return length_batches(
            todo, ids, self._uses_prefix, prefix_len, self.batch_size, self.max_batch_tokens, self.max_padding
        )

    def _forward(
        self, batch_ids: list[list[int]], layer_idx: tuple[int, ...], pools: tuple[str, ...], prefixed: bool = False
    ) -> np.ndarray:
        with self._forward_lock:
            return self._forward_locked(batch_ids, layer_idx, pools, prefixed)

    @torch.inference_mode()
    def _forward_locked(
        self, batch_ids: list[list[int]], layer_idx: tuple[int, ...], pools: tuple[str, ...], prefixed: bool
    ) -> np.ndarray:
        self._kept = None  # a read-out's keys and values are kept for the prompt it read last, or not at all
        prefix = self.prefix if prefixed else None
        skip = len(prefix) if prefix is not None else 0
        rows = [x[skip:] for x in batch_ids]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        input_ids, mask, position_ids = left_padded(rows, pad_id, skip)
        input_ids, position_ids = input_ids.to(self.device), position_ids.to(self.device)
        if self._lean is not None:
            kv = prefix.kv if prefix is not None else None
            keep_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = (
                [] if self._keeping_prefill and len(rows) == 1 else None
            )
            captured = self._lean.run(input_ids, mask.to(self.device), position_ids, layer_idx, kv, keep_kv)
            if keep_kv is not None:
                depth = max(layer_idx)
                self._kept = KeptPrefill(tuple(batch_ids[0]), depth, captured[depth], keep_kv, position_ids, skip)
        else:
            captured = framework_readout(
                self._base,
                self._blocks,
                self.model.config,
                self.device,
                input_ids,
                mask,
                position_ids,
                layer_idx,
                prefix,
            )
        final_norm = self._base.norm if hasattr(self._base, "norm") else None
        features = pooled_features(captured, layer_idx, pools, mask.to(self.device), prefix, final_norm, self.n_layers)
        return features.cpu().numpy()
