"""Data in and out of the router: outcome files (which model answered which query, at what cost),
conversations turned into routing queries, graders, and label collection from real backends. It knows
nothing of the small LM or the probes, so the same files serve training, evaluation and the benchmarks."""
