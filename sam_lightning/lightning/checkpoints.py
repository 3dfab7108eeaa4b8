"""Lightning checkpoints of a run: the ones that leave the frozen weights out
(`checkpoint.trainable_only`), finding the newest one to resume from (`ckpt_path=last`), writing
them so that a kill never leaves half a file (`AtomicCheckpointIO`), and the random states they
carry (`collect_rng_states`).

A LoRA r=4 vit_b run trains 4.28 M of 94 M weights: its checkpoints need not carry the other 90 M.
`keep_trainable_only` drops them on save; `restore_frozen` fills them back from the freshly built
model (built from `model.checkpoint`) on load. `sam_lightning.model.weights` reads such files too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on a local disk: the checkpoint goes to a
    hidden temporary file next to its target (`.last.ckpt.<pid>.tmp`), is flushed to the disk,
    then renamed over the target. A process killed during a save leaves the previous file
    whole (and at worst a stray temporary file that nothing reads); remote paths (`s3://`)
    keep Lightning's writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


#: the checkpoint key of `collect_rng_states`
RNG_STATES_KEY = "rng_states"


def collect_rng_states() -> dict[str, Any]:
    """The global random states (torch CPU, CUDA where present, numpy, Python) as plain types
    and tensors, so the checkpoint still loads with `weights_only=True`."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(internal), "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random states `collect_rng_states` took (CUDA only where the device
    count matches)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
