#!/usr/bin/env bash
# Builds the GPU checks here and bundles them for a GPU machine that has a CUDA driver but no
# Rust toolchain and no network.
#
#   bash scripts/gpu-check.sh            # build the bundle into target/gpu-bundle/
#   bash scripts/gpu-check.sh --dry-run  # build it, then run it here (no GPU: device tests
#                                        # fail with NoCudaDriver, the bench says NOT RUN)
#
# On the GPU machine, from the repository root (target/gpu-bundle carried along):
#   bash target/gpu-bundle/run.sh        # at most 4 minutes, by its timeouts
#
# With the candle-cuda build (not in a dry run: scripts/cuda-toolkit.sh installs nvcc and the
# CUDA libraries from PyPI, about 660 MB, and the first build of candle's kernels takes about
# 13-15 minutes on 2 cores), the bundle also holds tests/candle_cuda.rs, the candle adapter on
# CUDA tensors; it links the CUDA 13 libraries, which run.sh looks for on the GPU machine.
#
# The bundle holds release builds of tests/gpu.rs (device tests, run with --include-ignored,
# then a short workload of them under compute-sanitizer's memcheck, racecheck, initcheck and
# synccheck where the machine has compute-sanitizer), tests/kernel_conformance.rs (the same
# backend on the simulated device, as a cross-check of the same build's kernels) and
# benches/gpu_step.rs, and bench/peers/peers.py with the shape set, which times eager
# PyTorch's step on the GPU beside the crate's where the machine has torch. ptxas is
# required, so the cubins are embedded and the device does not need to JIT.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle
export SPECTRAL_STEP_REQUIRE_PTXAS=1
if [[ -z "${PTXAS:-}" && -x "$HOME/.cache/spectral-step/nvidia-cuda-nvcc-13.5.37/nvidia/cu13/bin/ptxas" ]]; then
    export PTXAS="$HOME/.cache/spectral-step/nvidia-cuda-nvcc-13.5.37/nvidia/cu13/bin/ptxas"
fi

executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable"):
        print(message["target"]["name"], message["executable"])'
}

rm -rf "$bundle"
mkdir -p "$bundle"
{
    cargo test --release --no-run --test gpu --test kernel_conformance --message-format=json
    cargo bench --no-run --bench gpu_step --message-format=json
} | executables | while read -r name path; do
    cp "$path" "$bundle/$name"
done
for name in gpu kernel_conformance gpu_step; do
    [[ -x "$bundle/$name" ]] || { echo "missing $name in the bundle" >&2; exit 1; }
done
if [[ "${1:-}" != "--dry-run" ]]; then
    (
        eval "$(bash scripts/cuda-toolkit.sh)"
        cargo test --release --no-run --features candle-cuda --test candle_cuda \
            --target-dir target/candle-cuda --message-format=json
    ) | executables | while read -r name path; do
        cp "$path" "$bundle/$name"
    done
    [[ -x "$bundle/candle_cuda" ]] || { echo "missing candle_cuda in the bundle" >&2; exit 1; }
    # 53 MB stripped, most of it candle's PTX, which compresses to about 6 MB.
    strip "$bundle/candle_cuda"
    xz -T2 -6 "$bundle/candle_cuda"
fi
mkdir -p "$bundle/peers" "$bundle/shapes"
cp bench/peers/peers.py "$bundle/peers/"
cp bench/shapes/gpt2_small.txt "$bundle/shapes/"

cat > "$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU checks of spectral-step (built by scripts/gpu-check.sh).
set -uo pipefail
cd "$(dirname "$0")"
status=0
# Every section has a timeout of at most 45 s, and none starts after 190 s, so the bundle
# ends within 4 minutes whatever happens (a bound by construction, not a measurement).
within_budget() {
    if (( SECONDS > 190 )); then echo "NOT RUN: $1 (the bundle's 4-minute budget is spent)"; return 1; fi
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "== device tests (tests/gpu.rs, ignored ones included)"
timeout 60 ./gpu --include-ignored --test-threads=1 || status=1
echo "== the candle adapter on CUDA tensors (tests/candle_cuda.rs, ignored ones included)"
if [[ -f candle_cuda.xz && ! -x candle_cuda ]]; then
    python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("candle_cuda.xz"), open("candle_cuda", "wb"))' \
        && chmod +x candle_cuda
fi
if [[ -x ./candle_cuda ]]; then
    # It links the CUDA 13 libraries (cudart, nvrtc, curand, cublas, cublasLt): the
    # toolkit's, or the wheels PyTorch installed.
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        $(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null); do
        [[ -d "$dir" ]] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    missing=$(ldd ./candle_cuda | grep "not found" || true)
    if [[ -n "$missing" ]]; then
        echo "NOT RUN: candle_cuda lacks libraries: $missing"; status=1
    else
        within_budget "candle adapter on CUDA" && { timeout 60 ./candle_cuda --include-ignored --test-threads=1 || status=1; }
    fi
else
    echo "NOT RUN: candle_cuda is not in this bundle (built without the candle-cuda feature)"
fi
echo "== compute-sanitizer on the sanitizer workload (tests/gpu.rs sanitizer_workload)"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$sanitizer" ]]; then
    for tool in memcheck racecheck initcheck synccheck; do
        within_budget "compute-sanitizer $tool" || continue
        if timeout 30 "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 \
            ./gpu --include-ignored --exact sanitizer_workload --test-threads=1 > "sanitizer-$tool.log" 2>&1; then
            echo "compute-sanitizer $tool: clean (exit 0; $(grep -E "SUMMARY" "sanitizer-$tool.log" | tail -1))"
        else
            echo "compute-sanitizer $tool: FAILED (exit $?)"; tail -25 "sanitizer-$tool.log"; status=1
        fi
    done
else
    echo "NOT RUN: compute-sanitizer not found on this machine"
fi
echo "== simulator conformance (same build)"
within_budget "simulator conformance" && { timeout 20 ./kernel_conformance --test-threads=8 || status=1; }
echo "== GPU benchmark (benches/gpu_step.rs)"
within_budget "GPU benchmark" && { timeout 45 ./gpu_step --rounds 21 --json gpu_step.json || status=1; }
echo "== eager PyTorch's step on the same GPU (bench/peers/peers.py gpu-step)"
if python3 -c "import torch, numpy" 2>/dev/null; then
    if [[ -s gpu_step.json ]]; then
        within_budget "PyTorch step" && { timeout 40 python3 peers/peers.py gpu-step gpu_step.json 21 || status=1; }
    else
        echo "NOT RUN: the crate's GPU benchmark wrote no times"
    fi
else
    echo "NOT RUN: python3 with torch and numpy not found"
fi
echo "== bundle finished in ${SECONDS} s"
exit $status
RUN
chmod +x "$bundle/run.sh"
echo "bundle: $bundle ($(du -sh "$bundle" | cut -f1)); on the GPU machine: bash $bundle/run.sh"

if [[ "${1:-}" == "--dry-run" ]]; then
    echo "== dry run here (no GPU expected)"
    "$bundle/gpu" --list
    "$bundle/gpu" 2>&1 | tail -3
    "$bundle/gpu_step" --rounds 1
    "$bundle/kernel_conformance" 2>&1 | tail -2
fi
