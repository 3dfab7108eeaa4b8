"""Model construction and checkpoint loading, including the messages a user reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything import sam_model_registry

from sam_lightning.errors import UserError
from sam_lightning.model.specs import MODEL_SPECS, build_sam_architecture
from sam_lightning.model.weights import build_sam


def test_official_architectures_match_segment_anything() -> None:
    ours = build_sam_architecture("vit_b").state_dict()
    theirs = sam_model_registry["vit_b"]().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_tiny_is_small_and_256px() -> None:
    sam = build_sam("tiny")
    assert sam.image_encoder.img_size == 256
    assert sum(p.numel() for p in sam.parameters()) < 3_000_000


def test_official_format_round_trip(tmp_path: Path) -> None:
    sam = build_sam("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    loaded = build_sam("tiny", checkpoint=path)
    for k, v in sam.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_missing_checkpoint_names_path_and_download(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_b.pth"
    with pytest.raises(UserError) as err:
        build_sam("vit_b", checkpoint=path)
    assert str(path) in str(err.value)
    assert MODEL_SPECS["vit_b"].download_url in str(err.value)


def test_checkpoint_of_another_size_names_both(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), path)
    with pytest.raises(
        UserError, match=r"holds a tiny model but the model is vit_b: set model=tiny"
    ):
        build_sam("vit_b", checkpoint=path)


def test_unknown_model_lists_sizes() -> None:
    with pytest.raises(UserError, match="vit_b"):
        build_sam("vit_x")


def test_garbage_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        build_sam("tiny", checkpoint=path)
