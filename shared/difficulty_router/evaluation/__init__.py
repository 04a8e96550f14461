"""Held-out evaluation: the router against tuned baselines on the same rows, with intervals over splits,
and the report (tables and plots) people read."""
