"""`model.image_size`: building SAM at another input side, and every checkpoint at the side it
was trained at; an official 1024 px file loaded at 512 has its position embedding and
global-attention tables interpolated (`sam_lightning.model.weights.resize_to_image_size`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling.image_encoder import get_rel_pos

from sam_lightning.errors import UserError
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.export import save_export
from sam_lightning.model.specs import MODEL_SPECS, build_sam_architecture
from sam_lightning.model.strategies import FullStrategy
from sam_lightning.model.weights import (
    EXPORT_KEY,
    build_sam,
    checkpoint_image_size,
    load_checkpoint,
    load_delta_export,
)
from sam_lightning.pipelines.export import export_checkpoint
from sam_lightning.pipelines.fit import build_task
from tests.conftest import fit_steps, tiny_config


def test_official_file_loads_at_another_side_with_interpolated_tables(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_sam_architecture("tiny")  # 256 px: a 16 x 16 grid, windows of 8
    path = tmp_path / "tiny_256.pth"
    torch.save(trained.state_dict(), path)
    sam, info = load_checkpoint(path, "tiny", image_size=512)
    assert info.kind == "official" and info.image_size == 512
    assert checkpoint_image_size(path) == 256  # what the file itself holds
    old, new = trained.state_dict(), sam.state_dict()
    # position embedding: bicubic from 16 x 16 to 32 x 32
    expected = F.interpolate(
        old["image_encoder.pos_embed"].permute(0, 3, 1, 2), (32, 32), mode="bicubic"
    ).permute(0, 2, 3, 1)
    assert new["image_encoder.pos_embed"].shape == (1, 32, 32, 128)
    assert torch.equal(new["image_encoder.pos_embed"], expected)
    # global blocks: the tables segment-anything's get_rel_pos would interpolate on the fly
    for block in MODEL_SPECS["tiny"].global_attn_indexes:
        table = old[f"image_encoder.blocks.{block}.attn.rel_pos_h"]
        resized = new[f"image_encoder.blocks.{block}.attn.rel_pos_h"]
        assert resized.shape == (63, table.shape[1])
        assert torch.allclose(get_rel_pos(32, 32, table), get_rel_pos(32, 32, resized), atol=0)
    # window blocks keep their 8-wide windows, so their tables (and everything else) stay
    changed = {k for k in old if not torch.equal(old[k], new[k]) if old[k].shape == new[k].shape}
    reshaped = {k for k in old if old[k].shape != new[k].shape}
    assert not changed
    assert reshaped == {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{b}.attn.rel_pos_{a}" for b in (1, 3) for a in "hw"
    }
    # the prompt encoder and the decoder's output follow the side
    assert sam.prompt_encoder.input_image_size == (512, 512)
    assert sam.prompt_encoder.image_embedding_size == (32, 32)
    predictor = SamPredictor(sam.eval())
    predictor.set_image(np.zeros((300, 400, 3), np.uint8))
    assert predictor.features.shape == (1, 128, 32, 32)
    masks, _, low_res = predictor.predict(box=np.array([10, 10, 200, 200]), multimask_output=False)
    assert masks.shape == (1, 300, 400) and low_res.shape == (1, 128, 128)


def test_a_side_that_is_no_multiple_of_the_patch_is_named() -> None:
    with pytest.raises(UserError, match=r"model.image_size=500: expected a positive multiple of"):
        build_sam("tiny", image_size=500)


@pytest.fixture(scope="module")
def run_at_128(tmp_path_factory, synthetic_root) -> tuple[SamTask, Path]:
    """A `tiny` model trained 2 steps at model.image_size=128 (not its own 256) from a 256 px
    base file, and its Lightning checkpoint."""
    out = tmp_path_factory.mktemp("run128")
    torch.manual_seed(0)
    base = out / "tiny_256.pth"
    torch.save(build_sam_architecture("tiny").state_dict(), base)
    cfg = tiny_config(
        "model.image_size=128", f"model.checkpoint={base}", "scheduler.warmup_steps=0"
    )
    task = build_task(cfg)
    assert task.image_size == 128
    trainer = fit_steps(task, synthetic_root, out, steps=2)
    ckpt = out / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return task.eval(), ckpt


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_at_another_side_reloads_at_it_without_being_told(run_at_128, tmp_path, capsys):
    task, ckpt = run_at_128
    assert checkpoint_image_size(ckpt) == 128
    reloaded = SamTask.load_from_checkpoint(ckpt, map_location="cpu")
    assert reloaded.image_size == 128 and _same_weights(reloaded.sam, task.sam)
    sam, info = load_checkpoint(ckpt)  # no size given: the run's
    assert info.image_size == 128 and _same_weights(sam, task.sam)
    # the export records the side (a plain tiny file would be 256 px) and rebuilds at it
    out = export_checkpoint(ckpt, tmp_path / "export.pth")
    assert f"{out}: a tiny model that expects 128 px input" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload[EXPORT_KEY]["image_size"] == 128
    exported = build_sam("tiny", checkpoint=out)
    assert exported.image_encoder.img_size == 128 and _same_weights(exported, task.sam)
    # SamPredictor resizes to the recorded side and gives the task's masks
    predictor = SamPredictor(exported.eval())
    assert predictor.transform.target_length == 128
    image = np.random.default_rng(0).integers(0, 256, (100, 128, 3), dtype=np.uint8)
    predictor.set_image(image)
    box = np.array([10.0, 20.0, 90.0, 80.0])
    _, _, their_low_res = predictor.predict(box=box, multimask_output=False, return_logits=True)
    sample = torch.from_numpy(image).permute(2, 0, 1)
    padded = F.pad(sample, (0, 0, 0, 28))[None]
    with torch.no_grad():
        embedding = task.encode(padded, torch.tensor([[100, 128]]))
        low_res, _ = task.decode(embedding, boxes=torch.from_numpy(box)[None].float())
    assert low_res.shape[-2:] == (32, 32)
    assert np.allclose(their_low_res, low_res[:, 0].numpy(), atol=1e-4, rtol=0)


def test_hf_folder_of_a_run_at_another_side(run_at_128, tmp_path):
    task, ckpt = run_at_128
    folder = export_checkpoint(ckpt, tmp_path / "hf", format="hf")
    sam, info = load_checkpoint(folder)
    assert info.kind == "hf" and info.image_size == 128
    assert _same_weights(sam, task.sam)


def test_delta_of_a_run_at_another_side_goes_on_a_base_at_that_side(run_at_128, tmp_path):
    task, ckpt = run_at_128
    out = export_checkpoint(ckpt, tmp_path / "delta.pth", delta=True)
    payload = torch.load(out, weights_only=True)
    assert payload[EXPORT_KEY]["image_size"] == 128 and payload[EXPORT_KEY]["delta"]
    rebuilt = load_delta_export(out)  # the base file is 256 px: brought to 128 first
    assert rebuilt.image_encoder.img_size == 128 and _same_weights(rebuilt, task.sam)


@pytest.mark.slow
def test_vit_b_at_512_trains_saves_and_reloads(tmp_path: Path) -> None:
    """A vit_b-shaped model (random weights, in the official 1024 px format) at 512 px:
    forward and backward, then saved and rebuilt at 512 without being told."""
    torch.manual_seed(0)
    official = tmp_path / "vit_b_1024.pth"
    torch.save(build_sam_architecture("vit_b").state_dict(), official)
    sam = build_sam("vit_b", checkpoint=official, image_size=512)
    assert sam.image_encoder.pos_embed.shape == (1, 32, 32, 768)
    for block in (2, 5, 8, 11):
        assert sam.image_encoder.blocks[block].attn.rel_pos_h.shape == (63, 64)
    assert sam.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, 64)  # 14-wide windows
    images = torch.randn(1, 3, 512, 512)
    embedding = sam.image_encoder(images)
    assert embedding.shape == (1, 256, 32, 32)
    sparse, dense = sam.prompt_encoder(None, torch.tensor([[[50.0, 60.0, 300.0, 400.0]]]), None)
    low_res, iou = sam.mask_decoder(
        embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
    )
    assert low_res.shape == (1, 1, 128, 128)
    (low_res.sigmoid().mean() + iou.mean()).backward()
    grad = sam.image_encoder.pos_embed.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    out = save_export(sam, FullStrategy(), "vit_b", tmp_path / "vit_b_512.pth")
    reloaded, info = load_checkpoint(out)
    assert info.image_size == 512 and reloaded.image_encoder.img_size == 512
    assert _same_weights(reloaded, sam)
