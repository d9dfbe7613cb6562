//! Seeded Gaussian streams. ChaCha8 with an explicit stream per matrix: the numbers depend only
//! on `(seed, stream)`, never on thread count or call order, and `rand_chacha` keeps the
//! stream stable across releases.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Fills `out` with independent `N(0, 1)` samples from stream `stream` of `seed`.
pub(crate) fn fill_gaussian(seed: u64, stream: u64, out: &mut [f32]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    for value in out.iter_mut() {
        *value = StandardNormal.sample(&mut rng);
    }
}

/// A random unit vector (uniform on the sphere): the cold start of power iteration (math §4.8).
pub(crate) fn fill_unit_vector(seed: u64, stream: u64, out: &mut [f32]) {
    fill_gaussian(seed, stream, out);
    let norm = out
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        out.iter_mut()
            .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    } else {
        // Probability zero for any realistic length; keep the vector usable regardless.
        out.fill(0.0);
        out[0] = 1.0;
    }
}

/// The seeded cold-start power vectors of a whole batch (math §4.8), in a flat buffer laid
/// out like `layout`'s (gaps zero). Matrix `j`'s vector depends only on `(seed, j)`. Every
/// backend starts from these.
pub(crate) fn cold_power_vectors(
    layout: &crate::layout::BatchLayout,
    seed: u64,
) -> crate::error::Result<Vec<f32>> {
    let mut vectors = crate::memory::zeroed(layout.total_vector_len(), "power vectors")?;
    for (index, piece) in layout
        .split_vectors_mut(&mut vectors)
        .into_iter()
        .enumerate()
    {
        fill_unit_vector(seed, index as u64, piece);
    }
    Ok(vectors)
}
