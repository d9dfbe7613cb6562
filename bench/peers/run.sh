#!/usr/bin/env bash
# The peer benchmark, from a clean clone: a local virtual environment with PyPI's
# torch, numpy and scipy under target/, shared seeded inputs, this crate's bench binary and
# the peers on them in one run, agreement checks, and a ratio table written to
# bench/results/<date>-cpu.md (and printed).
#
#   bash bench/peers/run.sh [ROUNDS] [TASKS]
#
# ROUNDS: rounds per measurement (default 7). TASKS: a comma-separated subset of
# spectral_norm,power_iteration,step,orthogonal_step (default: all four; the orthogonalised
# step is by far the longest, minutes on a CPU without bf16 matrix instructions).
#
# Needs python3 with venv and the network to PyPI (first run only: torch is large).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-7}"
tasks="${2:-}"
venv=target/peers-venv
data=target/peers-data
out=target/peers-out
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.15.0 numpy==2.4.6 scipy==1.17.1
if [[ ! -f "$data/manifest.txt" ]]; then
    echo "== generating the shared inputs (seeded) in $data"
    "$venv/bin/python" bench/peers/peers.py generate "$data"
fi
rm -rf "$out"
mkdir -p "$out"
echo "== this crate (benches/peers.rs)"
cargo bench --bench peers -- --data "$data" --out "$out" --rounds "$rounds" --tasks "$tasks"
echo "== peers (bench/peers/peers.py), with agreement checks"
"$venv/bin/python" bench/peers/peers.py run "$data" "$out" "$rounds" "$tasks"
report="bench/results/$(date +%Y-%m-%d-%H%M)-cpu.md"
"$venv/bin/python" bench/peers/peers.py report "$out" "bash bench/peers/run.sh $rounds${tasks:+ $tasks}" > "$report"
cat "$report"
echo "wrote $report"
