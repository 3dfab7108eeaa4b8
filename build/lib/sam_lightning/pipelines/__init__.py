"""Pipelines: config in, files out. One per command (fit, evaluate, predict, export, inspect)."""
