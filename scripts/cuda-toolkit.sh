#!/usr/bin/env bash
# Installs, from PyPI wheels alone, what building the `candle-cuda` feature needs on a
# machine without a CUDA toolkit, and prints the environment to build with:
#
#   eval "$(bash scripts/cuda-toolkit.sh)"
#   cargo build --no-default-features --features candle-cuda ...
#
# * nvcc, its front end (nvvm's cicc), the CUDA headers (runtime, crt, cccl): candle-core's
#   `cuda` feature compiles candle's kernels with nvcc at build time.
# * the libraries candle's cudarc links (`dynamic-linking`): libcudart, libnvrtc, libcurand,
#   libcublas, libcublasLt. The wheels ship only their versioned names (libcublas.so.13), so
#   the unversioned names the linker looks for are added as links.
# * libcuda: the driver comes with the GPU's driver, not as a wheel; a toolkit ships a
#   link-time stub of it. This script builds that stub: a library named libcuda.so.1 that
#   defines every driver function cudarc declares (as functions that return an error), so
#   that the linker can resolve them. At run time the real libcuda.so.1 of the driver is
#   loaded in its place; the stub is never on the library path of a program that runs.
#
# CUDA 13 (13.5 wheels), the version of the GPU machines (driver 580) this is run on. Kept in
# ~/.cache/spectral-step/cuda-13.5; a second run only prints the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${HOME}/.cache/spectral-step/cuda-13.5"
cuda="$root/nvidia/cu13"
wheels=(
    nvidia-cuda-nvcc==13.5.37
    nvidia-cuda-crt==13.5.37
    nvidia-cuda-runtime==13.5.37
    nvidia-cuda-nvrtc==13.5.37
    nvidia-nvvm==13.5.37
    nvidia-cuda-cccl==13.3.5.0.6
    nvidia-curand==10.4.5.25
    nvidia-cublas==13.10.0.20
)
if [[ ! -e "$root/.complete" ]]; then
    rm -rf "$root"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$root" \
        "${wheels[@]}" >&2
    for library in cudart nvrtc curand cublas cublasLt; do
        versioned=$(cd "$cuda/lib" && ls "lib$library.so."* | grep -E "^lib$library\.so\.[0-9]+$" | head -1)
        ln -sf "$versioned" "$cuda/lib/lib$library.so"
    done
    # The driver stub: one function per driver entry point cudarc's bindings declare.
    mkdir -p "$cuda/lib/stubs"
    bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | sort -V | tail -1)
    grep -oE '\bfn cu[A-Za-z0-9_]+\(' "$bindings" | sed -E 's/^fn (.*)\($/\1/' | sort -u |
        awk '{ print "int " $1 "(void) { return 999; }" }' > "$cuda/lib/stubs/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" \
        "$cuda/lib/stubs/libcuda.c"
    touch "$root/.complete"
fi
cat <<ENV
export CUDA_ROOT="$cuda"
export PATH="$cuda/bin:$cuda/nvvm/bin:\$PATH"
export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=90
ENV
