"""The lexical read-out: hashed word or character n-grams with tf-idf weights, and a probe on them.

Why hashing: scikit-learn's ``HashingVectorizer`` maps an n-gram to a column with a fixed
murmurhash, so it has no vocabulary to store. What fitting learns is which columns were
seen often enough to keep and their idf weights: two arrays. A saved router therefore
holds the lexical family as plain safetensors + JSON like the activation probes, and
loading it executes nothing.

Words know *what* a query is about (subject, task type); the activation read-out knows
more about *how hard* it is for a language model. Routing quality comes from both, so
training compares them and their stack by cross-validation (see ``families.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer

from difficulty_router.learning.folds import nested_choice, shared_folds
from difficulty_router.learning.logistic import apply_platt
from difficulty_router.learning.probe_arrays import calibrated_arrays, set_calibrated_arrays
from difficulty_router.learning.probes import fit_calibrated_columns

# (analyzer, n-gram range) candidates that training compares by CV AUROC
LEXICAL_CANDIDATES = (("word", (1, 1)), ("word", (1, 2)), ("char_wb", (2, 5)))
LEXICAL_CS = (0.3, 1.0, 3.0, 10.0)
TOKEN_PATTERN = r"(?u)\b\w+\b"
N_FEATURES = 2**20


class LexicalFeatures:
    """Text -> sparse tf-idf rows (sublinear tf, l2-normalised) over the kept hashed n-grams."""

    def __init__(
        self, analyzer: str = "word", ngram_range: Sequence[int] = (1, 2), min_df: int = 2, n_features: int = N_FEATURES
    ) -> None:
        if analyzer not in ("word", "char_wb"):
            raise ValueError(f"analyzer must be 'word' or 'char_wb', got {analyzer!r}")
        lo, hi = (int(x) for x in ngram_range)
        if not 1 <= lo <= hi <= 6:
            raise ValueError(f"ngram_range must satisfy 1 <= low <= high <= 6, got {tuple(ngram_range)}")
        if int(min_df) < 1 or not 2**10 <= int(n_features) <= 2**24:
            raise ValueError(f"min_df must be >= 1 and n_features in [2**10, 2**24], got {min_df}, {n_features}")
        self.analyzer, self.ngram_range, self.min_df, self.n_features = analyzer, (lo, hi), int(min_df), int(n_features)

    def _hasher(self) -> HashingVectorizer:
        return HashingVectorizer(
            analyzer=self.analyzer,
            ngram_range=self.ngram_range,
            n_features=self.n_features,
            alternate_sign=False,
            norm=None,
            lowercase=True,
            token_pattern=TOKEN_PATTERN if self.analyzer == "word" else None,
        )

    def fit(self, texts: Sequence[str]) -> LexicalFeatures:
        counts = self._hasher().transform(_check_texts(texts)).tocsc()
        df = np.diff(counts.indptr)
        self.columns_ = np.flatnonzero(df >= self.min_df).astype(np.int64)
        self._lookup: np.ndarray | None = None
        if len(self.columns_) == 0:
            raise ValueError(f"no n-gram occurs in {self.min_df} or more training texts; the lexical read-out is empty")
        # scikit-learn's smoothed idf
        self.idf_ = np.log((1 + len(texts)) / (1 + df[self.columns_])) + 1.0
        return self

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        hashed = self._hasher().transform(_check_texts(texts)).tocsr()
        # hashed column -> kept column (or -1), O(non-zeros) per call rather than a 2**20-wide slice
        if getattr(self, "_lookup", None) is None:
            lookup = np.full(self.n_features, -1, dtype=np.int64)
            lookup[self.columns_] = np.arange(len(self.columns_))
            self._lookup = lookup
        mapped = np.asarray(self._lookup)[hashed.indices]
        keep = mapped >= 0
        rows = np.repeat(np.arange(hashed.shape[0]), np.diff(hashed.indptr))[keep]
        counts = sparse.csr_matrix(
            (hashed.data[keep].astype(np.float64), (rows, mapped[keep])), shape=(hashed.shape[0], len(self.columns_))
        )
        counts.data = 1.0 + np.log(counts.data)
        counts = counts @ sparse.diags(self.idf_)
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ counts

    @property
    def width(self) -> int:
        return len(self.columns_)

    def config(self) -> dict:
        return {
            "analyzer": self.analyzer,
            "ngram_range": list(self.ngram_range),
            "min_df": self.min_df,
            "n_features": self.n_features,
        }

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.columns": self.columns_, f"{prefix}.idf": self.idf_}

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict[str, np.ndarray], prefix: str) -> LexicalFeatures:
        self = cls(config["analyzer"], config["ngram_range"], config["min_df"], config["n_features"])
        columns, idf = arrays[f"{prefix}.columns"], arrays[f"{prefix}.idf"]
        if (
            columns.ndim != 1
            or idf.shape != columns.shape
            or len(columns) == 0
            or not np.array_equal(columns, np.unique(columns))
            or columns[0] < 0
            or columns[-1] >= self.n_features
            or not np.isfinite(idf).all()
            or (idf < 1.0).any()
        ):
            raise ValueError(
                "saved lexical arrays are inconsistent (columns must be sorted, unique and in range; "
                "idf finite and >= 1)"
            )
        self.columns_, self.idf_ = columns.astype(np.int64), idf.astype(np.float64)
        self._lookup = None
        return self


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("expected a sequence of texts, got one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"lexical features need strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


class LexicalProbe:
    """P(model m answers well) from the lexical read-out: calibrated logistic regression per model.

    ``fit`` tries each (analyzer, n-gram range) in ``candidates`` and each C, and keeps the
    pair with the best mean out-of-fold AUROC over the pool; this is also the TF-IDF
    baseline the benchmarks tune, so router and baseline get the same care.
    """

    def __init__(self, candidates=LEXICAL_CANDIDATES, Cs=LEXICAL_CS, cv: int = 5, seed: int = 0) -> None:
        self.candidates, self.Cs, self.cv, self.seed = tuple(candidates), tuple(Cs), cv, seed

    def fit(self, texts: Sequence[str], Y, folds=None, progress: bool = False) -> LexicalProbe:
        Y = np.asarray(Y, dtype=np.float64)
        Y = Y[:, None] if Y.ndim == 1 else Y
        texts = _check_texts(texts)
        if len(texts) != len(Y):
            raise ValueError(f"{len(texts)} texts but {len(Y)} label rows")
        folds = folds or shared_folds(Y, self.cv, self.seed)
        self.candidate_scores_ = []
        best = None
        errors: list[str] = []
        nested_logits: list[np.ndarray] = []
        for analyzer, ngrams in self.candidates:
            # the vocabulary is learned on all rows: only which n-grams exist, never the labels
            try:
                features = LexicalFeatures(analyzer, ngrams).fit(texts)
            except ValueError as exc:  # nothing of this kind occurs twice; other candidates may still work
                errors.append(f"{analyzer} {ngrams[0]}-{ngrams[1]}: {exc}")
                continue
            fitted = fit_calibrated_columns(
                features.transform(texts),
                Y,
                folds,
                self.Cs,
                self.seed,
                progress,
                desc=f"lexical {analyzer} {ngrams[0]}-{ngrams[1]}",
            )
            score = float(np.nanmean(fitted["cv_auroc"])) if np.isfinite(fitted["cv_auroc"]).any() else 0.5
            self.candidate_scores_.append({"analyzer": analyzer, "ngram_range": list(ngrams), "cv_auroc": score})
            nested_logits.append(fitted["nested_oof_logit"])
            if best is None or score > best[0] + 1e-4:
                best = (score, features, fitted)
        if best is None:
            raise ValueError("; ".join(errors))
        _, self.features_, fitted = best
        self.coef_, self.intercept_, self.platt_ = fitted["coef"], fitted["intercept"], fitted["platt"]
        self.C_, self.cv_auroc_ = fitted["C"], fitted["cv_auroc"]
        self.oof_logit_, self.oof_proba_ = fitted["oof_logit"], fitted["oof_proba"]
        # the n-gram kind is chosen without the predicted fold too (C already was)
        nested = nested_choice(nested_logits, Y, folds, per_column=False)
        self.nested_oof_logit_, self.nested_oof_proba_ = nested["logit"], nested["proba"]
        return self

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        Z = self.features_.transform(texts)
        return np.asarray(Z @ self.coef_.T) + self.intercept_

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return apply_platt(self.platt_, self.decision_function(texts))

    def config(self) -> dict:
        return self.features_.config()

    def arrays(self, prefix: str = "lexical") -> dict[str, np.ndarray]:
        return {**self.features_.arrays(prefix), **calibrated_arrays(self, prefix)}

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict[str, np.ndarray], prefix: str = "lexical") -> LexicalProbe:
        self = cls()
        self.features_ = LexicalFeatures.from_arrays(config, arrays, prefix)
        set_calibrated_arrays(self, arrays, prefix)
        m = self.coef_.shape[0]
        if (
            self.coef_.shape != (m, self.features_.width)
            or self.intercept_.shape != (m,)
            or self.platt_.shape != (m, 2)
        ):
            raise ValueError("saved lexical probe arrays have inconsistent shapes")
        return self
