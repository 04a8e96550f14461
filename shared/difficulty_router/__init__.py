"""difficulty_router: route queries by difficulty read from a small LM's hidden states."""

__version__ = "0.1.0"

from .cascade import Cascade, CascadePolicy, CascadeResult, CascadeRun
from .confidence import MissingLogprobsError, answer_confidence, openai_token_logprobs
from .data import Outcomes, load_llmrouter, load_mmlu_pro, load_outcomes, save_outcomes
from .decision import RouteDecision
from .decision_log import DecisionLog, read_log
from .extractor import ActivationExtractor, Extraction
from .feature_cache import FeatureCache
from .generation import Generation, LocalGenerator, OpenAIGenerator, PIKProbe
from .model_store import DEFAULT_MODEL, KNOWN_MODELS, cache_root
from .policies import Policy
from .pool import ModelPool, PoolModel
from .probes import DifficultyProbe, SuccessProbe
from .router import DifficultyRouter
from .sessions import SESSION_POLICIES, Sessions, SessionState, SessionStore
from .training import train_router

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
