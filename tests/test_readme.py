"""The README's Python lines run as written, against files of the names they use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from segment_anything import SamPredictor

import sam_lightning
from sam_lightning.model.specs import build_sam_architecture
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


def test_readme_python_runs_as_written(readme_files: Path) -> None:
    (snippet,) = python_snippets()
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
