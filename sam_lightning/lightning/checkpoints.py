"""Lightning checkpoints of a run: the ones that leave the frozen weights out
(`checkpoint.trainable_only`), and finding the newest one to resume from (`ckpt_path=last`).

A LoRA r=4 vit_b run trains 4.28 M of 94 M weights: its checkpoints need not carry the other 90 M.
`keep_trainable_only` drops them on save; `restore_frozen` fills them back from the freshly built
model (built from `model.checkpoint`) on load. `sam_lightning.model.weights` reads such files too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sam_lightning.model.weights import TRAINABLE_ONLY_KEY


def keep_trainable_only(
    checkpoint: dict[str, Any], sam: torch.nn.Module, prefix: str = "sam."
) -> int:
    """Drop the frozen `Sam` tensors from a Lightning checkpoint dict, in place.

    What trains, the optimizer state and everything outside `sam` stay, so the run resumes; the
    frozen weights come back from `model.checkpoint` when it is loaded (`restore_frozen`).
    Returns how many tensors were dropped.
    """
    trainable = {prefix + n for n, p in sam.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    kept = {k: v for k, v in state.items() if not k.startswith(prefix) or k in trainable}
    checkpoint["state_dict"] = kept
    checkpoint[TRAINABLE_ONLY_KEY] = True
    return len(state) - len(kept)


def restore_frozen(checkpoint: dict[str, Any], own_state: dict[str, torch.Tensor]) -> int:
    """Fill the tensors a trainable-only checkpoint left out from the freshly built model's state.

    Returns how many were filled (0 for a complete checkpoint).
    """
    if not checkpoint.get(TRAINABLE_ONLY_KEY):
        return 0
    state = checkpoint["state_dict"]
    missing = [k for k in own_state if k not in state]
    for key in missing:
        state[key] = own_state[key]
    return len(missing)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint a run folder holds to resume from, or None.

    Candidates: `checkpoints/last*.ckpt` (written after every validation and epoch) and the
    `hpc_ckpt_N.ckpt` that Lightning writes into the run folder when SLURM signals the end of a
    job's time. Lightning alone prefers any hpc checkpoint, even one older than last.ckpt (a job
    requeued twice, once by its time limit, once by preemption); the newest file is what resumes
    the most work.
    """
    run_dir = Path(run_dir)
    candidates = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("last*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)
