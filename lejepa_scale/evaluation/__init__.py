"""Frozen-feature evaluation: the feature extractor and the probes (linear, k-NN, few-shot)."""
