"""Fine-tune Segment Anything with Lightning and Hydra."""
