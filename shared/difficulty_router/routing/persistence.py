"""A router on disk: ``manifest.json`` (what it is, as JSON) and ``probes.safetensors`` (its arrays).

Nothing in a saved router is executable, and loading treats both files as untrusted input (the
checks live in :mod:`difficulty_router.learning.bundle`): the arrays must match the sha256 the
manifest records, every field is type-checked, and the extractor the manifest names must be an
embedded model or one the caller names. This module is the format: routers saved before it was
split out of the router module load unchanged, and what it writes is byte-for-byte what was written
before. It builds a router through the class it is given, so it never imports the router module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.core.pool import ModelPool
from difficulty_router.extraction.extractor import ActivationExtractor
from difficulty_router.extraction.path_choice import ReadoutQuality
from difficulty_router.learning.bundle import write_arrays
from difficulty_router.learning.families import StackedProbe
from difficulty_router.learning.length_head import OutputLengthHead
from difficulty_router.learning.lexical import LexicalProbe
from difficulty_router.learning.novelty import NoveltyScore, OODPolicy
from difficulty_router.learning.policies import Policy
from difficulty_router.learning.probes import DifficultyProbe, SuccessProbe
from difficulty_router.learning.shared_success import SharedSuccessModel
from difficulty_router.learning.transfer_guard import TransferGuard

FORMAT = "difficulty-router/1"
MANIFEST = "manifest.json"
ARRAYS = "probes.safetensors"


def router_arrays(router: Any) -> dict[str, np.ndarray]:
    """Every learned part's named arrays, in the order the file has always listed them."""
    arrays = router.probe.arrays("success")
    parts = (
        ("difficulty", router.difficulty_probe),
        ("lexical", router.lexical),
        ("stack", router.stack),
        ("shared", router.shared),
        ("novelty", router.novelty),
        ("length", router.length_head),
    )
    for prefix, part in parts:
        if part is not None:
            arrays.update(part.arrays(prefix))
    arrays["capability"] = router.capability
    guard = getattr(router, "transfer_guard", None)
    if guard is not None:  # after the rest, so routers without a guard write the same file as before
        arrays.update(guard.arrays("transfer"))
    return arrays


def save_router(router: Any, directory: str | os.PathLike) -> Path:
    """Write ``manifest.json`` and ``probes.safetensors``; nothing in them is executable
    (:meth:`DifficultyRouter.save`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lexical_config = router.lexical.config() if router.lexical is not None else None
    # what the arrays mean travels inside the hashed file, so editing it is caught like editing an array
    metadata = {"family": router.family, "lexical": json.dumps(lexical_config)}
    arrays_sha256 = write_arrays(directory / ARRAYS, router_arrays(router), metadata)
    manifest = {
        "format": FORMAT,
        "extractor": router.extractor.describe(),
        "readout": {"layers": list(router.layers), "pooling": list(router.pooling)},
        "pool": router.pool.to_dict(),
        "policy": router.policy.to_dict(),
        "has_difficulty_probe": router.difficulty_probe is not None,
        "family": router.family,
        "lexical": lexical_config,
        "dropped": router.dropped,
        "novelty": router.ood.to_dict(),
        "arrays_sha256": arrays_sha256,
        "versions": _versions(),
        "info": router.info,
    }
    guard = getattr(router, "transfer_guard", None)
    if guard is not None:  # only when present, so routers without a guard write the same manifest as before
        manifest["transfer_guard"] = guard.policy.to_dict()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    return directory


def load_router(
    cls: type,
    directory: str | os.PathLike,
    extractor: ActivationExtractor | None = None,
    *,
    model: str | None = None,
    allow_other_extractor: bool = False,
    **extractor_kwargs: Any,
) -> Any:
    """Load a saved router; refuses bundles that were altered or that belong to another extractor.

    The extractor comes from ``extractor``, else ``model``, else the manifest. A manifest may
    name only an embedded model (``smollm2-135m``, ...) on its own authority: a hub id or a
    path must also be passed as ``model`` (the manifest is just a file someone sent), and a
    ``model`` other than the manifest's needs ``allow_other_extractor``. Whatever loads, its
    weights hash must equal the one recorded at save time. This is :meth:`DifficultyRouter.load`
    (``cls`` is the router class).
    """
    from difficulty_router.extraction.model_store import KNOWN_MODELS
    from difficulty_router.learning.bundle import (
        check_extractor_allowed,
        check_router_manifest,
        load_arrays,
        read_manifest,
    )

    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}; not a saved router")
    if not (directory / ARRAYS).is_file():
        raise FileNotFoundError(f"{directory} holds no {ARRAYS}; the saved router is incomplete")
    where = str(directory / MANIFEST)
    manifest = read_manifest(directory / MANIFEST)
    check_router_manifest(manifest, where, FORMAT)
    arrays, metadata = load_arrays(directory / ARRAYS, manifest["arrays_sha256"])
    family = metadata.get("family", "activation")
    try:
        lexical_config = json.loads(metadata.get("lexical", "null"))
    except json.JSONDecodeError:
        raise ValueError(f"{directory / ARRAYS}: its 'lexical' metadata is not JSON") from None
    if family != manifest.get("family", "activation") or lexical_config != manifest.get("lexical"):
        raise ValueError(f"{where} describes a different feature family than {ARRAYS} holds; the bundle was altered")
    readout = manifest["readout"]
    described = manifest["extractor"]
    if extractor is None:
        name = check_extractor_allowed(
            described["model_id"], model, allow_other_extractor, where, frozenset(KNOWN_MODELS)
        )
        extractor = ActivationExtractor(
            name,
            layers=readout["layers"],
            pooling=readout["pooling"],
            max_tokens=described.get("max_tokens", 2048),
            **({"quality": _probe_quality(arrays, manifest)} | extractor_kwargs),
        )
    if extractor.model_hash != described["model_hash"]:
        raise ValueError(
            f"this router was trained on extractor {described['model_id'][:200]!r} (weights sha256 "
            f"{described['model_hash'][:12]}...), but the extractor in use is {extractor.model_id!r} "
            f"({extractor.model_hash[:12]}...); its probes would read meaningless features"
        )
    if extractor.hidden_size != described["hidden_size"] or extractor.n_layers != described["n_layers"]:
        raise ValueError("the extractor's shape differs from the one the router was trained on")
    try:
        probe = SuccessProbe.from_arrays(arrays, "success")
        difficulty_probe = (
            DifficultyProbe.from_arrays(arrays, "difficulty") if manifest.get("has_difficulty_probe") else None
        )
        lexical = LexicalProbe.from_arrays(lexical_config, arrays, "lexical") if lexical_config is not None else None
        stack = StackedProbe.from_arrays(arrays, "stack") if "stack.coef" in arrays else None
        started = (manifest.get("info") or {}).get("shared_start") or {}
        shared = SharedSuccessModel.from_arrays(arrays, "shared", started.get("mode")) if family == "shared" else None
        novelty = NoveltyScore.from_arrays(arrays, "novelty") if "novelty.mean" in arrays else None
        length_head = OutputLengthHead.from_arrays(arrays, "length") if "length.coef" in arrays else None
        has_guard = "transfer.difficulty_quantiles" in arrays
        if has_guard != ("transfer_guard" in manifest):
            raise ValueError(f"{where} and {ARRAYS} disagree on whether the router has a transfer guard")
        guard = TransferGuard.from_arrays(arrays, manifest["transfer_guard"], "transfer") if has_guard else None
        return cls(
            extractor,
            ModelPool.from_dict(manifest["pool"], source=where),
            probe,
            layers=readout["layers"],
            pooling=readout["pooling"],
            capability=arrays["capability"],
            policy=Policy.from_dict(manifest["policy"]),
            difficulty_probe=difficulty_probe,
            info=manifest.get("info") or {},
            family=family,
            lexical=lexical,
            stack=stack,
            dropped=manifest.get("dropped") or {},
            novelty=novelty,
            ood=OODPolicy.from_dict(manifest.get("novelty")),
            length_head=length_head,
            shared=shared,
            transfer_guard=guard,
        )
    except KeyError as exc:
        raise ValueError(f"{directory / ARRAYS} lacks the array {exc.args[0]!r}; the bundle is incomplete") from None
    except (TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{directory}: the saved router is inconsistent ({exc})") from None


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _versions() -> dict:
    import sklearn
    import torch
    import transformers

    from difficulty_router.core.version import __version__

    return {
        "difficulty_router": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _probe_quality(arrays: dict, manifest: dict) -> ReadoutQuality | None:
    """How "auto" judges numeric paths for this router: by what its success probe makes of the read-out
    (:class:`~difficulty_router.extraction.path_choice.ReadoutQuality`). None where the probe does not load;
    the loader then reports that itself."""
    try:
        probe = SuccessProbe.from_arrays(arrays, "success")
    except (KeyError, ValueError, TypeError):
        return None
    return ReadoutQuality(name=str(manifest["arrays_sha256"]), score=probe.predict_proba)
