"""The bottom floor: the pool of models and their prices, the error types, and the routing arithmetic
(APGR, cost to match the best model, frontier areas) that every stage above reads. No torch, no I/O."""
