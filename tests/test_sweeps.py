"""The research loop: multiruns that summarise themselves, compare, Optuna, submitit's local launcher."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sam_lightning import compare as compare_cli
from sam_lightning.config import compose_config, job_tag, swept_keys
from sam_lightning.lightning.callbacks import summary_key
from sam_lightning.pipelines.compare import compare_runs, split_arguments
from tests.wandb_files import read_run

#: a few steps of the tiny quickstart on the session dataset: seconds per job
TINY = (
    "experiment=quickstart",
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=8",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "trainer.enable_progress_bar=false",
)


def run_module(
    module: str, *args: str, cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_sweep(tmp: Path, root: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A multirun of tiny jobs; returns the process and its sweep folder."""
    result = run_module(
        "sam_lightning.train",
        "-m",
        *TINY,
        f"data.root={root}",
        f"paths.log_dir={tmp / 'logs'}",
        *args,
        cwd=tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp / "logs" / "train" / "multiruns").iterdir()
    return result, sweep_dir


def test_job_tags_show_what_the_sweep_varies() -> None:
    overrides = [
        "experiment=quickstart",
        "++trainer.limit_train_batches=5",
        "strategy=lora",
        "optimizer.lr=0.00012345",
        "strategy.r=8",
    ]
    keys = swept_keys(
        ["strategy=lora,adapter", "optimizer.lr=1e-4", "++trainer.limit_train_batches=5"],
        {"optimizer.lr": "tag(log, interval(1e-5, 1e-3))", "strategy.r": "choice(4, 8, 16)"},
    )
    assert keys == ["strategy", "optimizer.lr", "strategy.r"]
    assert job_tag(overrides, keys) == "lora,lr=0.000123,r=8"
    long = job_tag([f"data.root=/a/very/long/path/{'x' * 80}"])
    assert len(long) == 48 and "~" in long and "/" not in long
    assert job_tag(overrides, []) == ""


def test_compare_arguments_keep_folders_with_equals_signs(tmp_path: Path) -> None:
    job = tmp_path / "3_lora,lr=0.0003"
    job.mkdir()
    assert split_arguments([str(job), "metric=val/dice"]) == ([str(job)], ["metric=val/dice"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """`train -m strategy=full,decoder_only` of tiny jobs logged to offline W&B."""
    tmp = tmp_path_factory.mktemp("sweep")
    return (tmp, *tiny_sweep(tmp, synthetic_root, "strategy=full,decoder_only", "logger=wandb"))


def test_a_multirun_writes_and_prints_its_summary(sweep) -> None:
    _, result, sweep_dir = sweep
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_full", "1_decoder_only"]  # short names; overrides stay in .hydra/
    assert "strategy=full" in yaml.safe_load(
        (sweep_dir / "0_full/.hydra/overrides.yaml").read_text()
    )
    report = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert report["metric"] == "val/iou" and len(report["rows"]) == 2
    for row in report["rows"]:
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert row["val/iou"] == summary["best"]["val/iou"]
        assert row["objective"] == summary["objective"]["value"] == summary["best"]["val/iou"]
        assert row["val/dice"] == summary["best"]["val/dice"]
        assert row["trainable_params"] == summary["params"]["total"]["trainable"]
        assert Path(row["best_ckpt"]).is_file() and row["epoch"] == 0
    by_job = {row["job"]: row for row in report["rows"]}
    assert by_job["0_full"]["trainable_params"] == by_job["0_full"]["total_params"]
    assert by_job["1_decoder_only"]["trainable_params"] < by_job["0_full"]["trainable_params"]
    assert "strategy=decoder_only" in by_job["1_decoder_only"]["overrides"]
    ranks = [r["objective"] for r in report["rows"]]
    assert ranks == sorted(ranks, reverse=True) and [r["rank"] for r in report["rows"]] == [1, 2]
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert markdown in result.stdout  # printed at the end
    with open(sweep_dir / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == [r["job"] for r in report["rows"]]
    assert float(rows[0]["val/iou"]) == pytest.approx(report["rows"][0]["val/iou"], abs=1e-12)
    assert Image.open(sweep_dir / "sweep_curves.png").size == (840, 504)


def test_a_multirun_groups_its_wandb_runs(sweep) -> None:
    _, _, sweep_dir = sweep
    for job in ("0_full", "1_decoder_only"):
        (run_dir,) = (sweep_dir / job / "wandb").glob("offline-run-*")
        run = read_run(run_dir)
        assert run["name"] == job and run["group"] == sweep_dir.name
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert run["summary"]["best/val_iou"] == pytest.approx(summary["best"]["val/iou"], abs=1e-7)


def test_compare_two_runs_writes_the_table_and_plot(sweep, tmp_path: Path) -> None:
    _, _, sweep_dir = sweep
    out = tmp_path / "cmp"
    result = run_module(
        "sam_lightning.compare",
        str(sweep_dir / "1_decoder_only"),
        str(sweep_dir / "0_full"),
        f"out={out}",
        "metric=val/loss",
        "direction=minimize",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "sweep_summary.json").read_text())
    losses = {}
    for job in ("0_full", "1_decoder_only"):
        history = json.loads((sweep_dir / job / "summary.json").read_text())["history"]
        losses[job] = min(h["val/loss"] for h in history)
    assert [r["job"] for r in report["rows"]] == sorted(losses, key=losses.get)
    assert [r["objective"] for r in report["rows"]] == sorted(losses.values())
    assert "best val/loss" in result.stdout and (out / "sweep_curves.png").is_file()
    assert (out / "sweep_summary.csv").read_text().count("\n") == 3
    # the sweep folder itself gives the same rows as the callback wrote
    again = compare_runs([sweep_dir], tmp_path / "again")
    first = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [r["val/iou"] for r in again["rows"]] == [r["val/iou"] for r in first["rows"]]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/nowhere/run"], "no such folder: /nowhere/run"),
        (["."], "no summary.json under ."),
        ([".", "colour=blue"], "unknown option 'colour=blue'"),
    ],
    ids=["missing", "empty", "unknown-option"],
)
def test_compare_errors_are_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, args: list[str], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        compare_cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and len(err.splitlines()) == 1


def test_optuna_study_of_three_trials(tmp_path: Path, synthetic_root: Path) -> None:
    """hparams_search=optuna_lora: 3 trials, the study's best value is the best job's objective.

    The objective is val/loss (minimised): after a couple of steps from scratch it differs between
    trials, where val/iou is still about 0 for all of them.
    """
    result, sweep_dir = tiny_sweep(
        tmp_path,
        synthetic_root,
        "hparams_search=optuna_lora",
        "hydra.sweeper.n_trials=3",
        "optimized_metric=val/loss",
        "optimized_direction=minimize",
    )
    study = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    values = {}
    for job in sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((job / "summary.json").read_text())
        assert (
            summary["strategy"] == "LoRAStrategy" and summary["objective"]["metric"] == "val/loss"
        )
        values[job.name] = summary["objective"]["value"]
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides if o.split("=")[0] in study["best_params"])
        assert set(params) == {"optimizer.lr", "strategy.r", "optimizer.weight_decay"}
        assert int(params["strategy.r"]) in (4, 8, 16)
        assert 1e-5 <= float(params["optimizer.lr"]) <= 3e-3
        assert job.name.startswith(f"{len(values) - 1}_") and "lr=" in job.name
    assert len(values) == 3 and len(set(values.values())) == 3
    assert study["best_value"] == min(values.values())
    report = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert (
        report["direction"] == "minimize" and report["rows"][0]["objective"] == study["best_value"]
    )
    assert report["rows"][0]["job"] in result.stdout


def _sqlalchemy_major() -> int:
    import sqlalchemy

    return int(sqlalchemy.__version__.split(".")[0])


@pytest.mark.slow
@pytest.mark.skipif(
    _sqlalchemy_major() >= 2,
    reason="optuna 2.10's RDB storage needs SQLAlchemy < 2 (the optuna extra pins it)",
)
def test_optuna_study_persists_in_sqlite(tmp_path: Path, synthetic_root: Path) -> None:
    import optuna

    db = tmp_path / "optuna.db"
    tiny_sweep(
        tmp_path,
        synthetic_root,
        "hparams_search=optuna_lora",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{db}",
    )
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{db}")
    assert len(study.trials) == 2 and all(t.value is not None for t in study.trials)


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path: Path, synthetic_root: Path) -> None:
    """hydra/launcher=local: each job in its own process (submitit), then the sweep summary."""
    result, sweep_dir = tiny_sweep(
        tmp_path, synthetic_root, "hydra/launcher=local", "strategy=full,decoder_only"
    )
    report = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert sorted(r["job"] for r in report["rows"]) == ["0_full", "1_decoder_only"]
    for row in report["rows"]:
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert row["val/iou"] == summary["best"]["val/iou"] and Path(row["best_ckpt"]).is_file()
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # two submitit jobs, one process each
    assert all("summary.json" in log.read_text() for log in logs)
    assert (sweep_dir / "sweep_summary.md").read_text() in result.stdout


def interval_bounds(spec: str) -> list[float]:
    """The two numbers of a Hydra `interval(a, b)` sweep."""
    inside = spec.split("interval(", 1)[1].split(")")[0]
    return [float(v) for v in inside.split(",")]


def test_the_wandb_sweep_searches_the_optuna_space_for_the_same_objective() -> None:
    root = Path(__file__).resolve().parents[1]
    sweep = yaml.safe_load((root / "sweeps" / "wandb_lora.yaml").read_text())
    train_cfg = compose_config("train", ["experiment=quickstart"])
    assert sweep["metric"]["name"] == summary_key(train_cfg.optimized_metric) == "best/val_iou"
    assert sweep["metric"]["goal"] == train_cfg.optimized_direction == "maximize"
    optuna = compose_config("train", ["hparams_search=optuna_lora"])  # the sweeper's params
    space = yaml.safe_load(
        (root / "sam_lightning/conf/hparams_search/optuna_lora.yaml").read_text()
    )["hydra"]["sweeper"]["params"]
    assert set(sweep["parameters"]) == set(space) and optuna.strategy.r == 4
    assert space["strategy.r"] == "choice(4, 8, 16)" and sweep["parameters"]["strategy.r"] == {
        "values": [4, 8, 16]
    }
    lr = sweep["parameters"]["optimizer.lr"]
    assert space["optimizer.lr"].startswith("tag(log, interval(")
    assert interval_bounds(space["optimizer.lr"]) == [lr["min"], lr["max"]]
    assert lr["distribution"] == "log_uniform_values"
    wd = sweep["parameters"]["optimizer.weight_decay"]
    assert interval_bounds(space["optimizer.weight_decay"]) == [wd["min"], wd["max"]]
    command = sweep["command"]
    assert command[2:6] == ["-m", "sam_lightning.train", "strategy=lora", "logger=wandb"]
    assert command[-1] == "${args_no_hyphens}"  # key=value: Hydra overrides
    sampled = [
        f"{key}={spec.get('min', (spec.get('values') or [None])[0])}"
        for key, spec in sweep["parameters"].items()
    ]
    job = compose_config("train", [*command[4:-1], *sampled])
    assert job.strategy.r == 4 and job.optimizer.lr == 1e-5 and job.optimizer.weight_decay == 0.0


def test_a_failed_job_is_listed_unranked(sweep, tmp_path: Path) -> None:
    """A job folder without summary.json (it failed, or still runs) is a row, not a gap."""
    _, _, sweep_dir = sweep
    partial = tmp_path / "sweep"
    shutil.copytree(sweep_dir / "0_full", partial / "0_full")
    (partial / "1_lora" / ".hydra").mkdir(parents=True)
    (partial / "1_lora" / ".hydra" / "overrides.yaml").write_text("- strategy=lora\n")
    report = compare_runs([partial], partial, title="partial")
    done, failed = report["rows"]
    assert (done["job"], done["rank"], failed["job"], failed["rank"]) == (
        "0_full",
        1,
        "1_lora",
        None,
    )
    assert failed["status"].startswith("no summary.json") and failed["overrides"] == [
        "strategy=lora"
    ]
    assert "| - | 1_lora | no summary.json" in report["markdown"]
