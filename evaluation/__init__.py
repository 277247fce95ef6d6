"""Scoring and showing a model: FID and KID, the metrics log and its curves, and the figures."""
