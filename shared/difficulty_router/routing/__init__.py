"""A fitted router and its decisions: `DifficultyRouter` ties an extractor read-out to learned probes and a
policy; decisions, sessions (sticky and cache-aware) and the decision log live beside it."""
