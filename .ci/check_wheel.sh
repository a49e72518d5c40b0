#!/usr/bin/env bash
# The wheel is what users install: build it, install it into a fresh virtualenv in a temporary
# folder outside the checkout, and run the demo and README's Python quick-starts there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmrag-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== building the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" . 2>&1 | grep -v "^WARNING: Location" || true
WHEEL=$(ls "$WORK"/dist/mmrag-*.whl)

echo "== top-level names in $(basename "$WHEEL")"
"$PYTHON" - "$WHEEL" <<'PY'
import sys, zipfile
names = {n.split("/")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()}
top = sorted(n for n in names if not n.endswith((".dist-info", ".data")))
print(top)
assert top == ["mmrag"], f"the wheel must install exactly one top-level name, mmrag; it installs {top}"
files = zipfile.ZipFile(sys.argv[1]).namelist()
weights = "mmrag/pipelines/toyworld/weights/"
for needed in ("mmrag/py.typed", "mmrag/configs/tiny.yaml", "mmrag/configs/default.yaml", "mmrag/configs/toy.yaml",
               "mmrag/prompts/templates/vqa_question.txt", weights + "clip/model.safetensors",
               weights + "llava/model.safetensors", weights + "sd/unet/diffusion_pytorch_model.safetensors",
               weights + "sd/vae/diffusion_pytorch_model.safetensors", weights + "sd/model_index.json",
               weights + "ip-adapter/models/ip-adapter_sd15.safetensors",
               weights + "ip-adapter/models/image_encoder/model.safetensors", weights + "judge/model.safetensors",
               "mmrag/pipelines/serve/static/index.html"):
    assert needed in files, f"{needed} is missing from the wheel"
PY

echo "== installing it into a fresh virtualenv in $WORK"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# the CPU build of torch (pip's default Linux wheel is a multi-GB CUDA build), as the Makefile does
"$VPY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" \
    || "$VPY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
"$VPY" -m pip install -q "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true

cd "$WORK"  # nothing of the checkout on sys.path from here on
echo "== import check"
"$VPY" - "$ROOT" <<'PY'
import importlib.util, sys
import mmrag, mmrag.pipelines, mmrag.retrievers, mmrag.generators, mmrag.prompts
root = sys.argv[1]
assert not mmrag.__file__.startswith(root), f"mmrag was imported from the checkout: {mmrag.__file__}"
for name in ("pipelines", "retrievers", "generators", "prompts", "configs"):
    assert importlib.util.find_spec(name) is None, f"the wheel installed a top-level {name!r}"
from mmrag.pipelines.config import preset_names
assert {"default", "tiny", "toy"} <= set(preset_names()), preset_names()
print("mmrag", mmrag.__version__, "from", mmrag.__file__, "presets", preset_names())
PY
"$WORK/venv/bin/mmrag" --version

echo "== mmrag demo (the toy preset, from the wheel's own weights), outside the checkout"
HF_HUB_OFFLINE=1 "$WORK/venv/bin/mmrag" demo --out "$WORK/demo-out"
test -s "$WORK/demo-out/index.html"
grep -q "Toy preset" "$WORK/demo-out/index.html"  # the toy models, not a silent fallback to random ones

echo "== README's Python quick-starts, outside the checkout"
mkdir -p "$WORK/quickstart" && cd "$WORK/quickstart"
HF_HUB_OFFLINE=1 "$VPY" - "$ROOT/README.md" <<'PY'
import re, sys
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1], encoding="utf-8").read(), flags=re.S)
assert blocks, "README has no Python quick-starts"
namespace = {}
for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
print(f"{len(blocks)} quick-start blocks ran")
PY
test -s drawing.png
echo "== wheel check passed"
