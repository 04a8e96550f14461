"""DifficultyRouter: extractor read-out -> success probes -> policy -> RouteDecision.

This module is the decision itself (probabilities by feature family, eligibility, the policy's
choice, novelty escalation, the decision record). Its neighbours hold the rest, each reached through a
thin method here: saving and loading (:mod:`.persistence`), the operating point on labelled rows
(:mod:`.calibration`), on unlabelled traffic (:mod:`.traffic`) and the zero-label ladder (:mod:`.pretrained`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from difficulty_router.core.pool import ModelPool
from difficulty_router.data.outcomes import Outcomes
from difficulty_router.data.queries import conversation_text, to_conversations
from difficulty_router.extraction.extractor import ActivationExtractor
from difficulty_router.extraction.readout import normalise_pooling
from difficulty_router.learning.families import FAMILIES, StackedProbe, stack_inputs
from difficulty_router.learning.length_head import OutputLengthHead
from difficulty_router.learning.lexical import LexicalProbe
from difficulty_router.learning.novelty import NoveltyScore, OODPolicy
from difficulty_router.learning.policies import Policy
from difficulty_router.learning.probes import DifficultyProbe, SuccessProbe, derived_difficulty
from difficulty_router.learning.shared_success import SharedSuccessModel
from difficulty_router.learning.transfer_guard import TransferGuard
from difficulty_router.routing.calibration import (
    calibrate_router,
    operating_curve,
)
from difficulty_router.routing.decision import RouteDecision
from difficulty_router.routing.persistence import (
    load_router,
    save_router,
)
from difficulty_router.routing.pretrained import ladder_parts, set_ladder

logger = logging.getLogger(__name__)


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
        transfer_guard: TransferGuard | None = None,
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
        # watches unlabelled traffic for signs that the router does not transfer (:mod:`.transfer_guard`)
        if transfer_guard is not None and transfer_guard.width != width:
            raise ValueError(f"the transfer guard reads {transfer_guard.width} features, the read-out has {width}")
        self.transfer_guard = transfer_guard

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
        transfer = None
        if self.transfer_guard is not None:
            transfer = self.transfer_guard.observe(extraction.features, difficulty)
            for i, verdict in enumerate(transfer):
                if verdict["fallback"]:  # the safe choice: the most capable eligible model
                    chosen[i] = next(self.models.index(m) for m in reversed(order) if eligible[i, self.models.index(m)])
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
                    transfer=None if transfer is None else dict(transfer[i]),
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
    #: Accuracy and cost at every setting of the policy on labelled rows (:func:`.calibration.operating_curve`).
    operating_curve = operating_curve

    def estimated_costs(self, outcomes: Outcomes) -> np.ndarray:
        return self.pool.costs([len(conversation_text(c)) for c in outcomes.queries])

    #: Set the policy's knob on labelled traffic of your own, or on unlabelled prompts
    #: (:func:`.calibration.calibrate_router`).
    calibrate = calibrate_router

    @classmethod
    def pretrained(
        cls,
        pool: ModelPool | Sequence[str],
        *,
        shares: Sequence[float] | None = None,
        extractor: ActivationExtractor | None = None,
        head: Any = None,
        transfer_guard: Any = None,
        **extractor_kwargs: Any,
    ) -> DifficultyRouter:
        """A zero-label router from the difficulty head shipped with the package (see :mod:`.pretrained`).

        ``pool``: model names from cheapest to most capable, or a :class:`ModelPool` listed that
        way with prices; ``shares`` of traffic per model default to even; ``head``: another saved
        difficulty head (directory or :class:`~.pretrained.DifficultyHead`); ``transfer_guard``: True
        (or a :class:`~difficulty_router.learning.transfer_guard.GuardPolicy`) to fall back to the most
        capable model when the traffic looks unlike the head's training queries (off by default).
        """
        parts, share_values, boundaries = ladder_parts(
            pool, shares=shares, extractor=extractor, head=head, transfer_guard=transfer_guard, **extractor_kwargs
        )
        router = cls(**parts)
        set_ladder(router, boundaries, share_values, "pretraining queries")
        return router

    # -- persistence ---------------------------------------------------------------
    #: Write ``manifest.json`` and ``probes.safetensors`` (:func:`.persistence.save_router`).
    save = save_router

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        extractor: ActivationExtractor | None = None,
        *,
        model: str | None = None,
        allow_other_extractor: bool = False,
        **extractor_kwargs: Any,
    ) -> DifficultyRouter:
        """Load a saved router; refuses bundles that were altered or that belong to another extractor.

        The extractor comes from ``extractor``, else ``model``, else the manifest. A manifest may
        name only an embedded model (``smollm2-135m``, ...) on its own authority: a hub id or a
        path must also be passed as ``model`` (the manifest is just a file someone sent), and a
        ``model`` other than the manifest's needs ``allow_other_extractor``. Whatever loads, its
        weights hash must equal the one recorded at save time (:func:`.persistence.load_router`).
        """
        return load_router(
            cls, directory, extractor, model=model, allow_other_extractor=allow_other_extractor, **extractor_kwargs
        )

    def __repr__(self) -> str:
        return (
            f"DifficultyRouter(extractor={self.extractor.model_id!r}, family={self.family!r}, layers={self.layers}, "
            f"pooling={self.pooling}, models={self.models}, policy={self.policy})"
        )
