"""Small public samples shipped with the package (see README.md here for origin and licence)."""

from pathlib import Path

DATASETS_DIR = Path(__file__).parent
ROUTELLM_MMLU_SAMPLE = DATASETS_DIR / "routellm_mmlu_sample.jsonl.gz"
ROUTELLM_MMLU_POOL = DATASETS_DIR / "routellm_mmlu_pool.json"
MMLU_PRO_SAMPLE = DATASETS_DIR / "mmlu_pro_sample"
