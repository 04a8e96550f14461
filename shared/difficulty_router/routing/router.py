"""DifficultyRouter: extractor read-out -> success probes -> policy -> RouteDecision."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.core.pool import ModelPool
from difficulty_router.data.outcomes import Outcomes
from difficulty_router.data.queries import conversation_text, to_conversations
from difficulty_router.extraction.extractor import ActivationExtractor, normalise_pooling
from difficulty_router.learning.bundle import sha256_file
from difficulty_router.learning.families import FAMILIES, StackedProbe, stack_inputs
from difficulty_router.learning.length_head import OutputLengthHead
from difficulty_router.learning.lexical import LexicalProbe
from difficulty_router.learning.novelty import NoveltyScore, OODPolicy
from difficulty_router.learning.policies import Policy, pick_operating_point, sweep
from difficulty_router.learning.probes import DifficultyProbe, SuccessProbe, derived_difficulty
from difficulty_router.learning.shared_success import SharedSuccessModel
from difficulty_router.routing.decision import RouteDecision
from difficulty_router.routing.pretrained import ladder_parts, set_ladder
from difficulty_router.routing.traffic import calibrate_unlabelled

logger = logging.getLogger(__name__)

FORMAT = "difficulty-router/1"
MANIFEST = "manifest.json"
ARRAYS = "probes.safetensors"


class DifficultyRouter:
    """Routes each query to the cheapest pool model expected to answer it well.

    ``family`` says what predicts success: the activation probe, the lexical probe, or
    their ``stacked`` combination (training picks it by cross-validated routing quality).
    Build one with :func:`difficulty_router.train_router` (or ``DifficultyRouter.fit``),
    or load a saved one with :meth:`load`.
    """

    def __init__(
        self,
        extractor: ActivationExtractor,
        pool: ModelPool,
        probe: SuccessProbe,
        *,
        layers: Sequence[int],
        pooling: Sequence[str],
        capability: Sequence[float] | np.ndarray,
        policy: Policy | None = None,
        difficulty_probe: DifficultyProbe | None = None,
        info: dict | None = None,
        family: str = "activation",
        lexical: LexicalProbe | None = None,
        stack: StackedProbe | None = None,
        dropped: dict[str, str] | None = None,
        novelty: NoveltyScore | None = None,
        ood: OODPolicy | None = None,
        length_head: OutputLengthHead | None = None,
        shared: SharedSuccessModel | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown feature family {family!r}; expected one of {FAMILIES}")
        if family in ("lexical", "stacked") and lexical is None:
            raise ValueError(f"the {family!r} family needs a lexical probe")
        if family == "stacked" and stack is None:
            raise ValueError("the 'stacked' family needs a stack")
        if family == "shared" and shared is None:
            raise ValueError("the 'shared' family needs a shared success model")
        for name, part in (("lexical probe", lexical), ("stack", stack), ("shared success model", shared)):
            if part is not None and part.coef_.shape[0] != len(pool):
                raise ValueError(f"the {name} predicts {part.coef_.shape[0]} models, the pool has {len(pool)}")
        if stack is not None and stack.coef_.shape[1] != 2 * len(pool) + 1:
            raise ValueError(
                f"the stack reads {stack.coef_.shape[1]} inputs; a pool of {len(pool)} gives {2 * len(pool) + 1}"
            )
        self.family, self.lexical, self.stack, self.shared = family, lexical, stack, shared
        self.length_head = length_head  # predicted output tokens per model: costs in expected dollars
        self.novelty, self.ood = novelty, ood or OODPolicy()
        if self.ood.model is not None and self.ood.model not in pool.names:
            raise ValueError(f"novelty.model {self.ood.model!r} is not in the pool {pool.names}")
        self.dropped = dict(dropped or {})
        unknown = [m for m in self.dropped if m not in pool.names]
        if unknown or len(self.dropped) >= len(pool):
            raise ValueError(f"dropped models {sorted(self.dropped)} must be pool models, and at least one must stay")
        self.extractor = extractor
        self.pool = pool
        self.probe = probe
        self.layers = tuple(int(x) for x in layers)
        self.pooling = normalise_pooling(pooling)
        self.capability = np.asarray(capability, dtype=np.float64)
        self.policy = policy or Policy()
        self.difficulty_probe = difficulty_probe
        self.info = dict(info or {})
        if len(self.capability) != len(pool):
            raise ValueError(f"capability has {len(self.capability)} entries for a pool of {len(pool)}")
        width = len(self.layers) * len(self.pooling) * extractor.hidden_size
        if probe.coef_.shape[0] != len(pool) or probe.standardizer_.mean_.shape != (width,):
            raise ValueError(
                f"the probe ({probe.coef_.shape[0]} models, {probe.standardizer_.mean_.shape[0]} features) "
                f"does not fit a pool of {len(pool)} and a read-out of {width} features"
            )
        if shared is not None and shared.standardizer_.mean_.shape != (width,):
            raise ValueError(
                f"the shared success model reads {shared.standardizer_.mean_.shape[0]} features, read-out has {width}"
            )
        if length_head is not None and (
            length_head.coef_.shape != (len(pool), width) or length_head.standardizer_.mean_.shape != (width,)
        ):
            raise ValueError(
                f"the length head reads {length_head.coef_.shape[1]} features for {length_head.coef_.shape[0]} models; "
                f"the router has {width} features and {len(pool)} models"
            )
        if novelty is not None and novelty.parts_["mean"].shape != (width,):
            raise ValueError(
                f"the novelty score reads {novelty.parts_['mean'].shape[0]} features, the read-out has {width}"
            )

    # -- introspection -------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return self.pool.names

    @property
    def utility_margin(self) -> float:
        """The margin training measured for the utility policy (curves and calibration sweep with it; the
        policy in use may sit at the sweep's end, margin 1, "always the most capable model")."""
        fitted = self.info.get("utility_margin", {}).get("margin")
        if fitted is not None:
            return float(fitted)
        return self.policy.margin if self.policy.kind == "utility" else 0.0

    def capability_order(self) -> list[str]:
        """Pool models from least to most capable (training accuracy, then cost)."""
        costs = self.pool.costs([0.0])[0]
        return [self.models[j] for j in np.lexsort((costs, self.capability))]

    # -- prediction ----------------------------------------------------------------
    def features(self, queries: Sequence[Any], progress: bool | None = None):
        return self.extractor.extract(queries, layers=self.layers, pooling=self.pooling, progress=progress)

    def predict_proba(self, queries: Sequence[Any], progress: bool | None = None) -> np.ndarray:
        """(n_queries, n_models) calibrated P(success), columns in ``self.models`` order."""
        conversations = to_conversations(queries)
        return self.proba_from(conversations, self.features(conversations, progress).features)

    def proba_from(self, conversations: Sequence[Any], features: np.ndarray) -> np.ndarray:
        """P(success) from conversations and their activation read-out, by the router's feature family."""
        if self.family == "activation":
            return self.probe.predict_proba(features)
        if self.family == "shared":
            assert self.shared is not None  # __init__ requires one for the shared family
            return self.shared.predict_proba(features)
        texts = [conversation_text(c) for c in conversations]
        lexical = self.lexical
        assert lexical is not None  # __init__ requires one for the lexical and stacked families
        if self.family == "lexical":
            return lexical.predict_proba(texts)
        stack = self.stack
        assert stack is not None  # __init__ requires one for the stacked family
        inputs = stack_inputs(self.probe.decision_function(features), lexical.decision_function(texts), texts)
        return stack.predict_proba(inputs)

    def eligibility(self, n: int, exclude: dict[str, str] | None) -> np.ndarray:
        """Models that may serve: not excluded by the caller, and not dropped in training as dominated
        (dropped models come back only when the caller's exclusions leave nothing else)."""
        mask = np.ones((n, len(self.models)), dtype=bool)
        for name in exclude or {}:
            if name not in self.models:
                raise ValueError(f"cannot exclude {name!r}: not in the pool {self.models}")
            mask[:, self.models.index(name)] = False
        if not mask[0].any():
            raise ValueError(f"every pool model is excluded ({dict(exclude or {})}); nothing can serve this query")
        kept = mask.copy()
        for name in self.dropped:
            kept[:, self.models.index(name)] = False
        return kept if kept[0].any() else mask

    def route(self, query: Any, *, exclude: dict[str, str] | None = None) -> RouteDecision:
        """Decide for one query (a string or a chat conversation)."""
        return self.route_batch([query], exclude=exclude, progress=False)[0]

    def route_batch(
        self, queries: Sequence[Any], *, exclude: dict[str, str] | None = None, progress: bool | None = None
    ) -> list[RouteDecision]:
        """Decide for many queries with one batched extraction.

        ``exclude`` maps pool models that cannot serve these calls to the reason; they are
        skipped and the reason is recorded in each decision.
        """
        start = time.perf_counter()
        conversations = to_conversations(queries)
        extraction = self.features(conversations, progress)
        proba = self.proba_from(conversations, extraction.features)
        output_tokens = self.length_head.predict_tokens(extraction.features) if self.length_head is not None else None
        costs = self.pool.costs([len(conversation_text(c)) for c in conversations], output_tokens)
        eligible = self.eligibility(len(conversations), exclude)
        chosen = self.policy.choose(proba, costs, self.capability, eligible)
        difficulty = self.difficulty(proba, extraction.features)
        order = self.capability_order()
        novelty = self.novelty.percentile(extraction.features) if self.novelty is not None else None
        ood = np.zeros(len(conversations), dtype=bool)
        if novelty is not None and self.ood.enabled:
            ood = novelty > self.ood.percentile
            for row in np.flatnonzero(ood):
                chosen[row] = self._ood_target(eligible[row], order)
        elapsed = (time.perf_counter() - start) * 1000 / len(conversations)
        skipped = dict(exclude or {})
        skipped.update(
            {
                m: reason
                for m, reason in self.dropped.items()
                if m not in skipped and not eligible[0, self.models.index(m)]
            }
        )
        decisions = []
        for i, j in enumerate(chosen):
            name = self.models[j]
            rank = order.index(name)
            fallbacks = tuple(m for m in order[rank + 1 :] if eligible[i, self.models.index(m)])
            decisions.append(
                RouteDecision(
                    model=name,
                    probabilities={m: float(p) for m, p in zip(self.models, proba[i], strict=False)},
                    difficulty=float(difficulty[i]),
                    difficulty_level=int(np.clip(np.rint(difficulty[i]), 1, 5)),
                    expected_cost=float(costs[i, j]),
                    costs={m: float(c) for m, c in zip(self.models, costs[i], strict=False)},
                    policy=self.policy.kind,
                    parameter=self.policy.parameter,
                    parameter_value=self.policy.value,
                    fallbacks=fallbacks,
                    skipped=dict(skipped),
                    truncated=bool(extraction.truncated[i]),
                    latency_ms=elapsed,
                    novelty=None if novelty is None else float(novelty[i]),
                    ood=bool(ood[i]),
                    capability_order=tuple(order),
                    output_tokens=None
                    if output_tokens is None
                    else {m: float(t) for m, t in zip(self.models, output_tokens[i], strict=True)},
                )
            )
        return decisions

    def _ood_target(self, eligible: np.ndarray, order: list[str]) -> int:
        """The model a novel query goes to: the configured one if it may serve, else the most capable eligible."""
        if self.ood.model is not None and eligible[self.models.index(self.ood.model)]:
            return self.models.index(self.ood.model)
        return next(self.models.index(m) for m in reversed(order) if eligible[self.models.index(m)])

    def difficulty(self, proba: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        if self.difficulty_probe is not None and features is not None:
            return self.difficulty_probe.predict(features)
        return derived_difficulty(proba)

    # -- operating point -----------------------------------------------------------
    def operating_curve(
        self, outcomes: Outcomes, kind: str | None = None, proba: np.ndarray | None = None
    ) -> list[dict]:
        """Accuracy and cost at every setting of the policy on labelled rows."""
        outcomes = outcomes.select_models(self.models)
        if proba is None:
            proba = self.predict_proba(outcomes.queries)
        costs = self.estimated_costs(outcomes)
        kind = kind or self.policy.kind
        policy = Policy(kind, margin=self.utility_margin if kind == "utility" else 0.0)
        return sweep(
            policy,
            proba,
            costs,
            self.capability,
            outcomes.scores,
            realised_costs=realised_costs(outcomes, costs),
            eligible=self.eligibility(len(outcomes), None),
        )

    def estimated_costs(self, outcomes: Outcomes) -> np.ndarray:
        return self.pool.costs([len(conversation_text(c)) for c in outcomes.queries])

    def calibrate(
        self,
        outcomes: Outcomes | None = None,
        *,
        target_cost: float | None = None,
        target_accuracy: float | None = None,
        max_accuracy_drop: float | None = None,
        kind: str | None = None,
        proba: np.ndarray | None = None,
        unlabelled: Sequence[Any] | None = None,
        strong_share: float | None = None,
        shares: Sequence[float] | None = None,
        max_cost_per_1k: float | None = None,
        progress: bool | None = None,
    ) -> dict:
        """Set the policy's knob on labelled traffic of your own, or on unlabelled prompts.

        ``target_cost``: best accuracy at a mean cost per query no higher than this.
        ``target_accuracy``: cheapest setting reaching this accuracy.
        ``max_accuracy_drop``: cheapest setting within this many accuracy points (0.01 = 1 point)
        of the best single pool model on these rows.

        Without labels, pass ``unlabelled`` prompts and one of ``strong_share`` (share of calls
        to the most capable model), ``shares`` (per model, zero-label ladder routers) or
        ``max_cost_per_1k``; see :func:`difficulty_router.routing.traffic.calibrate_unlabelled`.
        """
        if unlabelled is not None:
            if outcomes is not None or any(x is not None for x in (target_cost, target_accuracy, max_accuracy_drop)):
                raise ValueError(
                    "give labelled outcomes with their targets, or unlabelled prompts with theirs, not both"
                )
            return calibrate_unlabelled(
                self,
                unlabelled,
                strong_share=strong_share,
                shares=shares,
                max_cost_per_1k=max_cost_per_1k,
                progress=progress,
            )
        if outcomes is None:
            raise ValueError(
                "calibrate needs labelled outcomes, or unlabelled= prompts with strong_share/max_cost_per_1k"
            )
        given = [x is not None for x in (target_cost, target_accuracy, max_accuracy_drop)]
        if sum(given) != 1:
            raise ValueError("give exactly one of target_cost, target_accuracy or max_accuracy_drop")
        outcomes = outcomes.select_models(self.models)
        if len(outcomes) < 10:
            raise ValueError(f"calibration needs at least 10 labelled rows, got {len(outcomes)}")
        points = self.operating_curve(outcomes, kind, proba)
        if max_accuracy_drop is not None:
            target_accuracy = float(outcomes.scores.mean(axis=0).max()) - max_accuracy_drop
        kind = kind or self.policy.kind
        point = pick_operating_point(
            points, Policy(kind).parameter, target_cost=target_cost, target_accuracy=target_accuracy
        )
        self.policy = Policy.from_point(kind, point)
        self.info["calibration"] = {
            "n": len(outcomes),
            "target_cost": target_cost,
            "target_accuracy": target_accuracy,
            "point": point,
        }
        return point

    @classmethod
    def pretrained(
        cls,
        pool: ModelPool | Sequence[str],
        *,
        shares: Sequence[float] | None = None,
        extractor: ActivationExtractor | None = None,
        head: Any = None,
        **extractor_kwargs: Any,
    ) -> DifficultyRouter:
        """A zero-label router from the difficulty head shipped with the package (see :mod:`.pretrained`).

        ``pool``: model names from cheapest to most capable, or a :class:`ModelPool` listed that
        way with prices; ``shares`` of traffic per model default to even; ``head``: another saved
        difficulty head (directory or :class:`~.pretrained.DifficultyHead`).
        """
        parts, share_values, boundaries = ladder_parts(
            pool, shares=shares, extractor=extractor, head=head, **extractor_kwargs
        )
        router = cls(**parts)
        set_ladder(router, boundaries, share_values, "pretraining queries")
        return router

    # -- persistence ---------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``manifest.json`` and ``probes.safetensors``; nothing in them is executable."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = self.probe.arrays("success")
        if self.difficulty_probe is not None:
            arrays.update(self.difficulty_probe.arrays("difficulty"))
        if self.lexical is not None:
            arrays.update(self.lexical.arrays("lexical"))
        if self.stack is not None:
            arrays.update(self.stack.arrays("stack"))
        if self.shared is not None:
            arrays.update(self.shared.arrays("shared"))
        if self.novelty is not None:
            arrays.update(self.novelty.arrays("novelty"))
        if self.length_head is not None:
            arrays.update(self.length_head.arrays("length"))
        arrays["capability"] = self.capability
        arrays = {
            k: np.ascontiguousarray(v, dtype=np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer) else np.float64)
            for k, v in arrays.items()
        }
        # what the arrays mean travels inside the hashed file, so editing it is caught like editing an array
        metadata = {
            "family": self.family,
            "lexical": json.dumps(self.lexical.config() if self.lexical is not None else None),
        }
        save_file(arrays, str(directory / ARRAYS), metadata=metadata)
        manifest = {
            "format": FORMAT,
            "extractor": self.extractor.describe(),
            "readout": {"layers": list(self.layers), "pooling": list(self.pooling)},
            "pool": self.pool.to_dict(),
            "policy": self.policy.to_dict(),
            "has_difficulty_probe": self.difficulty_probe is not None,
            "family": self.family,
            "lexical": self.lexical.config() if self.lexical is not None else None,
            "dropped": self.dropped,
            "novelty": self.ood.to_dict(),
            "arrays_sha256": sha256_file(directory / ARRAYS),
            "versions": _versions(),
            "info": self.info,
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        extractor: ActivationExtractor | None = None,
        *,
        model: str | None = None,
        allow_other_extractor: bool = False,
        **extractor_kwargs,
    ) -> DifficultyRouter:
        """Load a saved router; refuses bundles that were altered or that belong to another extractor.

        The extractor comes from ``extractor``, else ``model``, else the manifest. A manifest may
        name only an embedded model (``smollm2-135m``, ...) on its own authority: a hub id or a
        path must also be passed as ``model`` (the manifest is just a file someone sent), and a
        ``model`` other than the manifest's needs ``allow_other_extractor``. Whatever loads, its
        weights hash must equal the one recorded at save time.
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
            raise ValueError(
                f"{where} describes a different feature family than {ARRAYS} holds; the bundle was altered"
            )
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
                **extractor_kwargs,
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
            lexical = (
                LexicalProbe.from_arrays(lexical_config, arrays, "lexical") if lexical_config is not None else None
            )
            stack = StackedProbe.from_arrays(arrays, "stack") if "stack.coef" in arrays else None
            shared = SharedSuccessModel.from_arrays(arrays, "shared") if family == "shared" else None
            novelty = NoveltyScore.from_arrays(arrays, "novelty") if "novelty.mean" in arrays else None
            length_head = OutputLengthHead.from_arrays(arrays, "length") if "length.coef" in arrays else None
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
            )
        except KeyError as exc:
            raise ValueError(
                f"{directory / ARRAYS} lacks the array {exc.args[0]!r}; the bundle is incomplete"
            ) from None
        except (TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{directory}: the saved router is inconsistent ({exc})") from None

    def __repr__(self) -> str:
        return (
            f"DifficultyRouter(extractor={self.extractor.model_id!r}, family={self.family!r}, layers={self.layers}, "
            f"pooling={self.pooling}, models={self.models}, policy={self.policy})"
        )


def realised_costs(outcomes: Outcomes, estimated: np.ndarray) -> np.ndarray:
    """Logged per-query costs where the outcomes have them, estimates elsewhere."""
    if outcomes.cost is None:
        return estimated
    return np.where(np.isnan(outcomes.cost), estimated, outcomes.cost)


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
