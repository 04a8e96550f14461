"""Learned parts as named float arrays and back: the one place that knows how a probe is laid out on disk.

A saved router (and a P(IK) probe) is plain safetensors: every learned part writes its arrays under
``{prefix}.{field}`` beside its input transform under ``{prefix}.standardizer.*``, and reads them back
the same way. The calibrated probes (activation, lexical, shard-trained, pretrained ladder) share the
five fields of :data:`CALIBRATED_FIELDS`; the stack and the difficulty probe keep :data:`LINEAR_FIELDS`;
the shared success model and the length head name their own. The names on disk are the format:
:func:`part_arrays` and :func:`set_part_arrays` never rename them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from difficulty_router.learning.standardizer import Standardizer

#: What a calibrated linear probe saves besides its input transform: weights, intercepts, Platt
#: scaling, the chosen regularisation and the cross-validated AUROC (one row or entry per model).
CALIBRATED_FIELDS = ("coef", "intercept", "platt", "C", "cv_auroc")
#: A plain linear head on standardised inputs: weights and intercepts.
LINEAR_FIELDS = ("coef", "intercept")


def _attribute(name: str, attributes: Mapping[str, str] | None) -> str:
    return (attributes or {}).get(name, f"{name}_")


def part_arrays(
    part: Any,
    prefix: str,
    fields: Sequence[str],
    *,
    standardizer: bool = True,
    attributes: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """``{prefix}.{field}`` for each field (the attribute ``{field}_`` unless ``attributes`` names
    another), after the part's ``standardizer_`` under ``{prefix}.standardizer`` when ``standardizer``."""
    out = part.standardizer_.arrays(f"{prefix}.standardizer") if standardizer else {}
    out.update({f"{prefix}.{name}": getattr(part, _attribute(name, attributes)) for name in fields})
    return out


def set_part_arrays(
    part: Any,
    arrays: Mapping[str, np.ndarray],
    prefix: str,
    fields: Sequence[str],
    *,
    standardizer: bool = True,
    attributes: Mapping[str, str] | None = None,
) -> None:
    """The inverse of :func:`part_arrays`, in place; a missing array raises KeyError naming it."""
    if standardizer:
        part.standardizer_ = Standardizer.from_arrays(arrays, f"{prefix}.standardizer")
    for name in fields:
        setattr(part, _attribute(name, attributes), arrays[f"{prefix}.{name}"])


def calibrated_arrays(probe: Any, prefix: str) -> dict[str, np.ndarray]:
    """The probe's ``coef_``/``intercept_``/``platt_``/``C_``/``cv_auroc_`` as ``{prefix}.{field}`` arrays."""
    return part_arrays(probe, prefix, CALIBRATED_FIELDS, standardizer=False)


def set_calibrated_arrays(probe: Any, arrays: Mapping[str, np.ndarray], prefix: str) -> None:
    """The inverse of ``calibrated_arrays``; a missing array raises KeyError naming it."""
    set_part_arrays(probe, arrays, prefix, CALIBRATED_FIELDS, standardizer=False)


def calibrated_probe_arrays(
    prefix: str,
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    platt: np.ndarray,
    C: np.ndarray | None = None,
    cv_auroc: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of a calibrated probe built from its parts rather than fitted (a pretrained ladder, a
    streamed fit): what ``SuccessProbe.from_arrays(..., prefix)`` reads. ``C`` defaults to zeros and
    ``cv_auroc`` to NaN (not measured), one per model."""
    m = len(intercept)
    return {
        f"{prefix}.standardizer.mean": mean,
        f"{prefix}.standardizer.scale": scale,
        f"{prefix}.coef": coef,
        f"{prefix}.intercept": intercept,
        f"{prefix}.platt": platt,
        f"{prefix}.C": np.zeros(m) if C is None else C,
        f"{prefix}.cv_auroc": np.full(m, np.nan) if cv_auroc is None else cv_auroc,
    }
