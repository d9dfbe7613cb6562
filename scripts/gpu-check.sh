#!/usr/bin/env bash
# Builds the GPU checks here and bundles them for a GPU machine that has a CUDA driver but no
# Rust toolchain and no network (issue 4).
#
#   bash scripts/gpu-check.sh            # build the bundle into target/gpu-bundle/
#   bash scripts/gpu-check.sh --dry-run  # build it, then run it here (no GPU: device tests
#                                        # fail with NoCudaDriver, the bench says NOT RUN)
#
# On the GPU machine, from the repository root (target/gpu-bundle carried along):
#   bash target/gpu-bundle/run.sh        # under 4 minutes on an H200
#
# The bundle holds release builds of tests/gpu.rs (device tests, run with --include-ignored),
# tests/kernel_conformance.rs (the simulator suite, as a cross-check of the same binary's
# kernels) and benches/gpu_step.rs. ptxas is required, so the cubins are embedded and the
# device does not need to JIT.
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

cat > "$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU checks of spectral-step (built by scripts/gpu-check.sh).
set -uo pipefail
cd "$(dirname "$0")"
status=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "== device tests (tests/gpu.rs, ignored ones included)"
./gpu --include-ignored --test-threads=1 || status=1
echo "== simulator conformance (same build)"
./kernel_conformance --test-threads=2 || status=1
echo "== GPU benchmark (benches/gpu_step.rs)"
timeout 120 ./gpu_step --rounds 21 || status=1
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
