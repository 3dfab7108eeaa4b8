"""Export after a short training run: the exported model in `SamPredictor` equals the trained task.

Also: trainable-only checkpoints (small, resumable, loadable), `load_from_checkpoint(...).sam`,
delta exports and the CLI's messages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from sam_lightning.data.sample import make_sample
from sam_lightning.errors import UserError
from sam_lightning.export import main as export_main
from sam_lightning.lightning.checkpoints import keep_trainable_only
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.specs import build_sam_architecture
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
        (["ckpt=a.ckpt", "out=x.pth", "format=onnx"], "unknown argument 'format=onnx'"),
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
