"""Rungs a cascade can call: a local transformers model, or any OpenAI-compatible endpoint.

A local rung is an :class:`ActivationExtractor`'s own model: the prefill of its generation
also yields the hidden state that the P(IK) probe reads, so one forward pass serves the
answer and the "do I know this" signal. An endpoint rung gets P(T) from ``logprobs``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difficulty_router.calling.confidence import MissingLogprobsError, openai_token_logprobs
from difficulty_router.data.queries import to_conversations
from difficulty_router.extraction.extractor import ActivationExtractor
from difficulty_router.extraction.prefix_kv import PrefixState
from difficulty_router.extraction.readout import normalise_layers, normalise_pooling
from difficulty_router.learning.probes import SuccessProbe


@dataclass
class Generation:
    text: str
    tokens: list[str] | None
    logprobs: list[float] | None
    prompt_tokens: int
    completion_tokens: int
    pik: float | None = None
    features: np.ndarray | None = None  # the prefill read-out, when the generator was asked for one


class PIKProbe:
    """P(IK): a calibrated probe on a model's own pre-generation activations for "I will get this right"."""

    def __init__(self, probe: SuccessProbe, *, layers: Sequence[int], pooling: Sequence[str], model_hash: str) -> None:
        self.probe = probe
        self.layers = tuple(int(x) for x in layers)
        self.pooling = normalise_pooling(pooling)
        self.model_hash = model_hash

    @classmethod
    def fit(
        cls,
        extractor: ActivationExtractor,
        queries: Sequence[Any],
        correct: Sequence[float],
        *,
        layers: Any = 0.5,
        pooling: str = "last",
        cv: int = 5,
        progress: bool | None = None,
        features: np.ndarray | None = None,
    ) -> PIKProbe:
        """Fit on the model's own outcomes: ``correct[i]`` says whether it answered ``queries[i]`` right."""
        layer_idx = normalise_layers(layers, extractor.n_layers)
        if features is None:
            features = extractor.extract(queries, layers=layer_idx, pooling=pooling, progress=progress).features
        y = np.asarray(correct, dtype=np.float64).reshape(-1, 1)
        probe = SuccessProbe(cv=cv).fit(features, y, names=["self"])
        return cls(probe, layers=layer_idx, pooling=pooling, model_hash=extractor.model_hash)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        return self.probe.predict_proba(np.atleast_2d(features))[:, 0]

    def score(self, extractor: ActivationExtractor, queries: Sequence[Any]) -> np.ndarray:
        self._check(extractor)
        return self.predict_features(
            extractor.extract(queries, layers=self.layers, pooling=self.pooling, progress=False).features
        )

    def _check(self, extractor: ActivationExtractor) -> None:
        if extractor.model_hash != self.model_hash:
            raise ValueError("this P(IK) probe was trained on another model's activations; it only reads its own model")

    def save(self, directory: str | os.PathLike) -> Path:
        """``pik.json`` (read-out, model hash, and the sha256 of the arrays) and ``pik.safetensors``."""
        import json

        from difficulty_router.learning.bundle import write_arrays

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays_sha256 = write_arrays(directory / "pik.safetensors", self.probe.arrays("pik"))
        (directory / "pik.json").write_text(
            json.dumps(
                {
                    "layers": list(self.layers),
                    "pooling": list(self.pooling),
                    "model_hash": self.model_hash,
                    "arrays_sha256": arrays_sha256,
                },
                indent=2,
            )
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PIKProbe:
        """Load a saved probe; refuses a bundle whose arrays do not match their recorded hash, or a malformed one."""
        from difficulty_router.learning.bundle import field, load_arrays, read_manifest

        directory = Path(directory)
        for name in ("pik.json", "pik.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} holds no {name}; not a saved P(IK) probe")
        where = str(directory / "pik.json")
        meta = read_manifest(directory / "pik.json")
        layers, pooling = field(meta, "layers", "list", where), field(meta, "pooling", "list", where)
        model_hash = field(meta, "model_hash", "str", where)
        digest = field(meta, "arrays_sha256", "str", where)
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise ValueError(f"{where}: the field 'layers' must be a non-empty list of integers")
        arrays, _ = load_arrays(directory / "pik.safetensors", digest)
        try:
            probe = SuccessProbe.from_arrays(arrays, "pik")
            return cls(probe, layers=layers, pooling=pooling, model_hash=model_hash)
        except KeyError as exc:
            raise ValueError(f"{directory / 'pik.safetensors'} lacks the array {exc.args[0]!r}") from None
        except (TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{directory}: the saved P(IK) probe is inconsistent ({exc})") from None


class LocalGenerator:
    """Greedy generation with a local model, returning token log-probabilities and, with a probe, P(IK)."""

    def __init__(
        self,
        extractor: ActivationExtractor,
        *,
        name: str | None = None,
        pik_probe: PIKProbe | None = None,
        max_new_tokens: int = 32,
        readout: tuple[Any, str | Sequence[str]] | None = None,
        reuse_routing_prefill: bool = True,
    ) -> None:
        """``readout`` = (layers, pooling) also returns the prefill's read-out in ``Generation.features``
        (for training a P(IK) probe from the same pass); a ``pik_probe`` brings its own read-out.

        ``reuse_routing_prefill``: when a router reading this same extractor has just routed the query
        here, inside :meth:`reusing_routing_prefill` (which :class:`~difficulty_router.Cascade` opens per
        query), generation starts from that read-out's keys and values and runs only the blocks above
        it (``ActivationExtractor.take_prompt_cache``); the answer is the same. Not with a ``readout``,
        which needs the whole prompt's hidden states."""
        if pik_probe is not None:
            pik_probe._check(extractor)
            readout = (pik_probe.layers, pik_probe.pooling)
        normalised: tuple[tuple[int, ...], tuple[str, ...]] | None = None
        if readout is not None:
            normalised = (normalise_layers(readout[0], extractor.n_layers), normalise_pooling(readout[1]))
        self.readout = normalised
        self.extractor = extractor
        self.name = name or extractor.model_id
        self.pik_probe = pik_probe
        self.max_new_tokens = max_new_tokens
        self.reuse_routing_prefill = reuse_routing_prefill and normalised is None
        self.reused_prefill = False

    def reusing_routing_prefill(self) -> AbstractContextManager[Any]:
        """The scope of one routed call: a routing read-out of a single query taken inside it keeps its
        keys and values for this generator's next :meth:`generate` of that query; leaving it drops
        them. Nothing is kept outside it, nor when ``reuse_routing_prefill`` is off."""
        return self.extractor.keeping_prefill() if self.reuse_routing_prefill else nullcontext()

    @property
    def n_params(self) -> int:
        """Parameters touched per token (embeddings excluded): the 2 x params x tokens FLOPs rule."""
        model = self.extractor.model
        embed = model.get_input_embeddings().weight.numel()
        return int(sum(p.numel() for p in model.parameters()) - embed)

    @torch.inference_mode()
    def generate(self, query: Any, *, max_new_tokens: int | None = None) -> Generation:
        ext = self.extractor
        ids, _ = ext.tokenize([query])
        input_ids = torch.tensor([ids[0]], dtype=torch.long, device=ext.device)
        readout = self.readout
        want_hidden = readout is not None
        tok = ext.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cache = ext.take_prompt_cache(ids[0]) if self.reuse_routing_prefill else None
        extra = {PrefixState.cache_kwarg(ext._base): cache} if cache is not None else {}
        self.reused_prefill = cache is not None
        with ext._forward_lock:
            out = ext.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                **extra,
                do_sample=False,
                max_new_tokens=max_new_tokens or self.max_new_tokens,
                output_scores=True,
                output_hidden_states=want_hidden,
                return_dict_in_generate=True,
                pad_token_id=pad,
            )
        new = out.sequences[0, input_ids.shape[1] :]
        scores = torch.stack(out.scores, dim=0)[:, 0, :].float()
        logprobs = torch.log_softmax(scores, dim=-1).gather(1, new[:, None])[:, 0]
        eos = set(np.atleast_1d(ext.model.generation_config.eos_token_id or []).tolist())
        keep = [i for i, t in enumerate(new.tolist()) if t not in eos]
        token_ids = [int(new[i]) for i in keep]
        pik = features = None
        if readout is not None:
            prefill = out.hidden_states[0]  # one tensor per layer for the prompt, hidden_states convention
            blocks = []
            layers, pooling = readout
            for layer in layers:
                hidden = prefill[layer][0].float()
                for pool in pooling:
                    blocks.append(hidden[-1] if pool == "last" else hidden.mean(0))
            features = torch.cat(blocks).cpu().numpy()
            if self.pik_probe is not None:
                pik = float(self.pik_probe.predict_features(features)[0])
        return Generation(
            text=tok.decode(token_ids, skip_special_tokens=True),
            tokens=[tok.decode([t]) for t in token_ids],
            logprobs=[float(logprobs[i]) for i in keep],
            prompt_tokens=int(input_ids.shape[1]),
            completion_tokens=len(new),
            pik=pik,
            features=features,
        )


class OpenAIGenerator:
    """An OpenAI-compatible chat endpoint asked for logprobs (the black-box rung)."""

    def __init__(
        self,
        model: str,
        *,
        name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        client: Any = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        timeout: float = 60.0,
    ) -> None:
        if client is None:
            from openai import OpenAI

            client = OpenAI(
                base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused", timeout=timeout
            )
        self.client = client
        self.model = model
        self.name = name or model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def generate(self, query: Any, *, max_new_tokens: int | None = None) -> Generation:
        messages = to_conversations([query])[0]
        response = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            logprobs=True,
            top_logprobs=1,
            temperature=self.temperature,
            max_tokens=max_new_tokens or self.max_new_tokens,
        )
        text = response.choices[0].message.content or ""
        try:
            tokens, logprobs = openai_token_logprobs(response)
        except MissingLogprobsError:
            tokens, logprobs = None, None
        usage = response.usage
        return Generation(
            text=text,
            tokens=tokens,
            logprobs=logprobs,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )
