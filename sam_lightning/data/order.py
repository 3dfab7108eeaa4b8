"""The training data's order and randomness as functions of (seed, epoch, sample index).

A run that stops and resumes, or that runs on W processes instead of one, must see the same
samples in the same global batches with the same augmentations and prompts. Global random
streams consumed in order cannot give that (a resumed run has not consumed what the straight
run had; two processes consume two streams), so:

- `EpochOrder` draws each epoch's permutation from (seed, epoch), cuts it into global batches
  of `batch_size * W` and gives process r the r-th slice of each: W processes with batch b see
  the global batches of one process with batch W*b. A resumed epoch starts after the batches
  already trained (`skip`).
- `SeededSamples` gives every sample of an epoch its own seeds (`sample_seeds`): the
  augmentation draws from torch's generator seeded with the first, inside `fork_rng` (the
  global stream is left as it was); the second travels with the sample as `prompt_seed`, from
  which `SamTask` draws that image's prompts.
- `ResumableLoader` is a DataLoader whose `state_dict` (which Lightning writes into every
  checkpoint) says where in which epoch training stood, and with which seed, and whose
  `load_state_dict` makes the sampler skip the batches done.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

#: the per-sample key that carries the seed of its training prompts (`SamTask`)
PROMPT_SEED_KEY = "prompt_seed"


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence): nearby inputs such as
    consecutive epochs or indices give unrelated streams."""
    words = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(
        2, dtype=np.uint32
    )
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """(augmentation seed, prompt seed) of dataset item `index` in `epoch`."""
    return mix_seed(seed, epoch, index, 0), mix_seed(seed, epoch, index, 1)


class EpochOrder(DistributedSampler):
    """Yields `(index, epoch)` keys for this process: epoch e's permutation of the dataset (from
    `mix_seed(seed, e)`), cut into global batches of `batch_size * num_replicas`, this process's
    slice of each.

    A global batch that is not full (the epoch's last) is split evenly too; when the dataset size
    is not a multiple of `num_replicas`, the order is padded with its own first indices, as
    `DistributedSampler` does, so every process steps the same number of times.

    A `DistributedSampler`, so Lightning calls `set_epoch` and does not wrap it in another one.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.skip_batches = 0  # batches of `skip_epoch` already trained (a resumed run)
        self.skip_epoch = -1

    def order(self, epoch: int) -> list[int]:
        """This process's dataset indices in `epoch`, the whole epoch."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=generator).tolist()
        else:
            perm = list(range(n))
        world = self.num_replicas
        padded = perm + perm[: (-n) % world]
        step = self.batch_size * world
        mine: list[int] = []
        for start in range(0, len(padded), step):
            chunk = padded[start : start + step]
            share = len(chunk) // world
            mine.extend(chunk[self.rank * share : (self.rank + 1) * share])
        return mine

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        skip = self.skip_batches * self.batch_size if epoch == self.skip_epoch else 0
        self.skip_batches, self.skip_epoch = 0, -1  # a resume skips once
        return iter([(i, epoch) for i in self.order(epoch)[skip:]])

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.num_replicas)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue `epoch` after its first `batches_done` batches (the next epoch if it ended)."""
        if batches_done >= math.ceil(len(self) / self.batch_size):
            self.set_epoch(epoch + 1)
        else:
            self.set_epoch(epoch)
            self.skip_epoch, self.skip_batches = epoch, batches_done


class SeededSamples(Dataset):
    """A dataset read with `(index, epoch)` keys: each item's augmentation randomness comes from
    its own seed (`sample_seeds`), and the item carries the seed of its prompts."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        augment_seed, prompt_seed = sample_seeds(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed)
            sample = dict(self.dataset[index])
        sample[PROMPT_SEED_KEY] = prompt_seed
        return sample


class ResumableLoader(DataLoader):
    """The training DataLoader over `EpochOrder`: stateful for Lightning (`state_dict` goes into
    every checkpoint, `load_state_dict` runs before the resumed run iterates).

    Args:
        progress: returns (epoch, batches of it trained so far); the trainer's loop counters,
            which know what was trained, unlike the loader that prefetches ahead of it.
    """

    def __init__(
        self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        seed = self.sampler.seed if isinstance(self.sampler, EpochOrder) else 0
        return {"epoch": int(epoch), "batches": int(batches), "seed": int(seed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Go on where the state says, with its seed (the run's, even one drawn at random)."""
        if not state or not isinstance(self.sampler, EpochOrder):
            return
        if "seed" in state:
            self.sampler.seed = state["seed"]
            if isinstance(self.dataset, SeededSamples):
                self.dataset.seed = state["seed"]
        self.sampler.resume(state["epoch"], state["batches"])
