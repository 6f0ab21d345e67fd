#!/usr/bin/env bash
# The GPU checks (tests/test_gpu.py) as one prepared run on a lent CUDA machine that has PyTorch
# but neither this project's other packages nor a registry to install them from.
#
#   bench/gpu_checks.sh prepare   # here: wheels the GPU machine lacks -> .whl/, small-real's
#                                 # configs and tokenizers (no weights) -> .gpu/weights/
#   bench/gpu_checks.sh run       # there (carry .whl and .gpu): install, stand-in weights, tests
#   bench/gpu_checks.sh profile   # there: where a stage-2 step's time goes (bench/gpu_step.py)
#
# `run` and `profile` write their logs under $OUT (or outputs/gpu/) and exit with their status.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks or holds at another version than .venv (transformers 5.x needs
# huggingface_hub 2.x, which needs httpx2; transformers needs `kernels` to load on CUDA), at the
# versions .venv has; deepspeed ships only as an sdist, so it is wheeled here.
PACKAGES="transformers huggingface_hub httpx2 httpcore2 truststore click hf-xet kernels tomlkit peft pydantic
pydantic-core annotated-types typing-inspection hjson soundfile cffi pycparser soxr"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64"

prepare() {
    local py=.venv/bin/python weights=${MMM_WEIGHTS_DIR:-$HOME/.cache/mmm/weights} pinned
    rm -rf .whl .gpu
    mkdir -p .whl .gpu/weights
    # shellcheck disable=SC2086
    pinned=$($py -c "import sys; from importlib.metadata import version
print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" $PACKAGES)
    # shellcheck disable=SC2086
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d .whl $pinned
    $py -m pip wheel -q --no-deps -w .whl "deepspeed==$($py -c 'from importlib.metadata import version; print(version("deepspeed"))')"
    for name in whisper-base smollm2-135m-instruct; do
        mkdir -p ".gpu/weights/$name"
        find "$weights/$name" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} ".gpu/weights/$name/" \;
    done
    du -sh .whl .gpu
}

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MMM_WEIGHTS_DIR=/tmp/mmm-weights
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers',
        transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"
    python3 bench/gpu_standin_weights.py .gpu/weights "$MMM_WEIGHTS_DIR"
}

run() {
    python3 -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider --timeout 600 2>&1 | tee "$out/gpu-tests.log"
}

out=${OUT:-outputs/gpu}
case "${1:-}" in
    prepare) prepare ;;
    run) setup && run ;;
    profile) setup && python3 bench/gpu_step.py 2>&1 | tee "$out/gpu-step.log" ;;
    *) echo "usage: $0 prepare|run|profile" >&2; exit 2 ;;
esac
