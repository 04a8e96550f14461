"""The chat template's fixed prefix, run through the model once and reused by every prompt that starts with it.

SmolLM2's template opens every conversation without a system message with a default system prompt:
22 of the ~32 tokens of "Hello there", about a fifth of a 100-token question. Attention is causal,
so the keys and values of those positions (and their hidden states, which mean pooling averages
over) do not depend on what follows: computed once, they are exactly what a full pass recomputes
per call. Only the suffix then runs, attending to the cached keys.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixState:
    """Per layer: the prefix's keys and values (batch 1) and the sum of its hidden states over positions."""

    ids: tuple[int, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    hidden_sum: tuple[torch.Tensor, ...]  # index l is hidden_states[l] summed over the prefix, float32

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def cache_kwarg(base) -> str:
        """transformers renamed ``past_key_values`` to ``cache`` (5.x); pass whichever this version takes."""
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def cache_for(self, batch: int, config):
        """A fresh DynamicCache holding the prefix for ``batch`` rows (the model appends to it, so never shared)."""
        from transformers import DynamicCache

        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv]
        return DynamicCache(ddp_cache_data=data, config=config)


@torch.inference_mode()
def compute_prefix(base, blocks, config, ids: tuple[int, ...], depth: int, device: torch.device) -> PrefixState | None:
    """Run ``ids`` through the first ``depth`` blocks once (no deeper: their weights stay untouched, so
    out of memory, when routing never reads them); None when there is no prefix worth caching."""
    if len(ids) < 2:
        return None
    from transformers import DynamicCache

    class Stop(Exception):
        pass

    hidden: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(_module, _args, output):
            hidden[index] = (output[0] if isinstance(output, tuple) else output)[0].to(torch.float32)
            if index == depth:
                raise Stop

        return hook

    modules = [base.embed_tokens, *blocks[:depth]]
    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    cache = DynamicCache(config=config)
    try:
        base(
            input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device),
            use_cache=True,
            **{PrefixState.cache_kwarg(base): cache},
        )
    except Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if depth == len(blocks) and hasattr(base, "norm"):
        hidden[depth] = base.norm(hidden[depth])  # hidden_states[-1] is post final-norm
    kv = tuple((layer.keys.clone(), layer.values.clone()) for layer in cache.layers[:depth])  # type: ignore[union-attr]
    return PrefixState(ids=tuple(ids), kv=kv, hidden_sum=tuple(hidden[i].sum(0) for i in range(depth + 1)))
