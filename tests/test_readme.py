"""The README's Python lines run as written, against files of the names they use."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from segment_anything import SamPredictor

import sam_lightning
from sam_lightning.export import main as export_main
from sam_lightning.model.specs import build_sam_architecture
from sam_lightning.pipelines.export import export_checkpoint
from tests.conftest import fit_steps, tiny_task

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.fixture()
def readme_files(tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sam_finetuned.pth` (a vit_b export) and `last.ckpt` (a run's checkpoint) in the cwd."""
    torch.manual_seed(0)
    torch.save(build_sam_architecture("vit_b").state_dict(), tmp_path / "sam_finetuned.pth")
    task = tiny_task("strategy=lora")
    trainer = fit_steps(task, synthetic_root, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snippet_with(text: str) -> str:
    """The README's one Python block that contains `text`."""
    (snippet,) = [s for s in python_snippets() if text in s]
    return snippet


def test_readme_python_runs_as_written(readme_files: Path) -> None:
    snippet = snippet_with("SamTask.load_from_checkpoint")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert isinstance(scope["predictor"], SamPredictor)
    assert scope["sam"] is scope["predictor"].model
    run = torch.load(readme_files / "last.ckpt", weights_only=True)
    trained = {k.removeprefix("sam."): v for k, v in run["state_dict"].items()}
    assert scope["sam"].state_dict().keys() == trained.keys()  # LoRA layers rebuilt
    assert all(torch.equal(v, trained[k]) for k, v in scope["sam"].state_dict().items())
    assert isinstance(scope["task"], sam_lightning.SamTask)
    assert all(torch.equal(v, trained[k]) for k, v in scope["task"].sam.state_dict().items())


def test_readme_export_formats_load_as_written(readme_files: Path) -> None:
    """The export section's lines, against folders the export CLI wrote from a run."""
    ckpt = readme_files / "last.ckpt"
    export_main([f"ckpt={ckpt}", "out=sam_onnx", "format=onnx"])
    export_main([f"ckpt={ckpt}", "out=sam_hf", "format=hf"])
    scope: dict = {}
    exec(compile(snippet_with("onnxruntime"), "README.md", "exec"), scope)
    assert [i.name for i in scope["encoder"].get_inputs()] == ["image"]
    assert scope["decoder"].get_outputs()[2].name == "low_res_masks"
    assert isinstance(scope["model"], transformers.SamModel)
    merged = torch.load(export_checkpoint(ckpt, readme_files / "merged.pth"), weights_only=True)
    state = scope["sam"].state_dict()
    assert state.keys() == merged.keys() and all(torch.equal(state[k], merged[k]) for k in merged)


def test_readme_capture_features_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features section's Python lines, with a tiny `sam_finetuned.pth` and images/cat.png."""
    torch.manual_seed(0)
    torch.save(build_sam_architecture("tiny").state_dict(), tmp_path / "sam_finetuned.pth")
    (tmp_path / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (180, 240, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "images" / "cat.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet_with("capture_features"), "README.md", "exec"), scope)
    assert scope["base_view"].shape == (1, 128, 16, 16)
    assert scope["patches"].shape == (4, 128, 16, 16)
    assert list(scope["features"]["cat"]) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "neck",
    ]


def test_readme_input_size_runs_as_written(readme_files: Path) -> None:
    scope: dict = {}
    exec(compile(snippet_with("image_size=512"), "README.md", "exec"), scope)
    assert scope["sam"].image_encoder.pos_embed.shape == (1, 32, 32, 768)
    assert scope["predictor"].transform.target_length == 512
    assert scope["side"] == 256  # the run of `readme_files` trained the tiny model at 256
