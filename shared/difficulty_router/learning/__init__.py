"""Learning on arrays: success probes, lexical features, the shared (multidimensional IRT) success model, the
families compared by nested cross-validation, policies and operating points, novelty and output length. Numpy and
scikit-learn only: no torch, no extractor, so what is learned here can be tested without a model."""
