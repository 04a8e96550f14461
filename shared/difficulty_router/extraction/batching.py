"""How prompts become forward passes and hidden states become features: length buckets, left padding, pooling.

Kept apart from the model's forward so the rules that decide a batch's cost and the numbers it yields
can be read (and tested) without a model: prompts sorted by length and cut into batches bounded by
count, padded tokens and padding share; every prompt left-padded so it ends at the last column (its
"last" token is then one column for the whole batch); the masked mean counting the cached prefix's
positions as if they had run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from difficulty_router.extraction.prefix_kv import PrefixState


def length_batches(
    todo: list[int],
    ids: list[list[int]],
    uses_prefix: Callable[[list[int]], bool],
    prefix_len: int,
    batch_size: int,
    max_batch_tokens: int,
    max_padding: float,
) -> list[tuple[list[int], bool]]:
    """Length buckets: prompts sorted by the tokens they run, cut into batches bounded by count,
    padded tokens and padding share; prompts that reuse the cached prefix (``uses_prefix``, whose
    ``prefix_len`` tokens do not run) batch apart from the rest. Returns (row indexes, prefixed) pairs."""
    out: list[tuple[list[int], bool]] = []
    for prefixed in (True, False):
        skip = prefix_len if prefixed else 0
        group = [i for i in todo if uses_prefix(ids[i]) == prefixed]
        group.sort(key=lambda i: -len(ids[i]))
        current: list[int] = []
        real = 0
        for i in group:
            length = len(ids[i]) - skip
            if current:
                longest = len(ids[current[0]]) - skip
                padded = longest * (len(current) + 1)
                if (
                    len(current) >= batch_size
                    or padded > max_batch_tokens
                    or padded - real - length > max_padding * padded
                ):
                    out.append((current, prefixed))
                    current, real = [], 0
            current.append(i)
            real += length
        if current:
            out.append((current, prefixed))
    return out


def left_padded(
    rows: Sequence[Sequence[int]], pad_id: int, skip: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, mask, position_ids) with every prompt ending at the last column; positions count
    from ``skip`` (the cached prefix's length) so the suffix continues where the prefix stopped."""
    longest = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, x in enumerate(rows):  # left padding: every prompt ends at the last column
        input_ids[row, longest - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[row, longest - len(x) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + skip
    return input_ids, mask, position_ids


def pooled_features(
    captured: dict[int, torch.Tensor],
    layer_idx: tuple[int, ...],
    pools: tuple[str, ...],
    mask: torch.Tensor,
    prefix: PrefixState | None,
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None,
    n_layers: int,
) -> torch.Tensor:
    """(batch, len(layer_idx) * len(pools) * hidden) float32 features from the captured hidden states,
    layer by layer and, within a layer, pooling by pooling. ``captured`` is consumed. The last hidden
    state goes through ``final_norm`` (transformers' ``hidden_states[-1]`` is post final-norm); the
    mean adds the cached prefix's hidden-state sums and counts its positions."""
    skip = len(prefix) if prefix is not None else 0
    maskf = mask.unsqueeze(-1).to(torch.float32)
    counts = maskf.sum(1) + skip
    blocks = []
    for index in layer_idx:
        hidden = captured.pop(index)
        if index == n_layers and final_norm is not None:
            hidden = final_norm(hidden)
        hidden = hidden.to(torch.float32)
        for pool in pools:
            if pool == "last":
                blocks.append(hidden[:, -1, :])
            else:
                summed = (hidden * maskf).sum(1)
                if prefix is not None:
                    summed = summed + prefix.hidden_sum[index].to(summed.device)
                blocks.append(summed / counts)
        del hidden
    return torch.cat(blocks, dim=1)
