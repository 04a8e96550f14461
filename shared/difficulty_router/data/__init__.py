"""Data in and out of the router: JSON Lines read and written one way (jsonl), outcome files (which model
answered which query, at what cost), conversations turned into routing queries, graders, and label collection
from real backends (labelling, with the backends it calls and the files it keeps). It knows nothing of the
small LM or the probes, so the same files serve training, evaluation and the benchmarks."""
