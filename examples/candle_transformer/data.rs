//! The training text and its batches: the Book of Genesis (King James Version, public domain),
//! as characters.
//!
//! `genesis.txt` is the verse text of Genesis 1:1 to 50:26 printed by Debian's `bible-kjv`
//! package (4.38: `bible -l0 gen1:1-gen50:26`), one verse per line with the chapter headings
//! and verse numbers removed: 196,818 bytes, 60 distinct characters.

use candle_core::{Device, Result, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The text, embedded so that the example needs no file at run time.
pub const GENESIS: &str = include_str!("genesis.txt");

/// A character-level corpus: the vocabulary and the text as token ids, split into a training
/// part and a held-out tail.
pub struct Corpus {
    pub vocabulary: Vec<char>,
    pub train: Vec<u32>,
    pub held_out: Vec<u32>,
}

impl Corpus {
    /// The text's characters, sorted, are the vocabulary; the last `held_out_fraction` of the
    /// text is held out.
    pub fn new(text: &str, held_out_fraction: f64) -> Self {
        let mut vocabulary: Vec<char> = text.chars().collect();
        vocabulary.sort_unstable();
        vocabulary.dedup();
        let ids: Vec<u32> = text
            .chars()
            .map(|c| {
                vocabulary
                    .binary_search(&c)
                    .expect("every character is in the vocabulary") as u32
            })
            .collect();
        let split = ((1.0 - held_out_fraction) * ids.len() as f64) as usize;
        Self {
            vocabulary,
            train: ids[..split].to_vec(),
            held_out: ids[split..].to_vec(),
        }
    }
}

/// Batches of `rows` windows of `length` tokens at seeded random offsets.
pub struct Batches {
    rng: ChaCha8Rng,
    rows: usize,
    length: usize,
}

impl Batches {
    pub fn new(seed: u64, rows: usize, length: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            rows,
            length,
        }
    }

    /// The next batch from `tokens`, `(rows, length)`.
    pub fn next(&mut self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        let mut batch = Vec::with_capacity(self.rows * self.length);
        for _ in 0..self.rows {
            let start = self.rng.random_range(0..tokens.len() - self.length);
            batch.extend_from_slice(&tokens[start..start + self.length]);
        }
        Tensor::from_vec(batch, (self.rows, self.length), device)
    }
}
