"""Encoder features: hooks capture exactly what the modules output, files round-trip with their
shapes in their names, CKA behaves (1.0 against itself, ~0 for unrelated features) and shows where a
freeze run changed the encoder; the CLI writes the manifest, report and pictures."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT

from sam_lightning.config import compose_config
from sam_lightning.errors import UserError
from sam_lightning.evaluation.feature_report import embed_2d, token_similarity
from sam_lightning.evaluation.features import (
    FeatureSimilarity,
    capture_features,
    crop_boxes,
    image_views,
    linear_cka,
)
from sam_lightning.model.features import capture_encoder, resolve_modules
from sam_lightning.model.specs import MODEL_SPECS
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.features import run_features
from tests.conftest import fit_steps, tiny_task


def _image(seed: int, height: int = 200, width: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    img[50:150, 100:220] = [250, 30, 30]
    return img


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam("tiny").eval()


def manual_encoder(encoder: ImageEncoderViT, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """ImageEncoderViT.forward written out, each step channel-first: what the hooks must give."""
    with torch.no_grad():
        x = encoder.patch_embed(pixels)
        out = {"patch_embed": x.permute(0, 3, 1, 2)}
        x = x + encoder.pos_embed
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            out[f"blocks.{i}"] = x.permute(0, 3, 1, 2)
        out["neck"] = encoder.neck(x.permute(0, 3, 1, 2))
    return out


def test_tiny_captures_equal_module_outputs_and_the_predictor(tiny_sam: torch.nn.Module) -> None:
    image = _image(0)
    names = resolve_modules(tiny_sam.image_encoder, ["patch_embed", "blocks.*", "neck"])
    assert names == ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "neck"]
    feats = capture_features(tiny_sam, {"a": image}, ["patch_embed", "blocks.*", "neck"], crops=4)
    views = image_views(tiny_sam, image, crops=4)
    for view, pixels in views.pixels.items():
        expected = manual_encoder(tiny_sam.image_encoder, pixels)
        for name in names:
            assert torch.equal(feats["a"][name][view], expected[name]), (name, view)
    assert feats["a"]["blocks.2"]["global"].shape == (1, 128, 16, 16)
    assert feats["a"]["neck"]["crops"].shape == (4, 128, 16, 16)  # the crops: one batch
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)  # the global view is the image as SamPredictor sees it
    assert torch.equal(feats["a"]["neck"]["global"], predictor.features)
    # a windowed-attention module: windows become the batch, channel-first like the rest
    inner = capture_encoder(tiny_sam.image_encoder, views.pixels["global"], ["blocks.0.attn"])
    assert inner["blocks.0.attn"].shape == (4, 128, 8, 8)


def test_vit_b_shaped_encoder_captures_module_output_shapes() -> None:
    spec = MODEL_SPECS["vit_b"]
    torch.manual_seed(0)
    encoder = ImageEncoderViT(  # vit_b's width, depth, heads and windows on a 256 px input
        depth=spec.encoder_depth,
        embed_dim=spec.encoder_embed_dim,
        img_size=256,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.encoder_num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    ).eval()
    pixels = torch.randn(2, 3, 256, 256)
    names = ["patch_embed", "blocks.0", "blocks.5", "blocks.11", "neck"]
    got = capture_encoder(encoder, pixels, names)
    expected = manual_encoder(encoder, pixels)
    assert {n: tuple(t.shape) for n, t in got.items()} == {
        "patch_embed": (2, 768, 16, 16),
        "blocks.0": (2, 768, 16, 16),
        "blocks.5": (2, 768, 16, 16),
        "blocks.11": (2, 768, 16, 16),
        "neck": (2, 256, 16, 16),
    }
    assert all(torch.equal(got[n], expected[n]) for n in names)


def test_wrong_layer_name_lists_the_valid_ones(tiny_sam: torch.nn.Module) -> None:
    with pytest.raises(UserError) as err:
        resolve_modules(tiny_sam.image_encoder, ["blocks.0", "block.5"])
    message = str(err.value)
    assert "'block.5'" in message and "patch_embed" in message and "blocks.3" in message
    assert "neck" in message and "blocks.*" in message and ", blocks," not in message
    assert len(resolve_modules(tiny_sam.image_encoder, ["blocks.*.attn"])) == 4
    assert "blocks.0.mlp.lin1" in resolve_modules(tiny_sam.image_encoder, ["blocks.**"])


def test_crop_boxes_cover_the_image_as_a_grid_or_sliding_window() -> None:
    assert crop_boxes(200, 300, 4) == [
        (0, 0, 150, 100), (150, 0, 300, 100), (0, 100, 150, 200), (150, 100, 300, 200)
    ]  # fmt: skip
    assert crop_boxes(100, 400, 4) == [(0, 0, 100, 100), (100, 0, 200, 100), (200, 0, 300, 100),
                                       (300, 0, 400, 100)]  # fmt: skip
    # half-tile overlap: 3 windows of 150 px at a 75 px stride across 300 px
    assert [b[0::2] for b in crop_boxes(100, 300, 3, overlap=0.5)] == [
        (0, 150),
        (75, 225),
        (150, 300),
    ]
    assert crop_boxes(100, 100, 0) == []


def test_cka_is_one_against_itself_and_near_zero_for_unrelated_features() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 32, 32, generator=generator)
    y = torch.randn(4, 64, 32, 32, generator=generator)
    assert linear_cka(x, x) == 1.0
    assert linear_cka(x, y) < 0.03  # 4096 tokens, 64 channels: E[CKA] ~ 64/4096
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    turned = torch.einsum("bchw,cd->bdhw", x, rotation) * 3.0 + 1.0
    assert linear_cka(x, turned) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    halves = FeatureSimilarity()  # streamed image by image = all at once
    halves.update(x[:2], y[:2])
    halves.update(x[2:], y[2:])
    assert halves.result()["cka"] == pytest.approx(linear_cka(x, y), rel=1e-9)
    same = FeatureSimilarity()
    same.update(x, x)
    assert same.result()["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert same.result()["max_abs_difference"] == 0.0


def test_freeze_run_changes_only_the_trained_block(synthetic_root: Path, tmp_path: Path) -> None:
    """strategy=freeze training only the last encoder block: every module before it is exactly
    the base's (CKA 1.0, no difference), the block itself and the neck after it are not."""
    torch.manual_seed(0)
    task = tiny_task(
        "strategy=freeze", "strategy.unfreeze_last_blocks=1", "strategy.mask_decoder=true"
    )
    trainable = [n for n, p in task.sam.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("image_encoder.blocks.3.") for n in trainable)
    base = copy.deepcopy(task.sam).eval()
    fit_steps(task, synthetic_root, tmp_path, steps=2)
    trained = task.sam.eval()
    layers = ["patch_embed", "blocks.*", "neck"]
    images = {"a": _image(0), "b": _image(1, 240, 180)}
    ours = capture_features(trained, images, layers, crops=2)
    theirs = capture_features(base, images, layers, crops=2)
    results = {}
    for name in ours["a"]:
        similarity = FeatureSimilarity()
        for key in images:
            for view in ("global", "crops"):
                similarity.update(ours[key][name][view], theirs[key][name][view])
        results[name] = similarity.result()
    for name in ("patch_embed", "blocks.0", "blocks.1", "blocks.2"):
        assert results[name]["cka"] == 1.0 and results[name]["max_abs_difference"] == 0.0, name
    for name in ("blocks.3", "neck"):
        assert results[name]["cka"] < 1.0 and results[name]["max_abs_difference"] > 1e-4, name


@pytest.fixture(scope="module")
def feature_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.pth, other.pth (another random tiny model) and images/ with 4 images of mixed sizes."""
    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    torch.save(build_sam("tiny").state_dict(), root / "tiny.pth")
    torch.manual_seed(1)
    torch.save(build_sam("tiny").state_dict(), root / "other.pth")
    (root / "images").mkdir()
    for i, (h, w) in enumerate([(200, 300), (256, 256), (120, 400), (300, 180)]):
        Image.fromarray(_image(i, h, w)).save(root / "images" / f"img{i}.png")
    return root


def features_config(root: Path, out: Path, *overrides: str):
    return compose_config(
        "features",
        [f"ckpt={root / 'tiny.pth'}", f"images={root / 'images'}", f"out_dir={out}", "device=cpu",
         *overrides],
    )  # fmt: skip


def test_cli_writes_files_manifest_report_pictures(feature_inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    layers = "layers=[patch_embed,blocks.0,neck]"  # the default's blocks.5: tiny has 4 blocks
    manifest = run_features(features_config(feature_inputs, out, "pictures=1", layers))
    assert manifest["layers"] == ["patch_embed", "blocks.0", "neck"]
    assert len(manifest["files"]) == 4 * 3 * 2  # images x modules x views
    sam = build_sam("tiny", feature_inputs / "tiny.pth").eval()
    image = np.asarray(Image.open(feature_inputs / "images" / "img2.png").convert("RGB"))
    expected = capture_features(sam, {"img2": image}, manifest["layers"], crops=4)["img2"]
    for entry in manifest["files"]:
        array = np.load(out / entry["file"])
        b, c, h, w = entry["shape"]
        assert array.shape == (b, c, h, w) and array.dtype == np.float32
        assert Path(entry["file"]).name == (
            f"{entry['image']}_{entry['module']}_{entry['view']}_{b}x{c}x{h}x{w}.npy"
        )
        assert (b, c, h, w) == ((1 if entry["view"] == "global" else 4), 128, 16, 16)
        assert entry["stats"]["max"] == pytest.approx(float(array.max()), rel=1e-6)
        assert entry["stats"]["mean"] == pytest.approx(float(array.mean()), rel=1e-4, abs=1e-6)
        assert (
            0.0 <= entry["stats"]["near_zero_fraction"] <= 1.0 and len(entry["top_channels"]) == 10
        )
        if entry["image"] == "img2":  # the files hold exactly what capture_features returns
            np.testing.assert_array_equal(array, expected[entry["module"]][entry["view"]].numpy())
    pictures = manifest["images"][0]["pictures"]
    assert set(pictures) == set(manifest["layers"]) and not manifest["images"][1]["pictures"]
    for kinds in pictures.values():
        assert set(kinds) == {"channels", "maps", "importance", "pca", "similarity", "embedding"}
        for path in kinds.values():
            with Image.open(out / path) as png:
                assert png.width > 200 and png.height > 150
    report = (out / "report.md").read_text()
    assert "1x128x16x16" in report and "4x128x16x16" in report
    top = ", ".join(str(c) for c, _ in manifest["files"][0]["top_channels"])
    assert top in report and "![neck pca](pictures/img0/neck_pca.png)" in report
    assert json.loads((out / "manifest.json").read_text())["files"] == manifest["files"]
    assert not (out / "compare.json").exists()


def test_cli_options_halve_files_and_subsample_channels(
    feature_inputs: Path, tmp_path: Path
) -> None:
    overrides = ["pictures=0", "layers=[neck]", "crops=0", "dtype=float16", "channel_stride=4"]
    manifest = run_features(features_config(feature_inputs, tmp_path, *overrides))
    entry = manifest["files"][0]
    assert entry["shape"] == [1, 32, 16, 16] and entry["dtype"] == "float16"
    assert (tmp_path / entry["file"]).stat().st_size == 128 + 32 * 16 * 16 * 2
    assert all(c % 4 == 0 for c, _ in entry["top_channels"])  # numbered as in the module
    bf16 = run_features(
        features_config(feature_inputs, tmp_path / "bf16", "pictures=0", "layers=[neck]",
                        "crops=0", "precision=bfloat16")
    )  # fmt: skip
    full = run_features(
        features_config(feature_inputs, tmp_path / "fp32", "pictures=0", "layers=[neck]", "crops=0")
    )
    assert bf16["files"][0]["dtype"] == "float32"  # captured in bf16, saved as float32
    low = np.load(tmp_path / "bf16" / bf16["files"][0]["file"])
    high = np.load(tmp_path / "fp32" / full["files"][0]["file"])
    assert not np.array_equal(low, high) and np.abs(low - high).mean() < 0.05 * np.abs(high).mean()
    with pytest.raises(UserError, match="bfloat16"):
        run_features(features_config(feature_inputs, tmp_path, "dtype=bfloat16"))
    with pytest.raises(UserError, match="block.7"):
        run_features(features_config(feature_inputs, tmp_path, "layers=[block.7]"))


def test_cli_baseline_comparison(feature_inputs: Path, tmp_path: Path) -> None:
    common = ["pictures=0", "layers=[patch_embed,blocks.*,neck]", "crops=2"]
    itself = run_features(
        features_config(
            feature_inputs, tmp_path / "a", *common, f"baseline={feature_inputs / 'tiny.pth'}"
        )
    )["compare"]
    assert all(
        row["cka"] == 1.0 and row["max_abs_difference"] == 0.0 for row in itself["modules"].values()
    )
    other = run_features(
        features_config(
            feature_inputs, tmp_path / "b", *common, f"baseline={feature_inputs / 'other.pth'}"
        )
    )["compare"]
    written = json.loads((tmp_path / "b" / "compare.json").read_text())
    assert written["modules"] == other["modules"] and (tmp_path / "b" / "compare.png").is_file()
    assert list(other["modules"]) == [
        "patch_embed",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "neck",
    ]
    assert all(row["cka"] < 0.999 for row in other["modules"].values())
    assert all(
        row["tokens"] == 4 * 3 * 256 for row in other["modules"].values()
    )  # 4 images x 3 views
    assert "linear CKA" in (tmp_path / "b" / "report.md").read_text()


def test_similarity_and_tsne_embedding() -> None:
    feats = {"global": torch.randn(1, 8, 4, 4), "crops": torch.randn(2, 8, 4, 4)}
    sizes = {"global": [(64, 64)], "crops": [(64, 32), (64, 64)]}
    labels, counts, matrix = token_similarity(feats, sizes, 64)
    assert labels == ["global", "crop 0", "crop 1"] and counts == [16, 8, 16]  # padding cut away
    assert torch.allclose(matrix.diagonal(), torch.ones(40, dtype=torch.float64))
    points = embed_2d(np.random.default_rng(0).normal(size=(60, 8)), "tsne")
    assert points.shape == (60, 2) and np.isfinite(points).all()


def test_cli_prints_a_wrong_layer_without_traceback(feature_inputs: Path, tmp_path: Path) -> None:
    """`python -m sam_lightning.features` through Hydra: blocks.5, which the 4-block tiny model
    lacks, gives one message with the valid names, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "sam_lightning.features", f"ckpt={feature_inputs / 'tiny.pth'}",
         f"images={feature_inputs / 'images'}", f"out_dir={tmp_path}",
         "layers=[patch_embed,blocks.5]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert "'blocks.5'" in done.stderr + done.stdout and "blocks.3" in done.stderr + done.stdout
