"""difficulty_router: route queries by difficulty read from a small LM's hidden states."""

from difficulty_router.calling.cascade import Cascade, CascadeResult, CascadeRun
from difficulty_router.calling.cascade_policy import CascadePolicy
from difficulty_router.calling.confidence import MissingLogprobsError, answer_confidence, openai_token_logprobs
from difficulty_router.calling.dispatch.holdback import StreamHoldback
from difficulty_router.calling.generation import Generation, LocalGenerator, OpenAIGenerator, PIKProbe
from difficulty_router.core.pool import ModelPool, PoolModel
from difficulty_router.core.version import __version__
from difficulty_router.data.outcomes import Outcomes, load_llmrouter, load_mmlu_pro, load_outcomes, save_outcomes
from difficulty_router.extraction.extractor import ActivationExtractor
from difficulty_router.extraction.feature_cache import FeatureCache
from difficulty_router.extraction.model_store import DEFAULT_MODEL, KNOWN_MODELS, cache_root
from difficulty_router.extraction.readout import Extraction
from difficulty_router.learning.policies import Policy
from difficulty_router.learning.probes import DifficultyProbe, SuccessProbe
from difficulty_router.routing.decision import RouteDecision
from difficulty_router.routing.decision_log import DecisionLog, read_log
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.routing.sessions import SESSION_POLICIES, Sessions, SessionState, SessionStore
from difficulty_router.training.train import train_router

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "SESSION_POLICIES",
    "ActivationExtractor",
    "Cascade",
    "CascadePolicy",
    "CascadeResult",
    "CascadeRun",
    "DecisionLog",
    "DifficultyProbe",
    "DifficultyRouter",
    "Extraction",
    "FeatureCache",
    "Generation",
    "LocalGenerator",
    "MissingLogprobsError",
    "ModelPool",
    "OpenAIGenerator",
    "Outcomes",
    "PIKProbe",
    "Policy",
    "PoolModel",
    "RouteDecision",
    "SessionState",
    "SessionStore",
    "Sessions",
    "StreamHoldback",
    "SuccessProbe",
    "__version__",
    "answer_confidence",
    "cache_root",
    "load_llmrouter",
    "load_mmlu_pro",
    "load_outcomes",
    "openai_token_logprobs",
    "read_log",
    "save_outcomes",
    "train_router",
]
