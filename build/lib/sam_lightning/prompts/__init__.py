"""Prompts: simulated clicks, the training prompt sampler, SAM's interactive session."""
