#!/usr/bin/env python3
"""The peers' side of spectral-step's peer benchmark: PyTorch and SciPy on the same inputs as
the crate's bench binary (benches/peers.rs), in the same run. bench/peers/run.sh drives it;
the subcommands are

    peers.py generate DATA            shared inputs for the spectral-norm task (seeded)
    peers.py run DATA OUT ROUNDS      time the peers, check agreement with the crate's output
    peers.py report OUT COMMAND       the ratio table (Markdown) from OUT/{crate,peers}.json
    peers.py gpu-step CRATE ROUNDS    on a GPU machine: the eager PyTorch step on CUDA, timed
                                      beside the crate's GPU step (CRATE: the JSON lines that
                                      benches/gpu_step.rs --json writes); prints the ratios

Tasks (see bench/peers/README.md): 1. spectral norm to 1e-3 relative error (cold start),
2. one warm power iteration over the GPT-2-small matrix set, 3. the full spectral step on that
set (f32 and bf16), written in eager PyTorch the way a user would.
"""
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEED = 2026


def shape_set():
    """The GPT-2-small set from bench/shapes/gpt2_small.txt, the benches' one definition."""
    layers, layer = 1, []
    path = Path(__file__).resolve().parent.parent / "shapes" / "gpt2_small.txt"
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0] == "layers":
            layers = int(fields[1])
        else:
            layer.append((int(fields[0]), int(fields[1])))
    return layer * layers


SHAPES = shape_set()
LEARNING_RATE, MOMENTUM, COLD, WARM = 0.02, 0.95, 8, 1  # SpectralSgdConfig::default()


def hashed(salt):
    """The GPT-2-set inputs, bit for bit as benches/peers.rs makes them."""
    out = []
    for j, (rows, cols) in enumerate(SHAPES):
        i = np.arange(rows * cols, dtype=np.uint64)
        h = (i ^ np.uint64(salt + j)) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64
        v = (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24) * np.float32(2) - np.float32(1)
        out.append(v.reshape(rows, cols))
    return out


def timed(rounds, work):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def generate(data):
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    lines = []
    for n in (2048, 4096):
        a = rng.standard_normal((n, n), dtype=np.float32)
        a.tofile(data / f"gaussian_{n}.bin")
        lines.append(f"gaussian-{n} {n} {n} gaussian_{n}.bin")
        # Gradient-like: a few outer products with decaying weights plus a little noise
        # (low stable rank, a clear gap at the top).
        g = 0.01 * rng.standard_normal((n, n), dtype=np.float32)
        for k in range(4):
            g += np.outer(rng.standard_normal(n), rng.standard_normal(n)).astype(np.float32) / (k + 1)
        g.tofile(data / f"lowrank_{n}.bin")
        lines.append(f"lowrank-{n} {n} {n} lowrank_{n}.bin")
    (data / "manifest.txt").write_text("\n".join(lines) + "\n")


def load_crate(out):
    rows = [json.loads(line) for line in (out / "crate.json").read_text().splitlines() if line.strip()]
    return {(r["task"], r["case"]): r for r in rows}


def run(data, out, rounds):
    import torch
    import torch.nn.functional as F
    from scipy.sparse.linalg import svds

    crate = load_crate(out)
    results = []

    def record(task, case, peer, timing, **extra):
        median, low, high = timing
        results.append(dict(side="peer", task=task, case=case, peer=peer, median_ms=median, min_ms=low, max_ms=high, **extra))
        print(f"{task:15} {case:20} {peer:28} {median:10.2f} ms", file=sys.stderr)

    # 1. Spectral norm to 1e-3 relative error.
    for line in (data / "manifest.txt").read_text().split("\n"):
        if not line.strip():
            continue
        name, rows, cols, file = line.split()
        a = np.fromfile(data / file, dtype=np.float32).reshape(int(rows), int(cols))
        t = torch.from_numpy(a)
        exact = float(torch.linalg.matrix_norm(t.double(), ord=2))
        mn_rounds = max(1, min(rounds, 3))
        value = {}
        record("spectral_norm", name, "torch.linalg.matrix_norm(ord=2)",
               timed(mn_rounds, lambda: value.__setitem__("mn", float(torch.linalg.matrix_norm(t, ord=2)))),
               error=abs(value["mn"] - exact) / exact)
        v0 = np.random.default_rng(1).standard_normal(int(cols))
        record("spectral_norm", name, "scipy svds(k=1, tol=1e-3)",
               timed(rounds, lambda: value.__setitem__("svds", float(svds(a, k=1, tol=1e-3, v0=v0, return_singular_vectors=False)[0]))),
               error=abs(value["svds"] - exact) / exact)
        ours = crate[("spectral_norm", name)]
        ours["error"] = abs(ours["sigma"] - exact) / exact
        for who, err in (("crate", ours["error"]), ("matrix_norm", results[-2]["error"]), ("svds", results[-1]["error"])):
            if not err <= 1e-3:
                raise SystemExit(f"{name}: {who} is {err:.2e} from the exact norm, above 1e-3")
        results.append(dict(side="check", task="spectral_norm", case=name, exact=exact, crate_error=ours["error"]))

    # 2. One warm power iteration over the GPT-2 set, the two-matvec form.
    weights = [torch.from_numpy(w) for w in hashed(1)]
    start = np.fromfile(out / "power_start.bin", dtype=np.float32)
    after = np.fromfile(out / "power_after.bin", dtype=np.float32)
    offsets = np.cumsum([0] + [c for _, c in SHAPES])
    vectors = [torch.from_numpy(start[offsets[j]:offsets[j + 1]].copy()) for j in range(len(SHAPES))]

    def power_iteration():
        for w, v in zip(weights, vectors):
            u = F.normalize(w @ v, dim=0)
            v.copy_(F.normalize(w.T @ u, dim=0))

    power_iteration()
    got = torch.cat(vectors).numpy()
    difference = float(np.max(np.abs(got - after)))
    if not difference <= 1e-4:
        raise SystemExit(f"power iteration: PyTorch and the crate differ by {difference:.2e} (> 1e-4)")
    results.append(dict(side="check", task="power_iteration", case="gpt2-small f32", max_abs_difference=difference))
    record("power_iteration", "gpt2-small f32", "torch two-matvec (u = W v, v = W^T u)", timed(rounds, power_iteration))
    del weights

    # 3. The full step, eager PyTorch as a user writes it: _foreach momentum, a power
    # iteration per matrix, an in-place update.
    start = np.fromfile(out / "step_vectors.bin", dtype=np.float32)
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        weights = [torch.from_numpy(w).to(dtype) for w in hashed(1)]
        grads = [torch.from_numpy(g).to(dtype) for g in hashed(1000)]
        momenta = [torch.zeros(g.shape, dtype=torch.float32) for g in grads]
        vectors = [torch.from_numpy(start[offsets[j]:offsets[j + 1]].copy()) for j in range(len(SHAPES))]
        scales = [math.sqrt(rows / cols) for rows, cols in SHAPES]

        step = eager_step(torch, weights, grads, momenta, vectors, scales, dtype)
        before = [w[...].float().clone() for w in weights[:4]]
        step(COLD)
        ours = np.fromfile(out / f"step_{dtype_name}_weights.bin", dtype=np.float32)
        theirs = torch.cat([w.float().flatten() for w in weights[:4]]).numpy()
        update = float(max((w.float() - b).abs().max() for w, b in zip(weights[:4], before)))
        ulp = 2.0 ** -8 if dtype_name == "bf16" else 2.0 ** -23
        difference = float(np.max(np.abs(ours - theirs)))
        if not difference <= 1e-3 * update + ulp:
            raise SystemExit(f"step {dtype_name}: weights differ by {difference:.2e} (update {update:.2e})")
        results.append(dict(side="check", task="step", case=f"gpt2-small {dtype_name}", max_abs_difference=difference, largest_update=update))
        record("step", f"gpt2-small {dtype_name}", "eager PyTorch step", timed(rounds, lambda: step(WARM)))
        del weights, grads, momenta

    with open(out / "peers.json", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    with open(out / "environment.json", "w") as f:
        json.dump(dict(torch=torch.__version__, numpy=np.__version__, scipy=__import__("scipy").__version__,
                       torch_threads=torch.get_num_threads(), python=platform.python_version()), f)


def eager_step(torch, weights, grads, momenta, vectors, scales, dtype):
    """The spectral step in eager PyTorch as a user writes it: _foreach momentum, a power
    iteration per matrix, an in-place update. Returns step(iterations)."""

    def step(iterations):
        grads32 = grads if dtype == torch.float32 else [g.float() for g in grads]
        torch._foreach_mul_(momenta, MOMENTUM)
        torch._foreach_add_(momenta, grads32)
        for w, m, v, s in zip(weights, momenta, vectors, scales):
            for _ in range(iterations):
                q = m.T @ (m @ v)
                norm = q.norm()
                v.copy_(q / norm)
            sigma = float(norm.sqrt())
            w.add_(m, alpha=-LEARNING_RATE * s / sigma)

    return step


def gpu_step(crate_json, rounds):
    """The eager PyTorch step on CUDA on the GPT-2 set (f32, bf16), timed with CUDA events
    after a cold step, beside the crate's GPU step times from benches/gpu_step.rs."""
    import torch

    if not torch.cuda.is_available():
        print("NOT RUN: PyTorch sees no CUDA device")
        return
    crate = {}
    for line in Path(crate_json).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            crate[row["case"]] = row
    device = torch.device("cuda")
    print(f"GPU step, GPT-2-small set ({len(SHAPES)} matrices): {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| dtype | eager PyTorch ms | crate ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        weights = [torch.from_numpy(w).to(device=device, dtype=dtype) for w in hashed(1)]
        grads = [torch.from_numpy(g).to(device=device, dtype=dtype) for g in hashed(1000)]
        momenta = [torch.zeros(g.shape, dtype=torch.float32, device=device) for g in grads]
        vectors = [torch.nn.functional.normalize(torch.ones(cols, device=device), dim=0) for _, cols in SHAPES]
        scales = [math.sqrt(rows / cols) for rows, cols in SHAPES]
        step = eager_step(torch, weights, grads, momenta, vectors, scales, dtype)
        step(COLD)
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(WARM)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        theirs = times[len(times) // 2]
        ours = crate.get(dtype_name)
        if ours is None:
            print(f"| {dtype_name} | {theirs:.3f} | NOT RUN | |")
        else:
            print(f"| {dtype_name} | {theirs:.3f} | {ours['median_ms']:.3f} | **{theirs / ours['median_ms']:.2f}x** |")
        del weights, grads, momenta


def report(out, command):
    crate = load_crate(out)
    peers = [json.loads(l) for l in (out / "peers.json").read_text().splitlines() if l.strip()]
    env = json.loads((out / "environment.json").read_text())
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    lines = [
        f"# Peer benchmark, {time.strftime('%Y-%m-%d')}",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
        f"- Peers: torch {env['torch']} ({env['torch_threads']} threads), numpy {env['numpy']}, scipy {env['scipy']}, Python {env['python']}",
        f"- Command: `{command}`",
        "- Times: median (min–max) of the rounds, milliseconds, both sides in the same run. Speed-up: peer median / crate median.",
        "",
        "| task | case | peer | peer ms | crate ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in (r for r in peers if r["side"] == "peer"):
        ours = crate[(p["task"], p["case"])]
        extra = f" ({ours['passes']} passes)" if "passes" in ours else ""
        lines.append(
            f"| {p['task']} | {p['case']} | {p['peer']} | {p['median_ms']:.2f} ({p['min_ms']:.2f}–{p['max_ms']:.2f}) "
            f"| {ours['median_ms']:.2f} ({ours['min_ms']:.2f}–{ours['max_ms']:.2f}){extra} | **{p['median_ms'] / ours['median_ms']:.2f}×** |"
        )
    lines += ["", "Agreement checks (run before timing):", ""]
    for c in (r for r in peers if r["side"] == "check"):
        details = ", ".join(f"{k} {v:.3g}" for k, v in c.items() if isinstance(v, float))
        lines.append(f"- {c['task']} / {c['case']}: {details}")
    print("\n".join(lines))


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "generate" and len(sys.argv) == 3:
        generate(Path(sys.argv[2]))
    elif command == "run" and len(sys.argv) == 5:
        run(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    elif command == "report" and len(sys.argv) == 4:
        report(Path(sys.argv[2]), sys.argv[3])
    elif command == "gpu-step" and len(sys.argv) == 4:
        gpu_step(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
