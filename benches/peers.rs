//! This crate's side of the peer benchmark (`bench/peers/run.sh` drives it and the
//! PyTorch / SciPy side, `bench/peers/peers.py`, on the same inputs in the same run).
//!
//! ```text
//! cargo bench --bench peers -- --data DIR --out DIR [--rounds N] [--tasks A,B,...]
//! ```
//!
//! 1. Spectral norm to 1e-3 relative error, cold start, of every matrix listed in
//!    `DIR/manifest.txt` (`name rows cols file`, raw little-endian f32 written by peers.py):
//!    Lanczos on `U^T U` over the fused pass (`BatchPowerIteration::lanczos`).
//! 2. One warm power iteration over the GPT-2-small matrix set (fused, one read).
//! 3. The full spectral step on the GPT-2-small set, f32 and bf16 weights/gradients.
//! 4. The orthogonalised step (math §5b) on that set, f32 and bf16, configured as
//!    `torch.optim.Muon(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)` steps:
//!    EMA momentum, Nesterov, Muon's five quintic iterations, `Scale::MuonMax1` (torch's
//!    `adjust_lr_fn="original"`), round-to-nearest 16-bit weights. At most 3 rounds: a step
//!    takes seconds.
//!
//! The GPT-2 inputs come from a hash of the element index that numpy reproduces bit for bit
//! (`value(i) = ((h >> 40) / 2^24) * 2 - 1`, `h = (i ^ (salt + j)) * 0x9E3779B97F4A7C15`),
//! so no 680 MB of files change hands. For the agreement checks this binary writes its start
//! vectors and its results (`OUT/*.bin`) for peers.py to compare against. Timings: median,
//! min and max over `--rounds` (wall clock), written to `OUT/crate.json`.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use spectral_step::cpu::{BatchPowerIteration, Estimate};
use spectral_step::half::bf16;
use spectral_step::newton_schulz::{Schedule, UpdateRule};
use spectral_step::{
    BatchLayout, BlockPolicy, Element, MatrixShape, MomentumKind, Rounding, Scale, SpectralSgd,
    SpectralSgdConfig,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The tasks, by the names `bench/peers/peers.py` and the report use (`--tasks` picks some).
const TASKS: [&str; 4] = [
    "spectral_norm",
    "power_iteration",
    "step",
    "orthogonal_step",
];

use common::{gpt2_small, hashed_batch as hashed};

/// (median, min, max) milliseconds of `rounds` runs of `work`.
fn time(rounds: usize, mut work: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        work()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0], times[times.len() - 1]))
}

fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(path, bytes)?;
    Ok(())
}

fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = fs::read(path)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn json_timing(
    json: &mut String,
    task: &str,
    case: &str,
    (median, min, max): (f64, f64, f64),
    extra: &str,
) {
    writeln!(json, r#"{{"side": "crate", "task": "{task}", "case": "{case}", "median_ms": {median:.4}, "min_ms": {min:.4}, "max_ms": {max:.4}{extra}}}"#).ok();
}

/// The cold-start norm's rows: one vector per Lanczos block (the method `svds` also uses),
/// and a block of four (math §4.9.1).
const SPECTRAL_NORM_TASKS: [(&str, usize); 2] =
    [("spectral_norm", 1), ("spectral_norm, block of 4", 4)];

fn spectral_norms(data: &Path, rounds: usize, json: &mut String) -> Result<()> {
    let manifest = fs::read_to_string(data.join("manifest.txt"))?;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, rows, cols, file] = fields[..] else {
            return Err(format!("bad manifest line {line:?}").into());
        };
        let shape = MatrixShape::new(rows.parse()?, cols.parse()?);
        let matrix = read_f32(&data.join(file))?;
        let mut power = BatchPowerIteration::new(BatchLayout::new(&[shape], BlockPolicy::CPU)?)?;
        for (task, block_vectors) in SPECTRAL_NORM_TASKS {
            let mut last = None;
            let timing = time(rounds, || {
                last = Some(power.lanczos(&[&matrix[..]], 1, 1e-3, 500, block_vectors)?[0]);
                Ok(())
            })?;
            let result = last.ok_or("no rounds")?;
            let Estimate::Sigma(sigma) = result.estimate else {
                return Err(format!("{name}: {result:?}").into());
            };
            eprintln!(
                "spectral norm {name}, block of {block_vectors}: sigma {sigma} in {} passes, \
                 {:.2} ms",
                result.iterations, timing.0
            );
            json_timing(
                json,
                task,
                name,
                timing,
                &format!(r#", "sigma": {sigma}, "passes": {}"#, result.iterations),
            );
        }
    }
    Ok(())
}

fn warm_power_iteration(out: &Path, rounds: usize, json: &mut String) -> Result<()> {
    let shapes = gpt2_small();
    let weights = hashed::<f32>(&shapes, 1);
    let views: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
    let mut power = BatchPowerIteration::new(BatchLayout::new(&shapes, BlockPolicy::CPU)?)?;
    let mut vectors = power.cold_vectors(7)?;
    write_f32(&out.join("power_start.bin"), &vectors)?;
    power.fused(&views, &mut vectors)?;
    write_f32(&out.join("power_after.bin"), &vectors)?;
    let timing = time(rounds, || {
        power.fused(&views, &mut vectors)?;
        Ok(())
    })?;
    eprintln!("warm power iteration (GPT-2 set, f32): {:.2} ms", timing.0);
    json_timing(json, "power_iteration", "gpt2-small f32", timing, "");
    Ok(())
}

fn step<T: Element>(out: &Path, rounds: usize, json: &mut String) -> Result<()> {
    let shapes = gpt2_small();
    // Eager PyTorch rounds new 16-bit weights to nearest: the same work on both sides.
    let config = SpectralSgdConfig {
        rounding: Rounding::Nearest,
        ..SpectralSgdConfig::default()
    };
    let optimizer = SpectralSgd::new(&shapes, config)?;
    let start: Vec<f32> = (0..shapes.len())
        .flat_map(|j| optimizer.power_vector(j).to_vec())
        .collect();
    write_f32(&out.join("step_vectors.bin"), &start)?;
    timed_step::<T>(optimizer, "step", "step", out, rounds, json)
}

/// The settings of `torch.optim.Muon(lr=0.02, weight_decay=0.1, momentum=0.95,
/// nesterov=True)`, which peers.py's side uses: torch's `buf.lerp_(g, 1 - beta)` and
/// `g.lerp_(buf, beta)` are the EMA momentum with Nesterov.
fn muon_config() -> SpectralSgdConfig {
    SpectralSgdConfig {
        learning_rate: 0.02,
        momentum: 0.95,
        momentum_kind: MomentumKind::Ema,
        nesterov: true,
        weight_decay: 0.1,
        scale: Scale::MuonMax1,
        rounding: Rounding::Nearest,
        update: UpdateRule::Orthogonalised(Schedule::MUON),
        ..SpectralSgdConfig::default()
    }
}

fn orthogonal_step<T: Element>(out: &Path, rounds: usize, json: &mut String) -> Result<()> {
    let optimizer = SpectralSgd::new(&gpt2_small(), muon_config())?;
    timed_step::<T>(
        optimizer,
        "orthogonal_step",
        "orth",
        out,
        rounds.min(3),
        json,
    )
}

/// The first layer's orthogonalised update alone, `-η s orth(U)`: one step from zero `f32`
/// weights (decay of zero is zero), written to `OUT/orth_f32_update.bin` for the tight check
/// against torch's iteration run in `f32`.
fn orthogonal_update(out: &Path) -> Result<()> {
    let shapes = &gpt2_small()[..4];
    let mut optimizer = SpectralSgd::new(shapes, muon_config())?;
    let mut weights: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.len()]).collect();
    optimizer.step(&mut weights, &hashed::<f32>(shapes, 1000))?;
    write_f32(&out.join("orth_f32_update.bin"), &weights.concat())
}

/// One step from the hashed weights and gradients (its first layer's new weights written to
/// `OUT/{file}_{dtype}_weights.bin` for the agreement check), then `rounds` timed steps.
fn timed_step<T: Element>(
    mut optimizer: SpectralSgd,
    task: &str,
    file: &str,
    out: &Path,
    rounds: usize,
    json: &mut String,
) -> Result<()> {
    let shapes = gpt2_small();
    let mut weights = hashed::<T>(&shapes, 1);
    let grads = hashed::<T>(&shapes, 1000);
    let report = optimizer.step(&mut weights, &grads)?;
    if !report.all_updated() {
        return Err(format!("the cold step skipped a matrix: {report:?}").into());
    }
    // One layer's updated weights, for peers.py's agreement check.
    let layer: Vec<f32> = weights[..4]
        .iter()
        .flat_map(|w| w.iter().map(|x| x.to_f32()))
        .collect();
    write_f32(
        &out.join(format!("{file}_{}_weights.bin", T::DTYPE.name())),
        &layer,
    )?;
    let timing = time(rounds, || {
        optimizer.step(&mut weights, &grads)?;
        Ok(())
    })?;
    eprintln!(
        "warm {task} (GPT-2 set, {}): {:.2} ms",
        T::DTYPE.name(),
        timing.0
    );
    json_timing(
        json,
        task,
        &format!("gpt2-small {}", T::DTYPE.name()),
        timing,
        "",
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench" && args.len() == 2) || args.iter().any(|a| a == "--list")
    {
        // `cargo bench` with no arguments: this binary needs the runner's inputs.
        println!("peers: run bench/peers/run.sh (it generates the inputs and runs the peers)");
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(data), Some(out)) = (value("--data"), value("--out")) else {
        println!("peers: run bench/peers/run.sh (needs --data DIR --out DIR)");
        return;
    };
    let rounds: usize = value("--rounds").and_then(|r| r.parse().ok()).unwrap_or(7);
    let tasks = value("--tasks").unwrap_or_default();
    let tasks: Vec<&str> = tasks.split(',').filter(|t| !t.is_empty()).collect();
    if let Some(unknown) = tasks.iter().find(|t| !TASKS.contains(t)) {
        eprintln!(
            "peers: unknown task {unknown:?}; the tasks are {}",
            TASKS.join(", ")
        );
        std::process::exit(2);
    }
    let wants = |task: &str| tasks.is_empty() || tasks.contains(&task);
    let (data, out) = (PathBuf::from(data), PathBuf::from(out));
    let run = || -> Result<String> {
        fs::create_dir_all(&out)?;
        let mut json = String::new();
        if wants("spectral_norm") {
            spectral_norms(&data, rounds, &mut json)?;
        }
        if wants("power_iteration") {
            warm_power_iteration(&out, rounds, &mut json)?;
        }
        if wants("step") {
            step::<f32>(&out, rounds, &mut json)?;
            step::<bf16>(&out, rounds, &mut json)?;
        }
        if wants("orthogonal_step") {
            orthogonal_update(&out)?;
            orthogonal_step::<f32>(&out, rounds, &mut json)?;
            orthogonal_step::<bf16>(&out, rounds, &mut json)?;
        }
        Ok(json)
    };
    match run() {
        Ok(json) => {
            if let Err(e) = fs::write(out.join("crate.json"), json) {
                eprintln!("peers: cannot write results: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("peers: {e}");
            std::process::exit(1);
        }
    }
}
