"""experiments/gpu_check.py: its `--smoke` run (the GPU check's every step, on the CPU with the
tiny model) writes what the GPU run will write, and one failing, hanging or out-of-memory step
does not lose the others."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "experiments" / "gpu_check.py"
FILES = {"results.md", "suites.json", "env.json", "pytest_gpu.log", "run.log"}
#: what the device tool brings back from a results folder
MAX_FILES, NAME = 8, re.compile(r"^[A-Za-z0-9._-]+$")


def load_gpu_check() -> ModuleType:
    """experiments/gpu_check.py as a fresh module (experiments/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, proc


def test_smoke_run_writes_every_step_into_five_flat_files(smoke) -> None:
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    written = [p for p in out.rglob("*")]
    assert {p.name for p in written} == FILES
    assert all(p.parent == out and NAME.match(p.name) for p in written)
    assert len(written) <= MAX_FILES
    records = json.loads((out / "suites.json").read_text())
    planned = [s.name for s in load_gpu_check().plan(smoke=True)]
    assert [r["name"] for r in records] == planned
    assert {r["name"]: r["status"] for r in records} == {name: "ok" for name in planned}
    md = (out / "results.md").read_text()
    assert all(f"| {name} |" in md for name in planned)
    for goal in (">= 1.5x", "<= 0.5x", ">= 45%", "<= 2x the baseline's rounding error"):
        assert goal in md
    env = json.loads((out / "env.json").read_text())
    assert env["torch_side"]["versions"]["torch"] == torch.__version__
    assert env["nvidia_smi"] is None or env["nvidia_smi"]["rows"]
    # pytest -m gpu: GPU tests were collected, and every one skipped for want of CUDA
    counts = next(r for r in records if r["name"] == "pytest_gpu")["result"]["counts"]
    log = (out / "pytest_gpu.log").read_text()
    reasons = re.findall(r"^SKIPPED \[(\d+)\] tests/test_gpu\.py:\d+: (.*)$", log, re.M)
    assert set(counts) == {"skipped"} and counts["skipped"] >= 7
    assert sum(int(n) for n, _ in reasons) == counts["skipped"]
    assert {reason for _, reason in reasons} == {"needs CUDA"}


def step_result(out: Path, name: str) -> dict:
    return next(r for r in json.loads((out / "suites.json").read_text()) if r["name"] == name)[
        "result"
    ]


def test_smoke_attention_numbers(smoke) -> None:
    out, _ = smoke
    for name in ("vit_b", "vit_b_large_batch", "vit_h"):
        result = step_result(out, name)
        recs = result["records"]
        settings = {(r["mode"], r["grad_checkpointing"]) for r in recs}
        expected = {"eager", "sdpa"}
        assert {m for m, _ in settings} == expected
        for r in recs:
            assert r["status"] == "ok" and r["precision"] == "bf16-mixed"
            assert math.isclose(r["images_per_s"] * r["s_per_step"], r["batch_size"])
            assert r["peak_mib"] > 0 and r["flops_per_step"] > 1e9
            assert math.isclose(
                r["mfu"], r["flops_per_step"] / r["s_per_step"] / r["matmul_flops_per_s"]
            )
            # bf16 autocast against a float32 reference: rounding, not zero, not a wrong result
            assert 1e-4 < r["out_rel_err"] < 3e-2
            base = next(
                b
                for b in recs
                if b["mode"] == "eager" and b["grad_checkpointing"] == r["grad_checkpointing"]
            )
            assert math.isclose(r["speedup"], base["s_per_step"] / r["s_per_step"])
            assert math.isclose(r["memory_ratio"], r["peak_mib"] / base["peak_mib"])
            # same weights and batch: the first step's loss agrees within bf16 rounding
            assert abs(r["first_loss"] - base["first_loss"]) < 2e-2 * abs(base["first_loss"])
        assert len(result["headline"]) >= 3 * (len(recs) // 2)


def test_smoke_other_suites_numbers(smoke) -> None:
    out, _ = smoke
    rates = {r["what"]: r for r in step_result(out, "ceilings")["records"]}
    assert rates["matmul_bf16"]["flops_per_s"] > 1e8 and rates["copy"]["bytes_per_s"] > 1e8
    recompute, cached, fill = step_result(out, "cache")["records"]
    assert recompute["speedup"] == 1.0
    assert math.isclose(cached["speedup"], recompute["epoch_s"] / cached["epoch_s"])
    assert fill["disk_mib_per_image"] > 0
    for name, prompts in (("decoder", 4), ("decoder_2x", 8)):
        recs = step_result(out, name)["records"]
        loop = next(r for r in recs if r["setting"] == "sam-loop")
        assert loop["vs_loop"] == 1.0
        for r in recs:
            assert math.isclose(r["prompts_per_s"] * r["s_per_call"], prompts)
    strategies = step_result(out, "strategies")["records"]
    assert [r["strategy"] for r in strategies] == ["full", "lora", "decoder_only"]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in strategies)
    compiled = step_result(out, "compile")["records"]
    assert [r["mode"] for r in compiled] == ["sdpa", "sdpa-compile"]
    assert all(r["status"] == "ok" for r in compiled) and compiled[1]["compile"] is True


FAKE_BENCH = """
import json, subprocess, sys, time
argv = sys.argv[1:]
path = argv[argv.index("--json") + 1]
if argv[0] == "hang":  # a child that would outlive us unless the whole group is killed
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(argv[1], "w").write(str(child.pid))
    time.sleep(60)
if argv[0] == "crash":
    print("boom: the suite raised"); sys.exit(3)
time.sleep(float(argv[1]))
failed = 1 if argv[0] == "oom" else 0
json.dump({"status": "ok", "wall_s": float(argv[1]), "title": argv[0], "header": ["a"],
           "rows": [["1"]], "records": [{"status": "out of memory" if failed else "ok"}],
           "notes": [], "headline": [], "failed_variants": failed}, open(path, "w"))
"""


def test_a_failing_hanging_or_out_of_memory_step_does_not_stop_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_check = load_gpu_check()
    fake = tmp_path / "fake_bench.py"
    fake.write_text(FAKE_BENCH)
    child_pid = tmp_path / "child.pid"
    steps = [
        gpu_check.Step("hangs", "sleeps past its budget", ["hang", str(child_pid)], 2.0),
        gpu_check.Step("crashes", "exits 3", ["crash"], 10.0),
        gpu_check.Step("oom", "one variant out of memory", ["oom", "0"], 10.0),
        gpu_check.Step("works", "takes 2 s", ["ok", "2"], 10.0),
        gpu_check.Step("late", "no time left for it", ["ok", "0"], 10.0),
    ]
    monkeypatch.setattr(gpu_check, "BENCH", fake)
    monkeypatch.setattr(gpu_check, "plan", lambda smoke: steps)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1.5)
    t0 = time.monotonic()
    rc = gpu_check.main(["--out", str(tmp_path / "out"), "--budget", "5.3"])
    assert rc == 1 and time.monotonic() - t0 < 10
    records = {r["name"]: r for r in json.loads((tmp_path / "out" / "suites.json").read_text())}
    assert {name: r["status"] for name, r in records.items()} == {
        "hangs": "timeout",
        "crashes": "failed (rc 3)",
        "oom": "partial (1 variants failed)",
        "works": "ok",
        "late": "skipped",
    }
    assert records["hangs"]["wall_s"] < 4
    assert "boom: the suite raised" in records["crashes"]["error"]
    pid = int(child_pid.read_text())
    for _ in range(50):  # the killed group's orphan is gone (or a zombie waiting for init)
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} of the timed-out step still runs")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| late | no time left for it | skipped |" in md
    assert "killed after 2 s" in (tmp_path / "out" / "run.log").read_text()


@pytest.mark.parametrize(
    ("line", "rc", "counts", "status"),
    [
        ("7 skipped in 1.09s", 0, {"skipped": 7}, "partial (7 skipped on a GPU machine)"),
        ("9 passed, 3 deselected in 12.1s", 0, {"passed": 9, "deselected": 3}, "ok"),
        ("1 failed, 8 passed in 30.2s", 1, {"failed": 1, "passed": 8}, "failed (rc 1)"),
        ("1 error in 0.50s", 2, {"errors": 1}, "failed (rc 2)"),
        ("12 deselected in 3.0s", 5, {"deselected": 12}, "failed (rc 5)"),
    ],
)
def test_pytest_summary_line_decides_the_gpu_tests_status(
    line: str, rc: int, counts: dict, status: str
) -> None:
    gpu_check = load_gpu_check()
    parsed = gpu_check.pytest_counts(f"....\n= short test summary info =\n{line}\n")
    assert parsed == counts
    assert gpu_check.pytest_status(rc, parsed, smoke=False) == status
    assert gpu_check.pytest_status(None, parsed, smoke=False) == "timeout"


def test_the_gpu_plan_measures_what_issue_16_asks() -> None:
    """Every GPU step's arguments parse (a typo would only show on the GPU machine), and the
    plan covers the issue's list."""
    spec = importlib.util.spec_from_file_location(
        "bench_train", ROOT / "experiments" / "bench_train.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    steps = load_gpu_check().plan(smoke=False)
    parsed = {s.name: bench.build_parser().parse_args(s.argv) for s in steps if s.kind == "suite"}
    assert all(a.device == "cuda" and a.precision == "bf16-mixed" for a in parsed.values())
    for name, batch in (("vit_b", 4), ("vit_b_large_batch", 8)):
        a = parsed[name]
        assert (a.suite, a.model, a.strategy, a.batch_size) == (
            "attention",
            "vit_b",
            "full",
            [batch],
        )
        assert a.modes == ["eager", "sdpa"] and a.grad_checkpointing == ["off", "on"]
    assert (parsed["vit_h"].model, parsed["vit_h"].batch_size) == ("vit_h", [2])
    assert parsed["vit_h"].modes == ["eager", "sdpa"]
    assert [parsed[n].prompts for n in ("decoder", "decoder_2x")] == [32, 64]
    assert parsed["cache"].suite == "cache" and parsed["cache"].model == "vit_b"
    assert parsed["strategies"].strategies == ["full", "lora", "decoder_only"]
    assert parsed["compile"].modes == ["sdpa", "sdpa-compile"]
    assert parsed["compile"].compile_backend is None  # inductor, what model.compile=true uses
    pytest_step = next(s for s in steps if s.kind == "pytest")
    assert pytest_step.argv[:2] == ["-m", "gpu"] and pytest_step.argv[-1] == "tests"
