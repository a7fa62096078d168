//! A projection `y = x·Wᵀ`: dense (the model's dtype), or weight-only int8.
//!
//! Int8 is symmetric per output channel (`scale = max|W_row| / 127`,
//! `q = round(W / scale)`), served by libtorch's `_weight_int8pack_mm` with
//! bf16 activations — the kernel gpt-fast and torchao use on CPU. A decode
//! step is bound by the bytes of weights it streams, and int8 streams a
//! quarter of f32's (measured on this CPU: the 9728×896 gate/up matrix 0.49
//! ms vs 0.84 ms in f32, the LM head 16 ms vs 26 ms). For many rows at once
//! (prefill) the int8 kernel is compute-bound, so prompts of more than
//! [`INT8_MAX_ROWS`] rows dequantise the weight instead.

use tch::{Kind, Tensor};

/// Largest row count served by the int8 kernel directly.
pub const INT8_MAX_ROWS: i64 = 8;

/// One projection's weight.
pub enum Linear {
    /// `[out, in]` in the model's dtype.
    Dense(Tensor),
    /// `[out, in]` int8 and `[out]` bf16 scales.
    Int8 {
        /// Quantised weight.
        weight: Tensor,
        /// Per-row scales.
        scales: Tensor,
    },
}

impl Linear {
    /// Quantises a dense `[out, in]` weight to int8 per output channel.
    pub fn quantize_int8(w: &Tensor) -> Result<Self, tch::TchError> {
        let wf = w.f_to_kind(Kind::Float)?;
        let scales = wf
            .f_abs()?
            .f_amax([1i64].as_slice(), true)?
            .f_clamp_min(1e-8)?
            .f_div_scalar(127.0)?;
        let weight = wf
            .f_div(&scales)?
            .f_round()?
            .f_clamp(-127.0, 127.0)?
            .f_to_kind(Kind::Int8)?
            .f_contiguous()?;
        let scales = scales.f_squeeze_dim(1)?.f_to_kind(Kind::BFloat16)?;
        Ok(Self::Int8 { weight, scales })
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        match self {
            Self::Dense(w) | Self::Int8 { weight: w, .. } => w.size()[0],
        }
    }

    /// `x·Wᵀ (+ bias)` for `x` of shape `[.., in]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, tch::TchError> {
        match self {
            Self::Dense(w) => x.f_linear(w, bias),
            Self::Int8 { weight, scales } => {
                let mut shape = x.size();
                let inner = shape.pop().unwrap_or(0);
                let rows: i64 = shape.iter().product();
                let x2 = x.f_reshape([rows, inner])?;
                let y = if rows <= INT8_MAX_ROWS {
                    x2.f_internal_weight_int8pack_mm(weight, scales)?
                } else {
                    let dense = weight
                        .f_to_kind(x.kind())?
                        .f_mul(&scales.f_unsqueeze(1)?.f_to_kind(x.kind())?)?;
                    x2.f_linear::<Tensor>(&dense, None)?
                };
                let y = match bias {
                    Some(b) => y.f_add(b)?,
                    None => y,
                };
                shape.push(self.out_features());
                y.f_reshape(shape.as_slice())
            }
        }
    }
}
