"""Datasets, the per-image sample contract and the data module."""
