"""The GPU measurement of issue 16, as one prepared command: environment, `pytest -m gpu`, then
`bench_train.py` suites, each in its own process with a time budget, all into one folder.

    python experiments/gpu_check.py --out RESULTS_DIR           # one GPU, under 8 minutes
    python experiments/gpu_check.py --out RESULTS_DIR --smoke   # the same steps, CPU, tiny model

What it measures (random weights: no official checkpoint can be fetched on the GPU machine,
and speed and memory do not depend on the weights' values):

- `ceilings`: the GPU's measured bf16 matmul rate (8192^3, random data; the MFU denominator)
  and copy bandwidth;
- `pytest_gpu`: `pytest -m gpu` (tests that skip without CUDA);
- `vit_b`, `vit_b_large_batch`: `vit_b` full fine-tune, bf16-mixed, 1024 px, batch 4 and 8:
  images/s, peak memory, MFU, eager vs sdpa attention, grad checkpointing off and on, and the
  encoder output of each against a float32 eager reference;
- `cache`: decoder-only training from the embedding cache vs recomputing the encoder;
- `decoder`, `decoder_2x`: 32 and 64 box prompts, our decoder path vs segment-anything's
  decoder per prompt and in one call;
- `vit_h`: `vit_h` full fine-tune, bf16-mixed, batch 2, eager vs sdpa;
- `strategies`: `vit_b` full vs LoRA vs decoder-only (encoder every step), images/s;
- `compile`: `model.compile=true` (inductor) vs not, if it compiles within what is left.

The steps run in that order, each under its own time budget and all under `--budget` seconds
(450 by default, so the whole run stays under 8 minutes): a step that runs out of time, runs
out of memory or fails is recorded and the next one runs; steps that no longer fit are recorded
as skipped. Results are rewritten after every step, so a run cut short keeps what it measured.

The results folder gets five files, flat (the device tool brings back at most 8, 2 folders deep):

- `results.md`: the steps (status, time), the headline figures each against its baseline from
  the same run (fused vs eager >= 1.5x throughput at <= 0.5x memory, MFU against 45%, ...), and
  every suite's table;
- `suites.json`: every step's record: command, status, time, the suite's numbers;
- `env.json`: GPU, driver, torch, CUDA, cuDNN, Python, package versions, CPU, load;
- `pytest_gpu.log`: the output of `pytest -m gpu`;
- `run.log`: every step's full output.

`--smoke` runs the same steps on the CPU with the `tiny` model, one training step per suite, all
suites in one worker process (`bench_train.py plan`: on a CPU the imports cost more than the
suites) and `pytest -m gpu` on `tests/test_gpu.py` only: about 25 s on this project's 2-core
machine, so `tests/test_gpu_check.py` runs it in the fast suite and the script cannot rot.

On this workplace's GPU machine, which lacks some of the project's dependencies and has no
registry, first fill `.whl/` here with `experiments/gpu_wheels.sh`, then run (device tool, with
`carry=[".whl"]` and `timeout_s=600`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
    PYTHONUNBUFFERED=1 python3 experiments/gpu_check.py --out $OUT

This file uses the standard library only: whatever breaks in torch or the project, it still
writes its results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "bench_train.py"
#: the files of the results folder
RESULTS_MD, SUITES_JSON, ENV_JSON, PYTEST_LOG, RUN_LOG = (
    "results.md",
    "suites.json",
    "env.json",
    "pytest_gpu.log",
    "run.log",
)
#: a step is skipped, not started, when less than this is left of the whole budget
MIN_STEP_S = 20.0


@dataclass
class Step:
    """One step of the check: a `bench_train.py` suite or `pytest -m gpu`."""

    name: str
    what: str
    argv: list[str]
    budget_s: float
    kind: str = "suite"  # suite | pytest


@dataclass
class Outcome:
    """What a step left: its status, time and (for a suite) the JSON it wrote."""

    step: Step
    status: str = "skipped"
    wall_s: float = 0.0
    rc: int | None = None
    command: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def record(self) -> dict[str, Any]:
        return {
            "name": self.step.name,
            "what": self.step.what,
            "kind": self.step.kind,
            "status": self.status,
            "wall_s": round(self.wall_s, 2),
            "budget_s": self.step.budget_s,
            "rc": self.rc,
            "command": self.command,
            "error": self.error,
            "result": self.result,
        }


def plan(smoke: bool) -> list[Step]:
    """The steps, in order of importance (what the issue's "done when" needs first)."""
    if smoke:
        common = ["--device", "cpu", "--threads", "1", "--precision", "bf16-mixed"]
        vit_b = vit_h = "tiny"
        timing = ["--warmup", "1", "--steps", "1", "--prompts", "2", "--matmul-size", "256"]
        batch, large_batch, batch_h = "1", "2", "1"
        cache = ["--images", "2", "--batch-size", "1", "--rounds", "1", "--cached-epochs", "1"]
        decoder = ["--repeats", "1", "--iters", "1", "--chunks", "2"]
        prompts, compile_backend = (4, 8), ["--compile-backend", "eager"]
        pytest_paths = ["tests/test_gpu.py"]
    else:
        common = ["--device", "cuda", "--precision", "bf16-mixed"]
        vit_b, vit_h = "vit_b", "vit_h"
        timing = ["--warmup", "2", "--steps", "5", "--prompts", "8"]
        batch, large_batch, batch_h = "4", "8", "2"
        cache = ["--images", "8", "--batch-size", "4", "--rounds", "1", "--cached-epochs", "2"]
        decoder = ["--repeats", "3", "--iters", "5"]
        prompts, compile_backend = (32, 64), []
        pytest_paths = ["tests"]
    attention = ["attention", "--strategy", "full", "--modes", "eager", "sdpa"]
    return [
        Step(
            "ceilings",
            "bf16 and float32 matmul rate (the MFU denominator), copy bandwidth",
            ["ceilings", *common, *timing[-2:]] if smoke else ["ceilings", *common],
            40,
        ),
        Step(
            "pytest_gpu",
            "pytest -m gpu",
            [
                "-m",
                "gpu",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "--continue-on-collection-errors",
                *pytest_paths,
            ],
            120,
            kind="pytest",
        ),
        Step(
            "vit_b",
            f"{vit_b} full fine-tune, batch {batch}: eager vs sdpa, grad checkpointing off/on",
            [
                *attention,
                "--model",
                vit_b,
                "--batch-size",
                batch,
                "--grad-checkpointing",
                "off",
                "on",
                *timing,
                *common,
            ],
            100,
        ),
        Step(
            "cache",
            f"{vit_b} decoder-only: from the embedding cache vs recomputing the encoder",
            ["cache", "--model", vit_b, "--prompts", timing[5], *cache, *common],
            90,
        ),
        Step(
            "decoder",
            f"{vit_b} decoder, {prompts[0]} prompts: ours vs segment-anything per prompt / one call",
            ["decoder", "--model", vit_b, "--prompts", str(prompts[0]), *decoder, *common],
            45,
        ),
        Step(
            "decoder_2x",
            f"{vit_b} decoder, {prompts[1]} prompts: ours vs segment-anything per prompt / one call",
            ["decoder", "--model", vit_b, "--prompts", str(prompts[1]), *decoder, *common],
            45,
        ),
        Step(
            "vit_h",
            f"{vit_h} full fine-tune, batch {batch_h}: eager vs sdpa",
            [*attention, "--model", vit_h, "--batch-size", batch_h, *timing, *common],
            120,
        ),
        Step(
            "vit_b_large_batch",
            f"{vit_b} full fine-tune, batch {large_batch}: eager vs sdpa, checkpointing off/on",
            [
                *attention,
                "--model",
                vit_b,
                "--batch-size",
                large_batch,
                "--grad-checkpointing",
                "off",
                "on",
                *timing,
                *common,
            ],
            100,
        ),
        Step(
            "strategies",
            f"{vit_b}, batch {batch}: full vs LoRA vs decoder-only (encoder every step)",
            [
                "strategies",
                "--model",
                vit_b,
                "--batch-size",
                batch,
                "--strategies",
                "full",
                "lora",
                "decoder_only",
                *timing,
                *common,
            ],
            75,
        ),
        Step(
            "compile",
            f"{vit_b} full fine-tune, batch {batch}: model.compile=true vs not (sdpa)",
            [
                "attention",
                "--strategy",
                "full",
                "--model",
                vit_b,
                "--batch-size",
                batch,
                "--modes",
                "sdpa",
                "sdpa-compile",
                "--no-flops",
                *compile_backend,
                *timing,
                *common,
            ],
            180,
        ),
    ]


# ---- running commands --------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment of every step: this checkout first on the path (not an installed copy)."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def run_command(
    argv: Sequence[str], timeout_s: float, log_path: Path
) -> tuple[int | None, float, bool]:
    """Run `argv` in its own process group, appending its output to `log_path`.

    Returns (exit code or None, seconds, timed out). On timeout the whole group is killed (a
    worker's own children too), and what it printed so far stays in the log.
    """
    t0 = time.monotonic()
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_env(),
            )
        except OSError as error:
            log.write(f"could not start: {error}\n".encode())
            return None, time.monotonic() - t0, False
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            return rc, time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[gpu_check] killed after {timeout_s:.0f} s (its time budget)\n".encode())
            return None, time.monotonic() - t0, True


def log_tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("2 passed, 1 skipped in 3.1s")."""
    counts: dict[str, int] = {}
    lines = [line for line in output.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    for number, word in re.findall(r"(\d+) (\w+)", lines[-1] if lines else ""):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(number)
    return counts


def pytest_status(rc: int | None, counts: dict[str, int], smoke: bool) -> str:
    """ok; or why not: on a GPU, a skipped GPU test means CUDA was not seen, a failure itself."""
    if rc is None:
        return "timeout"
    if rc != 0 or counts.get("failed") or counts.get("errors"):
        return f"failed (rc {rc})"
    if not smoke and counts.get("skipped"):
        return f"partial ({counts['skipped']} skipped on a GPU machine)"
    if not smoke and not counts.get("passed"):
        return "failed (no GPU test ran)"
    return "ok"


def suite_status(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"failed ({result.get('error', 'no result')})"
    failed = result.get("failed_variants", 0)
    return f"partial ({failed} variants failed)" if failed else "ok"


def run_suite_group(
    steps: list[Step], timeout_s: float, work: Path, log_path: Path
) -> list[Outcome]:
    """Run suites in one worker process (`bench_train.py <suite>` for one, `plan` for several)
    and read the JSON each left; a suite without JSON failed, or its group ran out of time."""
    jsons = {s.name: work / f"{s.name}.json" for s in steps}
    for path in jsons.values():
        path.unlink(missing_ok=True)
    if len(steps) == 1:
        argv = [sys.executable, str(BENCH), *steps[0].argv, "--json", str(jsons[steps[0].name])]
    else:
        plan_file = work / "plan.json"
        entries = [{"argv": s.argv, "json": str(jsons[s.name])} for s in steps]
        plan_file.write_text(json.dumps(entries))
        argv = [sys.executable, str(BENCH), "plan", str(plan_file)]
    rc, wall, timed_out = run_command(argv, timeout_s, log_path)
    outcomes = []
    for s in steps:
        command = "python experiments/bench_train.py " + " ".join(s.argv)
        out = Outcome(s, rc=rc, command=command, wall_s=wall if len(steps) == 1 else 0.0)
        if jsons[s.name].exists():
            out.result = json.loads(jsons[s.name].read_text())
            out.status = suite_status(out.result)
            out.wall_s = out.result.get("wall_s", out.wall_s)
        elif timed_out:
            out.status = "timeout"
            out.error = f"no result within {timeout_s:.0f} s"
        else:
            out.status = f"failed (rc {rc})"
            out.error = log_tail(log_path)
        outcomes.append(out)
    return outcomes


# ---- the environment ---------------------------------------------------------------------------
def collect_env(log_path: Path) -> dict[str, Any]:
    """GPU and driver (nvidia-smi, read-only queries), Python, CPU, load, git commit."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if shutil.which("nvidia-smi"):
        fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,pstate"
        try:
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["nvidia_smi"] = {"fields": fields, "rows": out.stdout.strip().splitlines()}
            full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            with log_path.open("a") as log:
                log.write("\n$ nvidia-smi\n" + full.stdout + full.stderr)
        except (OSError, subprocess.SubprocessError) as error:
            env["nvidia_smi"] = {"error": str(error)}
    else:
        env["nvidia_smi"] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        env["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


# ---- the results folder ------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def format_value(value: Any, unit: str) -> str:
    if not isinstance(value, int | float) or value != value:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "rel err":
        return f"{value:.1e}"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.3g} {unit}"


def headline_rows(outcomes: list[Outcome]) -> list[list[str]]:
    rows = []
    for out in outcomes:
        for h in out.result.get("headline", []):
            ratio = h.get("ratio")
            met = h.get("met")
            rows.append(
                [
                    out.step.name,
                    h["figure"],
                    h["baseline"],
                    format_value(h.get("value"), h.get("unit", "")),
                    f"{ratio:.2f}x" if isinstance(ratio, int | float) else "-",
                    h.get("goal") or "",
                    {True: "yes", False: "**no**", None: ""}[met],
                ]
            )
    return rows


def write_results(
    out_dir: Path,
    args: argparse.Namespace,
    env: dict[str, Any],
    outcomes: list[Outcome],
    elapsed_s: float,
) -> None:
    """Rewrite suites.json, env.json and results.md from what has run so far."""
    write_json(out_dir / SUITES_JSON, [o.record() for o in outcomes])
    machine = next((o.result["machine"] for o in outcomes if o.result.get("machine")), {})
    write_json(out_dir / ENV_JSON, {**env, "torch_side": machine})
    gpu = machine.get("gpu") or {}
    versions = machine.get("versions", {})
    smi = env.get("nvidia_smi") or {}
    lines = [
        "# GPU check (issue 16)" + (" - smoke run (CPU, tiny model)" if args.smoke else ""),
        "",
        f"- command: `python experiments/gpu_check.py {' '.join(args.argv)}`",
        f"- started {env['started']}, {elapsed_s:.0f} s of a {args.budget:.0f} s budget",
        f"- GPU: {gpu.get('name', 'none')}"
        + (
            f" (sm {gpu['capability']}, {gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB)"
            if gpu
            else ""
        )
        + (f"; nvidia-smi: {'; '.join(smi.get('rows', []))}" if smi.get("rows") else ""),
        f"- torch {versions.get('torch')}, CUDA {machine.get('cuda')}, cuDNN "
        f"{machine.get('cudnn')}, lightning {versions.get('lightning')}, segment-anything "
        f"{versions.get('segment-anything')}, Python {machine.get('python', env['python'])}",
        f"- CPU: {machine.get('cpu', '?')}, {env['logical_cpus']} logical CPUs, load average "
        f"at start {' / '.join(str(v) for v in env['load_average'])}",
        f"- git commit: {env.get('git_commit') or 'unknown (no .git in this copy)'}",
        "- weights: random (no official checkpoint); speed and memory do not depend on them",
        "",
        "## Steps",
        "",
        md_table(
            ["step", "what", "status", "wall s", "budget s"],
            [
                [o.step.name, o.step.what, o.status, f"{o.wall_s:.1f}", f"{o.step.budget_s:.0f}"]
                for o in outcomes
            ],
        ),
        "",
        "## Headline: each figure against its baseline from this run",
        "",
        md_table(
            ["step", "figure", "baseline (same run)", "value", "ratio", "goal", "met"],
            headline_rows(outcomes),
        ),
    ]
    for o in outcomes:
        if o.step.kind == "pytest":
            lines += ["", f"## {o.step.name}", "", f"`{o.command}`: {o.status}"]
            counts = o.result.get("counts", {})
            lines.append(", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line")
            continue
        lines += ["", f"## {o.step.name}: {o.status}", "", f"`{o.command}`", ""]
        res = o.result
        if res.get("rows"):
            lines += [res["title"], "", md_table(res["header"], res["rows"]), ""]
            lines += [f"- {note}" for note in res.get("notes", [])]
        elif o.error:
            lines += ["```", o.error.strip()[-1500:], "```"]
    (out_dir / RESULTS_MD).write_text("\n".join(lines) + "\n")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run_check(args: argparse.Namespace) -> list[Outcome]:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS_MD, SUITES_JSON, ENV_JSON, PYTEST_LOG, RUN_LOG):
        (out_dir / name).unlink(missing_ok=True)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    run_log = out_dir / RUN_LOG
    env = collect_env(run_log)
    steps = [s for s in plan(args.smoke) if not args.only or s.name in args.only]
    outcomes = [Outcome(s) for s in steps]
    # On the GPU every suite has its own process (an out-of-memory or a crash there loses only
    # that suite); the smoke run shares one worker between suites (the imports cost seconds).
    groups: list[list[int]] = []
    shared: list[int] | None = None
    for i, s in enumerate(steps):
        if args.smoke and s.kind == "suite":
            if shared is None:
                shared = []
                groups.append(shared)
            shared.append(i)
        else:
            groups.append([i])
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        for group in groups:
            group_steps = [steps[i] for i in group]
            left = deadline - time.monotonic()
            budget = min(sum(s.budget_s for s in group_steps), left)
            if left < MIN_STEP_S:
                for i in group:
                    outcomes[i].error = f"{left:.0f} s left of the {args.budget:.0f} s budget"
                print(
                    f"[{time.monotonic() - t0:6.1f} s] skipped (out of time): "
                    f"{', '.join(s.name for s in group_steps)}",
                    flush=True,
                )
                continue
            print(
                f"[{time.monotonic() - t0:6.1f} s] {', '.join(s.name for s in group_steps)} "
                f"(budget {budget:.0f} s) ...",
                flush=True,
            )
            if group_steps[0].kind == "pytest":
                outcomes[group[0]] = run_pytest(group_steps[0], budget, out_dir, args.smoke)
            else:
                for i, outcome in zip(
                    group, run_suite_group(group_steps, budget, work, run_log), strict=True
                ):
                    outcomes[i] = outcome
            for i in group:
                print(
                    f"           {outcomes[i].step.name}: {outcomes[i].status} "
                    f"({outcomes[i].wall_s:.1f} s)",
                    flush=True,
                )
            write_results(out_dir, args, env, outcomes, time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(out_dir, args, env, outcomes, time.monotonic() - t0)
    return outcomes


def run_pytest(step: Step, budget: float, out_dir: Path, smoke: bool) -> Outcome:
    log_path = out_dir / PYTEST_LOG
    argv = [sys.executable, "-m", "pytest", *step.argv]
    rc, wall, _ = run_command(argv, budget, log_path)
    counts = pytest_counts(log_tail(log_path, 4000))
    return Outcome(
        step,
        status=pytest_status(rc, counts, smoke),
        wall_s=wall,
        rc=rc,
        command="python -m pytest " + " ".join(step.argv),
        result={"counts": counts},
        error="" if rc == 0 else log_tail(log_path),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the results folder (created)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default 450; smoke 300)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.budget is None:
        args.budget = 300.0 if args.smoke else 450.0
    outcomes = run_check(args)
    sections = (Path(args.out) / RESULTS_MD).read_text().split("\n## ")
    print("\n" + "\n## ".join(sections[:3]))  # the header, the steps and the headline
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
