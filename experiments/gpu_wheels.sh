#!/usr/bin/env bash
# Fill .whl/ with the wheels experiments/gpu_check.py needs on this workplace's GPU machine.
#
# That machine's image (python3 3.12, torch, lightning, torchmetrics, peft, opencv, matplotlib,
# pytest, hypothesis, ...) lacks these of the project's dependencies and has no registry, so they
# travel as wheels (the device tool's `carry=[".whl"]`). Versions are the ones the project's
# virtualenv here has (PYTHON, default .venv/bin/python), so the GPU runs what the tests here
# ran. antlr4-python3-runtime 4.9.3 (omegaconf's pin) has no wheel on PyPI: it is built here
# (pure Python). typing-extensions travels too: pydantic needs a recent one.
#
#     experiments/gpu_wheels.sh            # then see experiments/gpu_check.py for the run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=.whl
PACKAGES=(hydra-core omegaconf segment-anything albumentations albucore pydantic pydantic-core
          annotated-types typing-inspection typing-extensions stringzilla simsimd pycocotools grimp)
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
antlr=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")
rm -rf "$OUT" && mkdir -p "$OUT"
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$OUT" "${pins[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$OUT" "antlr4-python3-runtime==$antlr"
ls -1 "$OUT"
du -sh "$OUT"
