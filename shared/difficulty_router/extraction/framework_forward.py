"""The framework's own forward pass, read out by hooks: the reference the lean prefill must match.

Used where the lean path does not apply (a block that is not Llama's) or did not reproduce this
read-out at start-up, and as that start-up check's reference. It finds the decoder blocks by shape
rather than by architecture name, hooks the requested hidden states and stops the pass after the
deepest one: routing needs no logits.
"""

from __future__ import annotations

from typing import Any

import torch

from difficulty_router.extraction.prefix_kv import PrefixState


class _StopForward(Exception):
    """Raised from a hook once the deepest requested block has run."""


def pick_device(device: str) -> torch.device:
    """An explicit device, or for ``"auto"`` cuda, then mps, then cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks, found by shape rather than by architecture name."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    n = model.config.num_hidden_layers
    for module in base.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def framework_readout(
    base,
    blocks: torch.nn.ModuleList,
    config,
    device: torch.device,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    layer_idx: tuple[int, ...],
    prefix: PrefixState | None,
) -> dict[int, torch.Tensor]:
    """The framework's forward, read out by hooks and stopped after the deepest wanted block:
    ``hidden_states[index]`` for each index in ``layer_idx``."""
    kwargs: dict[str, Any] = {}
    full_mask = mask
    if prefix is not None:  # [prefix][padding][suffix]: the mask hides the padding between them
        full_mask = torch.cat([torch.ones((len(mask), len(prefix)), dtype=torch.long), mask], dim=1)
        kwargs[prefix.cache_kwarg(base)] = prefix.cache_for(len(mask), config)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layer_idx)
    hooks = []

    def keep(index: int, stop: bool):
        def hook(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _StopForward

        return hook

    for index in layer_idx:
        module = base.embed_tokens if index == 0 else blocks[index - 1]
        hooks.append(module.register_forward_hook(keep(index, stop=index == deepest)))
    try:
        base(
            input_ids=input_ids,
            attention_mask=full_mask.to(device),
            position_ids=position_ids,
            use_cache=prefix is not None,
            **kwargs,
        )
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()

    return captured
