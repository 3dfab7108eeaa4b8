"""Export after a short training run: the exported model in `SamPredictor` equals the trained task.

Also: trainable-only checkpoints (small, resumable, loadable), `load_from_checkpoint(...).sam`,
delta exports, the CLI's messages, and the other formats, each against `SamPredictor` on the
same trained weights: ONNX graphs in onnxruntime, a transformers `SamModel` folder (and back
through `build_sam`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import transformers
from segment_anything import SamPredictor

from sam_lightning.data.sample import make_sample
from sam_lightning.errors import UserError
from sam_lightning.export import main as export_main
from sam_lightning.lightning.checkpoints import keep_trainable_only
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.hf import HF_TIED_KEY, hf_config, sam_to_hf_state_dict, write_hf_folder
from sam_lightning.model.specs import MODEL_SPECS, build_sam_architecture
from sam_lightning.model.strategies import LoRAStrategy, lora_layers
from sam_lightning.model.weights import TRAINABLE_ONLY_KEY, build_sam, load_delta_export
from sam_lightning.pipelines.export import export_checkpoint
from sam_lightning.pipelines.fit import build_task
from tests.conftest import fit_steps, tiny_config, tiny_task

STRATEGIES = {
    "lora": {
        "_target_": "sam_lightning.model.strategies.LoRAStrategy",
        "r": 4,
        "lora_alpha": 8.0,
        "targets": ["qkv", "proj", "lin2"],
        "decoder_attention": True,
    },
    "adapter": {
        "_target_": "sam_lightning.model.strategies.AdapterStrategy",
        "bottleneck": 16,
        "placement": ["attn", "mlp"],
    },
}


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> Path:
    """Random `tiny` weights in segment-anything's format, standing in for an official file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "sam_tiny.pth"
    torch.save(build_sam_architecture("tiny").state_dict(), path)
    return path


def new_task(strategy: str, base: Path, trainable_only: bool = False) -> SamTask:
    cfg = tiny_config(
        f"model.checkpoint={base}",
        "optimizer.lr=1e-2",
        "optimizer.weight_decay=0.0",
        "scheduler.warmup_steps=0",
        f"checkpoint.trainable_only={trainable_only}",
    )
    cfg.strategy = STRATEGIES[strategy]
    return build_task(cfg)


@pytest.fixture(scope="module", params=list(STRATEGIES))
def run(request, tmp_path_factory, synthetic_root, base_weights) -> tuple[SamTask, Path, str]:
    """A `tiny` model trained for 3 steps with the strategy, and its Lightning checkpoint."""
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    torch.manual_seed(0)
    task = new_task(request.param, base_weights)
    trainer = fit_steps(task, synthetic_root, out, steps=3)
    ckpt = out / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return task.eval(), ckpt, request.param


def example() -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(200, 256, 3), dtype=np.uint8)  # padded at the bottom
    masks = np.zeros((3, 200, 256), dtype=bool)
    masks[0, 20:90, 30:120] = True
    masks[1, 100:190, 150:250] = True
    masks[2, 5:60, 180:240] = True
    return image, make_sample(image, masks, 256, "x")


def task_outputs(task: SamTask, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embedding = task.encode(sample["image"][None], sample["input_size"][None])
        return task.decode(embedding, boxes=sample["boxes"])


def predictor_outputs(sam, image: np.ndarray, sample: dict):
    predictor = SamPredictor(sam.eval())
    predictor.set_image(image)
    boxes = predictor.transform.apply_boxes_torch(sample["boxes"], image.shape[:2])
    with torch.no_grad():
        return predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)


def test_exported_model_in_predictor_equals_trained_task(run, tmp_path, base_weights):
    task, ckpt, strategy = run
    out = export_checkpoint(ckpt, tmp_path / "export.pth")
    if strategy == "lora":  # a plain segment-anything state dict
        exported = build_sam_architecture("tiny")
        exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    else:  # adapters come back through build_sam
        exported = build_sam("tiny", checkpoint=out)
    image, sample = example()
    low_res, iou = task_outputs(task, sample)
    masks, their_iou, their_low_res = predictor_outputs(exported, image, sample)
    assert their_low_res.shape == low_res.shape == (3, 1, 64, 64)
    assert torch.allclose(their_low_res, low_res, atol=1e-4, rtol=0)
    assert torch.allclose(their_iou, iou, atol=1e-4, rtol=0)
    logits = task.upscale(low_res)[..., :200, :256]
    confident = logits.abs() > 1e-3
    assert torch.equal(masks[confident], (logits > 0)[confident])
    # Training moved the model away from its base: the comparison is not of two base models.
    base = build_sam("tiny", checkpoint=base_weights)
    _, _, base_low_res = predictor_outputs(base, image, sample)
    assert (base_low_res - low_res).abs().max() > 1e-2


def test_load_from_checkpoint_sam_is_the_trained_sam(run):
    task, ckpt, _ = run
    loaded = SamTask.load_from_checkpoint(ckpt, map_location="cpu").sam
    expected = task.sam.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_delta_export_through_cli(run, tmp_path, capsys):
    task, ckpt, strategy = run
    out = tmp_path / "delta.pth"
    export_main([f"ckpt={ckpt}", f"out={out}", "delta=true"])
    assert "wrote delta export" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["sam_lightning"]["strategy"] == STRATEGIES[strategy]
    trainable = sum(p.numel() for p in task.sam.parameters() if p.requires_grad)
    assert sum(v.numel() for v in payload["state_dict"].values()) == trainable
    rebuilt = load_delta_export(out)  # base weights from the path recorded in the file
    via_build = build_sam("tiny", checkpoint=out)
    assert all(torch.equal(via_build.state_dict()[k], v) for k, v in rebuilt.state_dict().items())
    image, sample = example()
    _, _, low_res = predictor_outputs(rebuilt, image, sample)
    assert torch.allclose(low_res, task_outputs(task, sample)[0], atol=1e-5, rtol=0)


def test_trainable_only_checkpoint_is_small_loads_and_resumes(
    tmp_path, synthetic_root, base_weights
):
    torch.manual_seed(0)
    task = new_task("lora", base_weights, trainable_only=True)
    trainer = fit_steps(task, synthetic_root, tmp_path, steps=2)
    ckpt = tmp_path / "small.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw[TRAINABLE_ONLY_KEY] is True
    trainable = {"sam." + n for n, p in task.sam.named_parameters() if p.requires_grad}
    saved = {k for k in raw["state_dict"] if k.startswith("sam.")}
    assert saved == trainable
    assert raw["optimizer_states"]  # what resuming needs stays
    full = tmp_path / "full.ckpt"
    task.checkpoint_cfg["trainable_only"] = False
    trainer.save_checkpoint(full)
    task.checkpoint_cfg["trainable_only"] = True
    frozen_bytes = 4 * sum(p.numel() for p in task.sam.parameters() if not p.requires_grad)
    assert full.stat().st_size - ckpt.stat().st_size > 0.95 * frozen_bytes

    loaded = SamTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    expected = task.sam.state_dict()
    assert all(torch.equal(loaded.sam.state_dict()[k], v) for k, v in expected.items())
    plain_sam = build_sam("tiny", checkpoint=ckpt)  # frozen weights read from the base file
    assert all(torch.equal(plain_sam.state_dict()[k], v) for k, v in expected.items())

    resumed = new_task("lora", base_weights, trainable_only=True)
    trainer = fit_steps(resumed, synthetic_root, tmp_path, steps=3, ckpt_path=str(ckpt))
    assert trainer.global_step == 3
    frozen = "image_encoder.blocks.0.attn.qkv.base_layer.weight"
    assert torch.equal(resumed.sam.state_dict()[frozen], expected[frozen])

    image, sample = example()
    out = export_checkpoint(ckpt, tmp_path / "merged.pth")
    exported = build_sam_architecture("tiny")
    exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _, _, low_res = predictor_outputs(exported, image, sample)
    assert torch.allclose(low_res, task_outputs(task.eval(), sample)[0], atol=1e-4, rtol=0)


def test_trainable_only_needs_base_weights():
    with pytest.raises(UserError, match="trainable_only=true needs model.checkpoint"):
        tiny_task("checkpoint.trainable_only=true")


def test_other_model_size_names_both(run, tmp_path, capsys):
    _, ckpt, _ = run
    with pytest.raises(UserError, match="holds a tiny model but the model is vit_b"):
        export_checkpoint(ckpt, tmp_path / "x.pth", model="vit_b")
    task = tiny_task()
    fake = {"hyper_parameters": {"model": {"name": "vit_h"}}, "state_dict": {}}
    with pytest.raises(UserError, match="holds a vit_h model but the model is tiny"):
        task.on_load_checkpoint(fake)
    with pytest.raises(SystemExit) as exit_info:
        export_main([f"ckpt={ckpt}", f"out={tmp_path / 'x.pth'}", "model=vit_b"])
    assert exit_info.value.code == 2
    assert "tiny" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ckpt=nowhere.ckpt", "out=x.pth"], "checkpoint not found: nowhere.ckpt"),
        (["ckpt=a.ckpt"], "missing out"),
        (["ckpt=a.ckpt", "out=x.pth", "size=vit_b"], "unknown argument 'size=vit_b'"),
        (["ckpt=a.ckpt", "out=x", "format=tflite"], "format=tflite: expected one of sam, onnx, hf"),
        (["ckpt=a.ckpt", "out=x", "onnx.single_mask=maybe"], "onnx.single_mask must be true or"),
        (["ckpt=a.ckpt", "out=x", "format=hf", "delta=true"], "delta=true writes a segment-anyth"),
    ],
)
def test_cli_messages(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_rejects_an_export_as_ckpt(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(build_sam_architecture("tiny").state_dict(), path)
    with pytest.raises(UserError, match="not a Lightning checkpoint"):
        export_checkpoint(path, tmp_path / "out.pth")


# ------------------------------------------------------------------------ ONNX and transformers


def preprocessed(sam, image: np.ndarray) -> tuple[SamPredictor, torch.Tensor]:
    """`SamPredictor` set on `image`, and the image as `Sam.preprocess` leaves it [1, 3, S, S]."""
    predictor = SamPredictor(sam.eval())
    predictor.set_image(image)
    resized = predictor.transform.apply_image(image)
    pixels = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
    return predictor, sam.preprocess(pixels)


def decoder_feed(embedding, coords, labels, image_shape, mask=None) -> dict[str, np.ndarray]:
    """decoder.onnx's inputs, named and shaped as segment-anything's `SamOnnxModel` takes them."""
    side = 4 * embedding.shape[-1]
    return {
        "image_embeddings": embedding,
        "point_coords": np.asarray(coords, np.float32)[None],
        "point_labels": np.asarray(labels, np.float32)[None],
        "mask_input": np.zeros((1, 1, side, side), np.float32) if mask is None else mask,
        "has_mask_input": np.array([0.0 if mask is None else 1.0], np.float32),
        "orig_im_size": np.array(image_shape[:2], np.float32),
    }


@pytest.fixture(scope="module")
def onnx_run(run, tmp_path_factory) -> tuple[SamTask, Path, str, Path]:
    """The trained run exported through the CLI with format=onnx."""
    task, ckpt, strategy = run
    out = tmp_path_factory.mktemp(f"onnx_{strategy}")
    export_main([f"ckpt={ckpt}", f"out={out}", "format=onnx"])
    return task, ckpt, strategy, out


def test_onnx_graphs_equal_sam_predictor_for_boxes_and_points(onnx_run, base_weights):
    task, ckpt, strategy, out = onnx_run
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx"]
    encoder = onnxruntime.InferenceSession(str(out / "encoder.onnx"))
    decoder = onnxruntime.InferenceSession(str(out / "decoder.onnx"))
    assert [i.name for i in decoder.get_inputs()] == [
        "image_embeddings",
        "point_coords",
        "point_labels",
        "mask_input",
        "has_mask_input",
        "orig_im_size",
    ]
    assert [o.name for o in decoder.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    image, sample = example()  # 200 x 256: not the image size the graph was traced with
    predictor, pixels = preprocessed(task.sam, image)
    (embedding,) = encoder.run(None, {"image": pixels.numpy()})
    assert np.abs(embedding - predictor.features.numpy()).max() < 1e-4

    boxes = predictor.transform.apply_boxes(sample["boxes"].numpy(), image.shape[:2])
    with torch.no_grad():  # logits at the original size, as the graph's `masks` output
        logits, iou, low_res = predictor.predict_torch(
            None, None, torch.as_tensor(boxes), multimask_output=False, return_logits=True
        )
    for k, box in enumerate(boxes):  # a box: two corners, labels 2 and 3; no padding point
        got = decoder.run(None, decoder_feed(embedding, box.reshape(2, 2), [2, 3], image.shape))
        got_masks, got_iou, got_low = got
        assert got_low.shape == (1, 4, 64, 64) and got_masks.shape == (1, 4, 200, 256)
        assert np.abs(got_low[0, :1] - low_res[k].numpy()).max() < 1e-4
        assert np.abs(got_iou[0, :1] - iou[k].numpy()).max() < 1e-4
        assert np.abs(got_masks[0, :1] - logits[k].numpy()).max() < 1e-4

    rng = np.random.default_rng(1)
    for n in (1, 5):  # the same graph, 1 and 5 points: the number of points is dynamic
        points = rng.uniform([0, 0], [256, 200], size=(n, 2)).astype(np.float32)
        labels = np.array([1] + [1, 0] * ((n - 1) // 2), np.float32)[:n]
        coords = predictor.transform.apply_coords(points, image.shape[:2])
        with torch.no_grad():  # SamPredictor pads a (0, 0) point labelled -1 itself
            _, their_iou, their_low = predictor.predict_torch(
                torch.as_tensor(coords)[None],
                torch.as_tensor(labels)[None],
                multimask_output=n == 1,
            )
        feed = decoder_feed(embedding, np.vstack([coords, [[0, 0]]]), [*labels, -1], image.shape)
        _, got_iou, got_low = decoder.run(None, feed)
        outputs = slice(1, 4) if n == 1 else slice(0, 1)  # one click: the three ambiguity masks
        assert np.abs(got_low[0, outputs] - their_low[0].numpy()).max() < 1e-4
        assert np.abs(got_iou[0, outputs] - their_iou[0].numpy()).max() < 1e-4
    # the graphs hold the trained weights, not the base ones
    base_predictor, _ = preprocessed(build_sam("tiny", checkpoint=base_weights), image)
    assert np.abs(embedding - base_predictor.features.numpy()).max() > 1e-2
    _, _, base_low = predictor_outputs(build_sam("tiny", checkpoint=base_weights), image, sample)
    assert (base_low - low_res).abs().max() > 1e-2


def test_onnx_single_mask_picks_as_segment_anything_does(run, tmp_path):
    task, ckpt, _ = run
    export_main([f"ckpt={ckpt}", f"out={tmp_path}", "format=onnx", "onnx.single_mask=true"])
    encoder = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"))
    decoder = onnxruntime.InferenceSession(str(tmp_path / "decoder.onnx"))
    image, _ = example()
    predictor, pixels = preprocessed(task.sam, image)
    (embedding,) = encoder.run(None, {"image": pixels.numpy()})
    coords = predictor.transform.apply_coords(np.array([[60.0, 50.0]]), image.shape[:2])
    with torch.no_grad():
        _, their_iou, their_low = predictor.predict_torch(
            torch.as_tensor(coords, dtype=torch.float32)[None],
            torch.ones(1, 1),
            multimask_output=True,
        )
    feed = decoder_feed(embedding, np.vstack([coords, [[0, 0]]]), [1, -1], image.shape)
    masks, iou, low = decoder.run(None, feed)
    best = int(their_iou[0].argmax())  # one click: the ambiguity mask of highest predicted IoU
    assert masks.shape == (1, 1, 200, 256) and low.shape == (1, 1, 64, 64)
    assert np.abs(iou[0, 0] - their_iou[0, best].item()) < 1e-4
    assert np.abs(low[0, 0] - their_low[0, best].numpy()).max() < 1e-4


def hf_outputs(folder: Path, pixels: torch.Tensor, boxes: torch.Tensor):
    model, info = transformers.SamModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels, input_boxes=boxes[None], multimask_output=False)
    return out.pred_masks[0], out.iou_scores[0]  # [K, 1, h, w], [K, 1]


def perturbed(sam):
    """`sam` with noise on every weight: no zero relative-position table, no unit LayerNorm left
    whose swap with another would go unseen, and logits of a real scale."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return sam.eval()


def check_hf_round_trip(sam, name: str, folder: Path, image: np.ndarray, boxes: torch.Tensor):
    """transformers' SamModel from `folder` answers as SamPredictor; build_sam reads it back."""
    predictor, pixels = preprocessed(sam, image)
    boxes = predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
    with torch.no_grad():
        _, iou, low_res = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    hf_low, hf_iou = hf_outputs(folder, pixels, boxes)
    assert hf_low.shape == low_res.shape
    assert (hf_low - low_res).abs().max() < 1e-4
    assert (hf_iou - iou).abs().max() < 1e-4
    assert low_res.abs().max() > 0.25  # 1e-4 is then a small fraction of the logits' scale
    back = build_sam(name, checkpoint=folder)
    expected, state = sam.state_dict(), back.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_hf_folder_equals_sam_predictor_and_reads_back_exactly(run, tmp_path):
    task, ckpt, strategy = run
    out = tmp_path / "hf"
    if strategy == "adapter":
        with pytest.raises(UserError, match="format=hf cannot hold the AdapterStrategy"):
            export_checkpoint(ckpt, out, format="hf")
        return
    export_main([f"ckpt={ckpt}", f"out={out}", "format=hf"])
    names = {"config.json", "model.safetensors", "processor_config.json"}
    assert {p.name for p in out.iterdir()} == names
    merged = build_sam_architecture("tiny")
    merged.load_state_dict(torch.load(export_checkpoint(ckpt, tmp_path / "m.pth")), strict=True)
    image, sample = example()
    check_hf_round_trip(merged, "tiny", out, image, sample["boxes"])
    # ... and the merged model is the trained one (LoRA and all)
    low_res, _ = task_outputs(task, sample)
    _, _, merged_low = predictor_outputs(merged, image, sample)
    assert (merged_low - low_res).abs().max() < 1e-4
    processor = transformers.SamProcessor.from_pretrained(out)
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 256, 256)
    assert inputs["reshaped_input_sizes"].tolist() == [[200, 256]]


def test_hf_folder_of_a_perturbed_tiny_model(tmp_path) -> None:
    torch.manual_seed(0)
    sam = perturbed(build_sam_architecture("tiny"))
    folder = write_hf_folder(sam.state_dict(), MODEL_SPECS["tiny"], tmp_path / "hf")
    image = np.random.default_rng(0).integers(0, 256, size=(150, 220, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 140.0], [100.0, 5.0, 210.0, 90.0]])
    check_hf_round_trip(sam, "tiny", folder, image, boxes)


def test_hf_key_mapping_is_transformers_state_dict() -> None:
    spec = MODEL_SPECS["tiny"]
    ours = set(sam_to_hf_state_dict(build_sam_architecture("tiny").state_dict()))
    theirs = set(transformers.SamModel(hf_config(spec)).state_dict())
    assert theirs - ours == {HF_TIED_KEY} and ours <= theirs
    assert len(ours) == len(build_sam_architecture("tiny").state_dict())  # one to one


def test_hf_folder_mistakes_are_named(tmp_path) -> None:
    torch.manual_seed(0)
    folder = write_hf_folder(
        build_sam_architecture("tiny").state_dict(), MODEL_SPECS["tiny"], tmp_path / "hf"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder without config.json"):
        build_sam("tiny", checkpoint=tmp_path / "empty")
    with pytest.raises(UserError, match="holds a tiny model but the model is vit_b"):
        build_sam("vit_b", checkpoint=folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="closest is tiny, which differs in encoder_depth=5"):
        build_sam("tiny", checkpoint=folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "sam2"}))
    with pytest.raises(UserError, match="model_type is 'sam2', expected 'sam'"):
        build_sam("tiny", checkpoint=folder)
    config["vision_config"]["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no model.safetensors"):
        build_sam("tiny", checkpoint=folder)


# -------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_vit_b_lora_checkpoint_sizes(tmp_path):
    """LoRA r=4 + trainable decoder on vit_b: weights-only trainable checkpoint under 25 MB."""
    sam = LoRAStrategy(r=4).apply(build_sam_architecture("vit_b"))
    assert len(lora_layers(sam)) == 24
    state = {"sam." + k: v for k, v in sam.state_dict().items()}
    trainable = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    sizes = {}
    for name, with_optimizer, only in [
        ("full", True, False),
        ("trainable", True, True),
        ("trainable_weights", False, True),
    ]:
        checkpoint = {"state_dict": dict(state)}
        if with_optimizer:
            checkpoint["optimizer_states"] = [optimizer.state_dict()]
        if only:
            keep_trainable_only(checkpoint, sam)
        torch.save(checkpoint, tmp_path / f"{name}.ckpt")
        sizes[name] = (tmp_path / f"{name}.ckpt").stat().st_size / 2**20
    assert sizes["full"] > 375
    assert sizes["trainable_weights"] < 25
    assert sizes["trainable"] < 60  # AdamW keeps two moments per trained weight


@pytest.mark.slow
def test_hf_folder_of_a_vit_b_shaped_random_model(tmp_path):
    """The official size's layout (12 blocks, 1024 px, 256-channel decoder) maps one to one too."""
    torch.manual_seed(0)
    sam = perturbed(build_sam_architecture("vit_b"))
    folder = write_hf_folder(sam.state_dict(), MODEL_SPECS["vit_b"], tmp_path / "hf")
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    boxes = torch.tensor([[40.0, 60.0, 300.0, 400.0], [350.0, 100.0, 600.0, 300.0]])
    check_hf_round_trip(sam, "vit_b", folder, image, boxes)
