"""difficulty_router: route queries by difficulty read from a small LM's hidden states."""

from .extractor import ActivationExtractor, Extraction
from .feature_cache import FeatureCache
from .model_store import DEFAULT_MODEL, KNOWN_MODELS, cache_root

__version__ = "0.1.0"

__all__ = [
    "ActivationExtractor",
    "Extraction",
    "FeatureCache",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "cache_root",
    "__version__",
]
