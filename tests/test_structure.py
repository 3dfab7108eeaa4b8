"""The package's shape: layers that import one way, no cycles, no hidden imports, configs in
the wheel, and a public API that does what the README shows."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grimp
import pytest

import sam_lightning
from sam_lightning.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sam_lightning"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
#: imports allowed inside functions: optional dependencies a user may not have installed
OPTIONAL_DEPENDENCIES: set[str] = {"onnx"}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_the_layers_contract_holds() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("model/specs.py", "import sam_lightning.pipelines.fit"),  # model imports a pipeline
        ("model/specs.py", "import sam_lightning.model.weights"),  # a cycle inside model/
    ],
    ids=["upward", "cycle"],
)
def test_the_contract_catches_an_upward_import_or_a_cycle(
    tmp_path: Path, module: str, upward: str
) -> None:
    shutil.copytree(PACKAGE, tmp_path / "sam_lightning", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "sam_lightning" / module
    target.write_text(target.read_text().replace("import torch\n", f"import torch\n{upward}\n", 1))
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]


def test_no_import_hides_inside_a_function() -> None:
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [alias.name for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = [inner.module or ""]
                else:
                    continue
                if any(n.split(".")[0] not in OPTIONAL_DEPENDENCIES for n in names):
                    hidden.append(f"{path.relative_to(ROOT)}:{inner.lineno} {', '.join(names)}")
    assert hidden == []


def test_no_module_level_import_cycle() -> None:
    graph = grimp.build_graph("sam_lightning", cache_dir=None)
    cycles = [
        (importer, imported)
        for importer in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if importer != imported and graph.chain_exists(importer=imported, imported=importer)
    ]
    assert cycles == []


def test_the_wheel_carries_the_configs_and_works_outside_the_source_tree(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(PACKAGE, source / "sam_lightning", ignore=shutil.ignore_patterns("*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w"]
        + [str(wheels), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("sam_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = {f"sam_lightning/conf/{p.relative_to(CONF_DIR)}" for p in CONF_DIR.rglob("*.yaml")}
    assert len(yamls) > 30 and yamls <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import sam_lightning; print(sam_lightning.__file__)"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(site / "sam_lightning" / "__init__.py")
    job = subprocess.run(
        [sys.executable, "-m", "sam_lightning.train", "experiment=quickstart", "--cfg", "job"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: tiny" in job.stdout and "kind: synthetic" in job.stdout


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_users_config_folder_adds_an_experiment(tmp_path: Path, how: str) -> None:
    """README: an experiment of one's own, in a folder outside the package."""
    experiment = tmp_path / "my_conf" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "cells.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny\n  - override /data: synthetic\n"
        "trainer:\n  max_epochs: 3\n"
    )
    where = (
        ["--config-dir", "my_conf"]
        if how == "--config-dir"
        else [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"]
    )
    job = subprocess.run(
        [sys.executable, "-m", "sam_lightning.train", *where, "experiment=cells", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "max_epochs: 3" in job.stdout and "name: tiny" in job.stdout


def readme_python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_api_the_readme_promises_exists() -> None:
    for name in sam_lightning.__all__:
        assert getattr(sam_lightning, name) is not None, name
    used = set()
    for snippet in readme_python_snippets():
        used |= set(re.findall(r"sam_lightning\.(\w+)\(", snippet))
    assert used and used <= set(sam_lightning.__all__)
