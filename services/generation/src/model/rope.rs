//! Rotary position embeddings (Su et al. 2021, "RoFormer"), in the
//! half-split layout of Hugging Face's `rotate_half` (Llama, Qwen2: the first
//! and second halves of each head form the pairs, not interleaved neighbours).

use tch::{Device, Kind, Tensor};

/// Precomputed cos/sin tables, `[max_positions, head_dim]` f32.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions `0..max_positions` with base `theta`, computed as
    /// `transformers`' `_compute_default_rope_parameters`: inverse
    /// frequencies `1 / θ^(2i/d)` in f32, angles `pos · inv_freq`, repeated
    /// for both halves.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        device: Device,
    ) -> Result<Self, tch::TchError> {
        let d = head_dim as i64;
        let exponents = Tensor::f_arange_start_step(0i64, d, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(d as f64)?;
        let inv_freq = Tensor::f_pow_scalar(theta, &exponents)?.f_reciprocal()?;
        let positions = Tensor::f_arange(max_positions as i64, (Kind::Float, Device::Cpu))?;
        let freqs = positions.f_outer(&inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        Ok(Self {
            cos: emb.f_cos()?.f_to_device(device)?,
            sin: emb.f_sin()?.f_to_device(device)?,
        })
    }

    /// cos and sin for `positions` (`[n]` i64), `[n, head_dim]` in `kind`.
    pub fn at(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor), tch::TchError> {
        Ok((
            self.cos.f_index_select(0, positions)?.f_to_kind(kind)?,
            self.sin.f_index_select(0, positions)?.f_to_kind(kind)?,
        ))
    }
}

/// Rotates `x` (`[.., head_dim]`) by the angles whose cos/sin broadcast
/// against it: `x·cos + rotate_half(x)·sin`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, tch::TchError> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}
