"""Image-embedding cache (`data.cache_embeddings=true`): run the frozen image encoder once per image.

With a frozen encoder and unaugmented images, every epoch recomputes the same embeddings, and
the encoder is almost all of SAM's compute (ViT-B: about 0.97 TFLOP per 1024 px image against a
few GFLOP for the prompt encoder and mask decoder). The cache computes each embedding once,
stores it in bf16 under a key made of

- the model: a digest of every image-encoder tensor (weights and buffers),
- the preprocessing: pixel mean and std, input size, the padding rule, compute precision,
- the image: a digest of the padded uint8 pixels and the unpadded size,

so a changed checkpoint, preprocessing or image can never read a stale entry: it simply misses and
is recomputed. Files live under `<cache_dir>/<model+preprocessing key>/<image key>.pt`.

The cache is refused (a `UserError` before the first step) when it would be wrong: the image
encoder trains (its output changes every step), or a cached split is augmented (every epoch sees
other pixels than the ones cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sam_lightning.errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
STORAGE_DTYPE = torch.bfloat16
EMBEDDING_KEY = "embedding"  # per-sample key; `collate_samples` stacks it into batch["embedding"]
# The rule `SamTask.preprocess` and `Sam.preprocess` share: normalise, then zero the padding.
PREPROCESSING_RULE = "normalise(pixel_mean, pixel_std) then zero-pad bottom-right"


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    header = f"{t.dtype}:{tuple(t.shape)}:".encode()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: hash the raw 16-bit words
        t = t.view(torch.int16)
    return header + t.numpy().tobytes()


def weights_fingerprint(image_encoder: nn.Module) -> str:
    """Digest of every tensor of the encoder's state dict: any changed weight changes the key."""
    state = image_encoder.state_dict()
    return _digest(name.encode() + _tensor_bytes(state[name]) for name in sorted(state))


def preprocessing_fingerprint(sam: nn.Module, precision: str = "32-true") -> dict[str, Any]:
    """Everything besides weights and pixels that decides an embedding, as plain data."""
    return {
        "format": CACHE_FORMAT,
        "rule": PREPROCESSING_RULE,
        "image_size": int(sam.image_encoder.img_size),
        "pixel_mean": [round(float(v), 6) for v in sam.pixel_mean.flatten()],
        "pixel_std": [round(float(v), 6) for v in sam.pixel_std.flatten()],
        "precision": str(precision),
        "storage": str(STORAGE_DTYPE),
    }


def image_key(sample: Mapping[str, Any]) -> str:
    """Key of one sample's pixels: the padded uint8 image and the size before padding."""
    return _digest([_tensor_bytes(sample["image"]), _tensor_bytes(sample["input_size"])])


class EmbeddingCache:
    """One folder of embeddings for one (encoder weights, preprocessing) pair.

    Args:
        root: the cache folder (`data.cache_dir`); one sub-folder per model key.
        weights: `weights_fingerprint` of the encoder.
        preprocessing: `preprocessing_fingerprint` of the model and run.
    """

    def __init__(self, root: str | Path, weights: str, preprocessing: Mapping[str, Any]) -> None:
        self.root = Path(root)
        meta = {"weights": weights, "preprocessing": dict(preprocessing)}
        self.model_key = _digest([json.dumps(meta, sort_keys=True).encode()])
        self.dir = self.root / self.model_key
        self.meta = meta

    @classmethod
    def for_model(
        cls, root: str | Path, sam: nn.Module, precision: str = "32-true"
    ) -> EmbeddingCache:
        """The cache of `sam`'s current encoder weights and preprocessing."""
        return cls(
            root, weights_fingerprint(sam.image_encoder), preprocessing_fingerprint(sam, precision)
        )

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> torch.Tensor:
        """The stored [C, h, w] bf16 embedding of an image key."""
        path = self.path(key)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(
                f"embedding cache {self.dir} has no entry for an image (key {key}); the dataset "
                "changed after the cache was filled: restart the run to fill it again"
            ) from None

    def save(self, key: str, embedding: torch.Tensor) -> None:
        """Store one [C, h, w] embedding in bf16; atomic, so concurrent writers never corrupt it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            _atomic_write_text(meta_path, json.dumps(self.meta, indent=2))
        tmp = self.path(key).with_suffix(f".tmp{os.getpid()}")
        torch.save(embedding.detach().to("cpu", STORAGE_DTYPE).contiguous().clone(), tmp)
        os.replace(tmp, self.path(key))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class CachedEmbeddingDataset(Dataset):
    """A dataset whose samples carry their cached image embedding under `embedding`."""

    def __init__(self, dataset: Dataset, cache: EmbeddingCache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample[EMBEDDING_KEY] = self.cache.load(image_key(sample))
        return sample

    def __getattr__(self, name: str) -> Any:  # e.g. `.items`, `.image_ids` of the wrapped dataset
        if name in ("dataset", "cache"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


@torch.no_grad()
def fill_cache(
    dataset: Dataset,
    cache: EmbeddingCache,
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    indices: Iterable[int] | None = None,
) -> dict[str, int]:
    """Compute and store the embedding of every sample missing from the cache.

    Args:
        encode: (uint8 images [B, 3, S, S], input_size [B, 2]) -> embeddings [B, C, h, w];
            `SamTask.encode`.
        indices: which samples (default all); ranks of a multi-GPU run each take a share.

    Returns:
        Counts: `computed` and `reused` samples.
    """
    computed = reused = 0
    pending: list[tuple[str, dict[str, Any]]] = []

    def flush() -> None:
        if not pending:
            return
        images = torch.stack([s["image"] for _, s in pending]).to(device)
        sizes = torch.stack([s["input_size"] for _, s in pending]).to(device)
        for (key, _), emb in zip(pending, encode(images, sizes), strict=True):
            cache.save(key, emb)
        pending.clear()

    seen: set[str] = set()
    for index in range(len(dataset)) if indices is None else indices:  # type: ignore[arg-type]
        sample = dataset[index]
        key = image_key(sample)
        if key in cache or key in seen:
            reused += 1
            continue
        seen.add(key)
        pending.append((key, sample))
        computed += 1
        if len(pending) >= batch_size:
            flush()
    flush()
    return {"computed": computed, "reused": reused}


def check_cacheable(
    sam: nn.Module, augment: Mapping[str, Any] | None, splits: Iterable[str]
) -> None:
    """Refuse the cache when it would serve wrong embeddings; the message says how to fix it."""
    training = [n for n, p in sam.image_encoder.named_parameters() if p.requires_grad]
    if training:
        raise UserError(
            "data.cache_embeddings=true needs a frozen image encoder, but the strategy trains "
            f"{len(training)} image-encoder tensors (first: image_encoder.{training[0]}); use "
            "strategy=decoder_only (or one that freezes the whole encoder) or set "
            "data.cache_embeddings=false"
        )
    augmented = [s for s in splits if (augment or {}).get(s)]
    if augmented:
        raise UserError(
            "data.cache_embeddings=true caches the unaugmented images, but split(s) "
            f"{', '.join(augmented)} are augmented (data.augment.{augmented[0]} has "
            f"{len((augment or {})[augmented[0]])} transforms); use data/augment=none or set "
            "data.cache_embeddings=false"
        )


def cached_embeddings(batch: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor | None:
    """The batch's cached embeddings in `like`'s dtype and device, or None without a cache."""
    embeddings = batch.get(EMBEDDING_KEY)
    if embeddings is None:
        return None
    return embeddings.to(device=like.device, dtype=like.dtype)


def attach_embedding_cache(
    sam: nn.Module,
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    datamodule: Any,
    trainer: Any | None = None,
) -> EmbeddingCache | None:
    """Fill the cache for every split of `datamodule` and make its datasets serve embeddings.

    A no-op unless `datamodule.cache_embeddings`. Called by `SamTask.setup`, after the
    datamodule's setup and before any loader exists (`configure_optimizers` already builds the
    train loader); `sam` moves to the run's device for the fill. In a multi-device run each
    rank fills a share and all wait for each other.

    Args:
        sam: the model whose (frozen) image encoder the embeddings come from.
        encode: uint8 images [B, 3, S, S] and input sizes [B, 2] -> embeddings, with the
            run's preprocessing (`SamTask.encode`).
        datamodule: a `SamDataModule` after `setup`.
        trainer: the run's trainer (device, precision, ranks), or None outside a run.
    """
    if not getattr(datamodule, "cache_embeddings", False):
        return None
    datasets: dict[str, Dataset] = datamodule.datasets
    check_cacheable(sam, getattr(datamodule, "augment_cfg", {}), datasets)
    precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
    root = getattr(datamodule, "cache_dir", None) or "embedding_cache"
    cache = EmbeddingCache.for_model(root, sam, precision)
    if trainer is not None:
        sam.to(trainer.strategy.root_device)  # Lightning would move it there next anyway
    device = next(sam.image_encoder.parameters()).device
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    context = _precision_context(trainer)
    was_training = sam.image_encoder.training
    sam.image_encoder.eval()
    try:
        for split, dataset in datasets.items():
            if isinstance(dataset, CachedEmbeddingDataset):
                continue
            with context():
                counts = fill_cache(
                    dataset,
                    cache,
                    encode,
                    batch_size=getattr(datamodule, "batch_size", 4),
                    device=device,
                    indices=range(rank, len(dataset), world),  # type: ignore[arg-type]
                )
            log.info("embedding cache %s, split %s: %s", cache.dir, split, counts)
            datasets[split] = CachedEmbeddingDataset(dataset, cache)
    finally:
        sam.image_encoder.train(was_training)
    if trainer is not None and world > 1:
        trainer.strategy.barrier("embedding_cache")
    return cache


def _precision_context(trainer: Any | None) -> Callable[[], Any]:
    """The trainer's autocast context (bf16-mixed computes embeddings as training would)."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    if plugin is not None and hasattr(plugin, "forward_context"):
        return plugin.forward_context
    return torch.no_grad  # any context manager; fill_cache is no_grad already
