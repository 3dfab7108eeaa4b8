"""Embedding cache: keyed by image, weights and preprocessing; refused when it would be wrong."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from sam_lightning.data.cache import (
    EMBEDDING_KEY,
    CachedEmbeddingDataset,
    EmbeddingCache,
    attach_embedding_cache,
    cached_embeddings,
    check_cacheable,
    fill_cache,
    image_key,
)
from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.data.sample import collate_samples, make_sample
from sam_lightning.errors import UserError
from sam_lightning.model.specs import build_sam_architecture
from sam_lightning.model.strategies import (
    AdapterStrategy,
    DecoderOnlyStrategy,
    FullStrategy,
)
from tests.conftest import tiny_task

DECODER_ONLY = {"_target_": "sam_lightning.model.strategies.DecoderOnlyStrategy"}


def random_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        masks = np.zeros((1, 96, 128), dtype=bool)
        masks[0, 20:60, 30:90] = True
        samples.append(make_sample(image, masks, 256, f"img{i}"))
    return samples


class CountingEncoder:
    """`SamTask.encode`-like callable that counts the images it encodes."""

    def __init__(self, sam: torch.nn.Module) -> None:
        self.sam = sam
        self.images = 0

    def __call__(self, images: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        x = (images.float() - self.sam.pixel_mean) / self.sam.pixel_std
        return self.sam.image_encoder(x)


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam_architecture("tiny").eval()


def test_image_key_follows_pixels_and_size():
    a, b = random_samples(2)
    assert image_key(a) == image_key(dict(a))
    assert image_key(a) != image_key(b)
    shifted = dict(a, input_size=a["input_size"] - 1)
    assert image_key(shifted) != image_key(a)
    one_pixel = dict(a, image=a["image"].clone())
    one_pixel["image"][0, 0, 0] ^= 1
    assert image_key(one_pixel) != image_key(a)


def test_fill_then_reuse_and_stored_values(sam, tmp_path):
    samples = random_samples(3)
    encode = CountingEncoder(sam)
    cache = EmbeddingCache.for_model(tmp_path, sam)
    assert fill_cache(samples, cache, encode, batch_size=2) == {"computed": 3, "reused": 0}
    assert encode.images == 3
    again = EmbeddingCache.for_model(tmp_path, sam)
    assert again.dir == cache.dir
    assert fill_cache(samples, again, encode) == {"computed": 0, "reused": 3}
    assert encode.images == 3  # nothing recomputed
    stored = again.load(image_key(samples[1]))
    assert stored.dtype == torch.bfloat16 and stored.shape == (128, 16, 16)
    with torch.no_grad():
        fresh = encode(samples[1]["image"][None], samples[1]["input_size"][None])[0]
    assert torch.equal(stored, fresh.to(torch.bfloat16))


@pytest.mark.parametrize("change", ["weights", "pixel_mean", "precision"])
def test_cache_is_rebuilt_when_model_or_preprocessing_changes(sam, tmp_path, change):
    import copy

    samples = random_samples(2)
    first = EmbeddingCache.for_model(tmp_path, sam)
    fill_cache(samples, first, CountingEncoder(sam))
    other = copy.deepcopy(sam)
    precision = "32-true"
    with torch.no_grad():
        if change == "weights":
            other.image_encoder.blocks[0].attn.proj.weight[0, 0] += 1e-3
        elif change == "pixel_mean":
            other.pixel_mean[0] += 1.0
        else:
            precision = "bf16-mixed"
    second = EmbeddingCache.for_model(tmp_path, other, precision)
    assert second.dir != first.dir
    encode = CountingEncoder(other)
    assert fill_cache(samples, second, encode) == {"computed": 2, "reused": 0}
    assert encode.images == 2
    if change != "precision":  # the new entries are the new model's embeddings
        key = image_key(samples[0])
        assert not torch.equal(second.load(key), first.load(key))


def test_cached_dataset_feeds_the_batch(sam, tmp_path):
    samples = random_samples(2)
    cache = EmbeddingCache.for_model(tmp_path, sam)
    fill_cache(samples, cache, CountingEncoder(sam))
    dataset = CachedEmbeddingDataset(samples, cache)
    batch = collate_samples([dataset[0], dataset[1]])
    assert batch[EMBEDDING_KEY].shape == (2, 128, 16, 16)
    emb = cached_embeddings(batch, sam.pixel_mean)
    assert emb.dtype == torch.float32
    assert cached_embeddings({"images": batch["images"]}, sam.pixel_mean) is None
    missing = CachedEmbeddingDataset(random_samples(1, seed=9), cache)
    with pytest.raises(UserError, match="no entry"):
        missing[0]


@pytest.mark.parametrize(
    "strategy", [FullStrategy(), AdapterStrategy(bottleneck=4)], ids=["full", "adapter"]
)
def test_refused_when_the_encoder_trains(strategy):
    sam = strategy.apply(build_sam_architecture("tiny"))
    with pytest.raises(UserError, match=r"frozen image encoder.*strategy=decoder_only"):
        check_cacheable(sam, {}, ["train", "val"])


def test_refused_with_augmentation_and_accepted_without():
    sam = DecoderOnlyStrategy().apply(build_sam_architecture("tiny"))
    augment = {"train": [object(), object()], "val": []}
    with pytest.raises(UserError, match=r"split\(s\) train are augmented.*data/augment=none"):
        check_cacheable(sam, augment, ["train", "val"])
    check_cacheable(sam, {"train": [], "val": None}, ["train", "val"])


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images (4 train, 2 val): the fill and one epoch stay quick."""
    from sam_lightning.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("small"), num_train=4, num_val=2)


def datamodule(root: Path, cache_dir: Path, cache: bool = True) -> SamDataModule:
    return SamDataModule(
        kind="directory",
        root=str(root),
        image_size=256,
        batch_size=2,
        num_workers=0,
        validate=False,  # validation has its own tests; keep this one fast
        cache_embeddings=cache,
        cache_dir=str(cache_dir),
    )


def test_training_from_the_cache_never_runs_the_encoder(small_root, tmp_path):
    torch.manual_seed(0)
    task = tiny_task("model.attention=eager", "strategy=decoder_only")
    dm = datamodule(small_root, tmp_path / "cache")
    calls = []
    task.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=dm)
    n_images = sum(len(d) for d in dm.datasets.values())
    assert n_images == 6 and sum(calls) == n_images  # only the fill: one encoding per image
    assert all(isinstance(d, CachedEmbeddingDataset) for d in dm.datasets.values())
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == n_images
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # A second run over the same data and weights reads the cache and encodes nothing.
    calls.clear()
    dm2 = datamodule(small_root, tmp_path / "cache")
    dm2.setup("fit")
    attach_embedding_cache(task.sam, task.encode, dm2)
    assert calls == []
    # Decoding from the bf16 cache matches decoding from a fresh float32 embedding.
    sample = dm2.datasets["val"][0]
    with torch.no_grad():
        fresh = task.encode(sample["image"][None], sample["input_size"][None])
        cached = sample[EMBEDDING_KEY][None].float()
        a, _ = task.decode(fresh, boxes=sample["boxes"])
        b, _ = task.decode(cached, boxes=sample["boxes"])
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 2e-2, rel  # measured 0.0016 (bf16 rounding, torch.manual_seed(0) above)


def test_fit_refuses_the_cache_when_the_encoder_trains(small_root, tmp_path):
    task = tiny_task("strategy=full")
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(UserError, match="frozen image encoder"):
        trainer.fit(task, datamodule=datamodule(small_root, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
