"""Training a model: the optimizer step, what a run is built of, the EMA, and stopping on a signal."""
