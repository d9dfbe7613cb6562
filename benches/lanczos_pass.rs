//! What one Lanczos pass costs, one vector against a block of four (math §4.9.2): the time
//! per pass over a square `f32` matrix that stays in L3 (`2048²`, 16 MiB) and one read from
//! memory (`4096²`, 64 MiB), as nanoseconds per element and bandwidth. A pass costs the same
//! per element from L3 as from memory when the core, not the read, bounds it.
//!
//!     cargo bench --bench lanczos_pass [-- --rounds N]
//!
//! Each round runs a fixed number of passes (a tolerance no run reaches); the best round
//! counts, so that the figure is the pass's own cost on a shared machine.

mod common;

use spectral_step::cpu::BatchPowerIteration;
use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};
use std::time::Instant;

/// Passes per round.
const PASSES: u32 = 12;

/// `len` values uniform in `[-0.5, 0.5)` from a xorshift sequence: a matrix with a spread
/// spectrum, so that no run converges within the passes.
fn uniform(len: usize) -> Vec<f32> {
    let mut state = 12345u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn main() -> Result<(), spectral_step::Error> {
    let rounds = common::rounds_arg(5);
    println!(
        "Lanczos pass, {PASSES} passes per round, best of {rounds} rounds, {} threads, {}",
        rayon::current_num_threads(),
        common::cpu_model()
    );
    println!("  matrix   block   ms/pass   ns/element   GB/s");
    for n in [2048usize, 4096] {
        let shape = MatrixShape::new(n, n);
        let matrix = uniform(shape.len());
        let mut power = BatchPowerIteration::new(BatchLayout::new(&[shape], BlockPolicy::CPU)?)?;
        for block_vectors in [1, 4] {
            let mut best = f64::INFINITY;
            for _ in 0..rounds {
                let start = Instant::now();
                let result = power.lanczos(&[&matrix[..]], 1, 1e-14, PASSES, block_vectors)?;
                best = best.min(start.elapsed().as_secs_f64());
                assert_eq!(result[0].iterations, PASSES, "a run ended early");
            }
            let per_pass = best / f64::from(PASSES);
            let elements = shape.len() as f64;
            println!(
                "  {n:>4}²   {block_vectors:>5}   {:>7.3}   {:>10.3}   {:>4.1}",
                per_pass * 1e3,
                per_pass * 1e9 / elements,
                elements * 4.0 / per_pass / 1e9
            );
        }
    }
    Ok(())
}
