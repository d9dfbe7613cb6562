#!/usr/bin/env python3
"""The peers' side of spectral-step's peer benchmark: PyTorch and SciPy on the same inputs as
the crate's bench binary (benches/peers.rs), in the same run. bench/peers/run.sh drives it;
the subcommands are

    peers.py generate DATA            shared inputs for the spectral-norm task (seeded)
    peers.py run DATA OUT ROUNDS [TASKS]
                                      time the peers, check agreement with the crate's output
                                      (TASKS: a comma-separated subset of TASKS below, all
                                      by default)
    peers.py report OUT COMMAND       the ratio table (Markdown) from OUT/{crate,peers}.json
    peers.py gpu-step CRATE ROUNDS    on a GPU machine: the eager PyTorch step on CUDA, timed
                                      beside the crate's GPU step (CRATE: the JSON lines that
                                      benches/gpu_step.rs --json writes); prints the ratios

Tasks (see bench/peers/README.md): 1. spectral norm to 1e-3 relative error (cold start),
2. one warm power iteration over the GPT-2-small matrix set, 3. the full spectral step on that
set (f32 and bf16), written in eager PyTorch the way a user would, 4. the orthogonalised step
(Muon's rule) on that set against torch.optim.Muon itself (f32 and bf16 parameters).
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
# The tasks, by the names the crate's side (benches/peers.rs) and the report use.
TASKS = ("spectral_norm", "power_iteration", "step", "orthogonal_step")
# The crate's rows for the spectral-norm task: one vector per Lanczos block, and a block of four.
SPECTRAL_NORM_VARIANTS = ("spectral_norm", "spectral_norm, block of 4")


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
# torch.optim.Muon's settings in task 4; benches/peers.rs's muon_config() is the crate's side.
MUON = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
# Agreement of task 4 (see bench/peers/README.md). torch's iteration in f32 against the crate's:
# relative Frobenius difference of the first layer's update. Against torch.optim.Muon, which
# orthogonalises in bf16 and adds a bf16 update: f32 parameters, relative Frobenius
# difference of the change, and every element within ORTH_MUON_ELEMENT_TOLERANCE of the
# change's RMS; bf16 parameters, every element within ORTH_BF16_ULPS bf16 ulps plus that.
ORTH_F32_ITERATION_TOLERANCE, ORTH_MUON_F32_TOLERANCE = 1e-4, 3e-2
# Element by element, torch's bf16 iteration departs from an f32 one by up to about 0.13 of
# the update's RMS (measured on this set's f32 run, which also checks it).
ORTH_MUON_ELEMENT_TOLERANCE = 0.2
# torch rounds bf16 weights twice per step (after the decay, after the update: within one ulp
# of the exact result), the crate once (within half an ulp), so they may differ by two ulps.
ORTH_BF16_ULPS = 2


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


def parse_tasks(text):
    """The tasks named in `text` (comma-separated), all of them for an empty text."""
    tasks = [t for t in text.split(",") if t] or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; the tasks are {', '.join(TASKS)}")
    return tasks


def run(data, out, rounds, tasks=TASKS):
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
    if "spectral_norm" in tasks:
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
            errors = {"matrix_norm": results[-2]["error"], "svds": results[-1]["error"]}
            for task in SPECTRAL_NORM_VARIANTS:
                errors[task] = abs(crate[(task, name)]["sigma"] - exact) / exact
            for who, err in errors.items():
                if not err <= 1e-3:
                    raise SystemExit(f"{name}: {who} is {err:.2e} from the exact norm, above 1e-3")
            results.append(dict(side="check", task="spectral_norm", case=name, exact=exact,
                                **{f"{who} error": err for who, err in errors.items()}))

    # 2. One warm power iteration over the GPT-2 set, the two-matvec form.
    offsets = np.cumsum([0] + [c for _, c in SHAPES])
    if "power_iteration" in tasks:
        weights = [torch.from_numpy(w) for w in hashed(1)]
        start = np.fromfile(out / "power_start.bin", dtype=np.float32)
        after = np.fromfile(out / "power_after.bin", dtype=np.float32)
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
    if "step" in tasks:
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

    if "orthogonal_step" in tasks:
        orthogonal_step(torch, out, rounds, results, record)

    with open(out / "peers.json", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    with open(out / "environment.json", "w") as f:
        json.dump(dict(torch=torch.__version__, numpy=np.__version__, scipy=__import__("scipy").__version__,
                       torch_threads=torch.get_num_threads(), python=platform.python_version()), f)


def relative_difference(ours, theirs):
    """||ours - theirs||_F / ||theirs||_F, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def bf16_ulp(values):
    """The spacing of bf16 numbers at each value (8 significant bits)."""
    magnitude = np.maximum(np.abs(np.asarray(values, np.float64)), 2.0 ** -126)
    return 2.0 ** (np.floor(np.log2(magnitude)) - 7)


def orthogonal_step(torch, out, rounds, results, record):
    """Task 4: the crate's orthogonalised step against torch.optim.Muon on the GPT-2 set."""
    import torch.optim._muon as muon

    layer = SHAPES[:4]
    size = sum(rows * cols for rows, cols in layer)
    adjusted = [MUON["lr"] * math.sqrt(max(1, rows / cols)) for rows, cols in layer]

    # torch's own iteration run in f32: for this call its module sees torch.bfloat16 as
    # torch.float32 (it casts with grad.to(dtype=torch.bfloat16, copy=True)).
    class F32Torch:
        def __getattr__(self, name):
            return torch.float32 if name == "bfloat16" else getattr(torch, name)

    coefficients = (muon.DEFAULT_A, muon.DEFAULT_B, muon.DEFAULT_C)
    muon.torch = F32Torch()
    try:
        theirs = np.concatenate([
            (-lr * muon._zeropower_via_newtonschulz(torch.from_numpy(g), coefficients, muon.DEFAULT_NS_STEPS, muon.EPS)).numpy().ravel()
            for g, lr in zip(hashed(1000)[:4], adjusted)
        ])
    finally:
        muon.torch = torch
    ours = np.fromfile(out / "orth_f32_update.bin", dtype=np.float32)
    difference = relative_difference(ours, theirs)
    if not difference <= ORTH_F32_ITERATION_TOLERANCE:
        raise SystemExit(f"orthogonalised update: {difference:.2e} from torch's iteration in f32 (> {ORTH_F32_ITERATION_TOLERANCE})")
    results.append(dict(side="check", task="orthogonal_step", case="torch iteration in f32", relative_difference=difference))

    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        params = [torch.nn.Parameter(torch.from_numpy(w).to(dtype)) for w in hashed(1)]
        for p, g in zip(params, hashed(1000)):
            p.grad = torch.from_numpy(g).to(dtype)
        optimizer = torch.optim.Muon(params, **MUON)
        before = np.concatenate([p.detach().float().numpy().ravel() for p in params[:4]])
        optimizer.step()
        after = np.concatenate([p.detach().float().numpy().ravel() for p in params[:4]])
        ours = np.fromfile(out / f"orth_{dtype_name}_weights.bin", dtype=np.float32)
        assert ours.size == after.size == size
        before, ours, after = (np.asarray(x, np.float64) for x in (before, ours, after))
        gap = np.abs(ours - after)
        update_rms = float(np.sqrt(np.mean((after - before) ** 2)))
        if dtype_name == "f32":
            difference = relative_difference(ours - before, after - before)
            check = dict(relative_difference=difference, largest_gap_per_update_rms=float(gap.max()) / update_rms)
            if not (difference <= ORTH_MUON_F32_TOLERANCE and np.all(gap <= ORTH_MUON_ELEMENT_TOLERANCE * update_rms)):
                raise SystemExit(f"orthogonalised step f32: the change departs from torch.optim.Muon's beyond {ORTH_MUON_F32_TOLERANCE} "
                                 f"(Frobenius) or {ORTH_MUON_ELEMENT_TOLERANCE} of its RMS (an element): {check}")
        else:
            allowed = ORTH_BF16_ULPS * bf16_ulp(np.maximum(np.abs(ours), np.abs(after))) + ORTH_MUON_ELEMENT_TOLERANCE * update_rms
            check = dict(identical_fraction=float(np.mean(gap == 0)), largest_gap=float(gap.max()),
                         largest_gap_per_allowed=float(np.max(gap / allowed)))
            if not np.all(gap <= allowed):
                raise SystemExit(f"orthogonalised step bf16: weights differ by more than {ORTH_BF16_ULPS} ulps plus "
                                 f"{ORTH_MUON_ELEMENT_TOLERANCE} of the change's RMS: {check}")
        results.append(dict(side="check", task="orthogonal_step", case=f"gpt2-small {dtype_name}", **check))
        record("orthogonal_step", f"gpt2-small {dtype_name}", "torch.optim.Muon", timed(max(1, min(rounds, 3)), optimizer.step))
        del params, optimizer


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
    # The orthogonalised step: torch.optim.Muon (bf16 Newton-Schulz, 5 iterations) on f32
    # parameters, beside the crate's Muon rule on the same set.
    if not hasattr(torch.optim, "Muon"):
        print(f"| orth f32 | NOT RUN: torch {torch.__version__} has no torch.optim.Muon (2.9+) | | |")
        return
    params = [torch.nn.Parameter(torch.from_numpy(w).to(device=device, dtype=torch.float32)) for w in hashed(1)]
    for p, g in zip(params, hashed(1000)):
        p.grad = torch.from_numpy(g).to(device=device, dtype=torch.float32)
    optimizer = torch.optim.Muon(params, **MUON)
    optimizer.step()
    times = []
    for _ in range(max(1, min(rounds, 11))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    theirs = times[len(times) // 2]
    ours = crate.get("orth_f32")
    label = "orth f32 (torch.optim.Muon)"
    if ours is None:
        print(f"| {label} | {theirs:.3f} | NOT RUN | |")
    else:
        print(f"| {label} | {theirs:.3f} | {ours['median_ms']:.3f} | **{theirs / ours['median_ms']:.2f}x** |")


def cpu_description():
    """The CPU's model name with its family and model numbers and whether it has AVX-512F
    (virtual machines often report a bare "AMD EPYC" for different generations)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", "unknown CPU")
    if "cpu family" not in fields or "model" not in fields:
        return name
    avx512 = "AVX-512F" if "avx512f" in fields.get("flags", "").split() else "no AVX-512"
    return f"{name} (family {fields['cpu family']}, model {fields['model']}; {avx512})"


def report(out, command):
    crate = load_crate(out)
    peers = [json.loads(l) for l in (out / "peers.json").read_text().splitlines() if l.strip()]
    env = json.loads((out / "environment.json").read_text())
    cpu = cpu_description()
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
        # The spectral norm's peers are timed once and set beside each Lanczos block size.
        tasks = SPECTRAL_NORM_VARIANTS if p["task"] == "spectral_norm" else (p["task"],)
        for task in (t for t in tasks if (t, p["case"]) in crate):
            ours = crate[(task, p["case"])]
            extra = f" ({ours['passes']} passes)" if "passes" in ours else ""
            lines.append(
                f"| {task} | {p['case']} | {p['peer']} | {p['median_ms']:.2f} ({p['min_ms']:.2f}–{p['max_ms']:.2f}) "
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
    elif command == "run" and len(sys.argv) in (5, 6):
        run(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), parse_tasks(sys.argv[5] if len(sys.argv) == 6 else ""))
    elif command == "report" and len(sys.argv) == 4:
        report(Path(sys.argv[2]), sys.argv[3])
    elif command == "gpu-step" and len(sys.argv) == 4:
        gpu_step(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
