//! A small decoder-only transformer (GPT-2's shape: pre-norm blocks of causal self-attention
//! and a 4x MLP) in candle, named as GPT-2 names its parameters (`wte`, `wpe`, `h.{i}.attn`,
//! `lm_head`, ...), so that routing by name sees what it would see in a real model.
//!
//! The norm and the softmax are written out: candle-nn 0.11's fused `LayerNorm` and
//! `softmax_last_dim` have no backward pass, so the gradient stops at them without an error.

use candle_core::{D, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

/// The model's sizes.
#[derive(Clone, Copy, Debug)]
pub struct TransformerShape {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Longest sequence (positions).
    pub context: usize,
    /// Residual width.
    pub width: usize,
    /// Attention heads (each `width / heads` wide).
    pub heads: usize,
    /// Blocks.
    pub layers: usize,
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    const EPS: f64 = 1e-5;

    fn new(width: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(width, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(width, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_div(&(variance + Self::EPS)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    heads: usize,
}

impl Block {
    fn new(shape: TransformerShape, vb: VarBuilder) -> Result<Self> {
        let width = shape.width;
        Ok(Self {
            ln_1: LayerNorm::new(width, vb.pp("ln_1"))?,
            c_attn: candle_nn::linear(width, 3 * width, vb.pp("attn.c_attn"))?,
            attn_proj: candle_nn::linear(width, width, vb.pp("attn.c_proj"))?,
            ln_2: LayerNorm::new(width, vb.pp("ln_2"))?,
            c_fc: candle_nn::linear(width, 4 * width, vb.pp("mlp.c_fc"))?,
            mlp_proj: candle_nn::linear(4 * width, width, vb.pp("mlp.c_proj"))?,
            heads: shape.heads,
        })
    }

    /// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`; `mask` is 0 on and below the diagonal,
    /// `-inf` above.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, time, width) = x.dims3()?;
        let head_width = width / self.heads;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)?)?;
        let split = |index: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, index * width, width)?
                .reshape((batch, time, self.heads, head_width))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (query, key, value) = (split(0)?, split(1)?, split(2)?);
        let scores = (query.matmul(&key.t()?)? / (head_width as f64).sqrt())?;
        let weights = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
        let attended = weights
            .matmul(&value)?
            .transpose(1, 2)?
            .reshape((batch, time, width))?;
        let x = (x + self.attn_proj.forward(&attended)?)?;
        let hidden = self.c_fc.forward(&self.ln_2.forward(&x)?)?.gelu()?;
        x + self.mlp_proj.forward(&hidden)?
    }
}

/// The transformer: token and position embeddings, blocks, a final norm and the head.
pub struct Transformer {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    shape: TransformerShape,
}

impl Transformer {
    /// A model with candle-nn's default initialisation, its variables created in `vb`.
    pub fn new(shape: TransformerShape, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..shape.layers)
            .map(|layer| Block::new(shape, vb.pp(format!("h.{layer}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            wte: candle_nn::embedding(shape.vocab, shape.width, vb.pp("wte"))?,
            wpe: candle_nn::embedding(shape.context, shape.width, vb.pp("wpe"))?,
            blocks,
            ln_f: LayerNorm::new(shape.width, vb.pp("ln_f"))?,
            lm_head: candle_nn::linear_no_bias(shape.width, shape.vocab, vb.pp("lm_head"))?,
            shape,
        })
    }

    /// Logits `(batch, time, vocab)` for token ids `(batch, time)`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, time) = tokens.dims2()?;
        let device = tokens.device();
        let positions = Tensor::arange(0u32, time as u32, device)?;
        let mut x = self
            .wte
            .forward(tokens)?
            .broadcast_add(&self.wpe.forward(&positions)?)?;
        let mask = causal_mask(time, device)?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        self.lm_head.forward(&self.ln_f.forward(&x)?)
    }

    /// Mean next-token cross-entropy of `tokens[:, :-1]` predicting `tokens[:, 1:]`.
    pub fn loss(&self, tokens: &Tensor) -> Result<Tensor> {
        let (batch, time) = tokens.dims2()?;
        let inputs = tokens.narrow(1, 0, time - 1)?;
        let targets = tokens.narrow(1, 1, time - 1)?;
        let logits = self.forward(&inputs)?;
        candle_nn::loss::cross_entropy(
            &logits.reshape((batch * (time - 1), self.shape.vocab))?,
            &targets.reshape(batch * (time - 1))?,
        )
    }
}

fn causal_mask(time: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..time * time)
        .map(|i| {
            if i % time > i / time {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(values, (time, time), device)
}

/// Re-initialises every variable of `varmap` from `seed`, so that runs of one width start
/// from the same weights whatever the optimizer: matrices `N(0, 1/fan_in)` (candle's `(out,
/// in)` layout), embeddings `N(0, 1)` (candle-nn's `Embedding` default), norm gains 1 and
/// biases 0.
pub fn seed_parameters(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (index, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let values: Vec<f32> = if dims.len() == 1 {
            let value = if name.ends_with("weight") { 1.0 } else { 0.0 };
            vec![value; dims[0]]
        } else {
            let std = if name.starts_with("wte") || name.starts_with("wpe") {
                1.0
            } else {
                1.0 / (dims[1] as f64).sqrt()
            };
            let normal = rand_distr::Normal::new(0.0, std)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                seed.wrapping_mul(1 << 20).wrapping_add(index as u64),
            );
            (0..var.elem_count())
                .map(|_| normal.sample(&mut rng) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
