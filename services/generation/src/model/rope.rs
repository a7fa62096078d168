//! Rotary position embeddings (Su et al. 2021, "RoFormer"), in the
//! half-split layout of Hugging Face's `rotate_half` (Llama, Qwen2: the first
//! and second halves of each head form the pairs, not interleaved neighbours).

use tch::{Device, Kind, Tensor};

/// Precomputed cos/sin tables, `[max_positions, head_dim]` f32. The sin
/// table's first half is negated, so that [`apply`] needs one `roll` where
/// `rotate_half` needs two slices, a negation and a concatenation.
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
        let sin = freqs.f_sin()?;
        let signed_sin = Tensor::f_cat(&[&sin.f_neg()?, &sin], -1)?;
        Ok(Self {
            cos: emb.f_cos()?.f_to_device(device)?,
            sin: signed_sin.f_to_device(device)?,
        })
    }

    /// cos and signed sin (first half negated) for `positions` (`[n]`
    /// i64), `[n, head_dim]` in `kind`, for [`apply`].
    pub fn at(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor), tch::TchError> {
        Ok((
            self.cos.f_index_select(0, positions)?.f_to_kind(kind)?,
            self.sin.f_index_select(0, positions)?.f_to_kind(kind)?,
        ))
    }
}

/// Rotates `x` (`[.., head_dim]`) by the angles whose cos and signed sin
/// ([`Rope::at`]) broadcast against it: `x·cos + rotate_half(x)·sin`, where
/// `rotate_half(x) = [−x₂, x₁]` equals `roll(x, d/2) = [x₂, x₁]` times the
/// sign folded into the table. Three ops (a decode step runs this once per
/// layer, on q and k together). Returns a contiguous tensor of `x`'s shape.
pub fn apply(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor, tch::TchError> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let rolled = x.f_roll([half].as_slice(), [-1i64].as_slice())?;
    x.f_mul(cos)?.f_addcmul(&rolled, signed_sin)
}
