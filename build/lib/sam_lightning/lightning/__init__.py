"""Lightning: `SamTask`, its callbacks, and trainable-only checkpoints."""
