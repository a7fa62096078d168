//! A projection `y = x·Wᵀ`: dense (the model's dtype), weight-only int8 or
//! weight-only int4.
//!
//! - **Int8** is symmetric per output channel (`scale = max|W_row| / 127`,
//!   `q = round(W / scale)`), served by libtorch's `_weight_int8pack_mm` with
//!   bf16 activations — the kernel gpt-fast and torchao use on CPU.
//! - **Int4** is asymmetric per group of [`Linear::quantize_int4`]'s `group`
//!   input features, `W ≈ (q − 8)·scale + zero` with `q` in `0..=15` (the
//!   form of gpt-fast's `group_quantize_tensor`), scale and zero fitted by
//!   least squares over a few clipping ranges ([`fit_int4`]); packed by
//!   `_convert_weight_to_int4pack_for_cpu` and served by
//!   `_weight_int4pack_mm_for_cpu` (bf16 activations). It streams an eighth
//!   of f32's bytes per decode step, plus 4 bytes of scale and zero per group.
//!
//! A decode step is bound by the bytes of weights it streams. For many rows
//! at once (a long prefill) the int8 kernel is compute-bound and its time
//! grows with the rows, so more than [`INT8_MAX_ROWS`] rows dequantise the
//! weight instead (a fixed cost of about a weight's bf16 copy); the int4 kernel
//! serves every row count (its packed layout is private to libtorch), in
//! chunks of [`INT4_CHUNK_ROWS`] rows.

use tch::{Kind, Tensor};

/// Largest row count served by the int8 kernel directly. Measured on the
/// 2-core benchmark machine (bf16 activations): the kernel takes 0.48 ms
/// at 8 rows and 13.9 ms at 256 rows on a `[9728, 896]` weight, where
/// dequantising it and a bf16 GEMM take 11–15 ms at any row count; on the
/// `[151936, 896]` LM head, 8.5 ms at 8 rows against 190 ms dequantised. A
/// batched decode step (up to `max_batch_size` rows) therefore always runs
/// the kernel.
pub const INT8_MAX_ROWS: i64 = 256;

/// Rows per call of the int4 kernel (bounds its scratch memory).
pub const INT4_CHUNK_ROWS: i64 = 512;

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
    /// Packed 4-bit weight, `[out, in/2]` uint8 in libtorch's CPU layout.
    Int4 {
        /// The packed weight.
        packed: Tensor,
        /// `[in/group, out, 2]` bf16: each group's scale and zero.
        scales_zeros: Tensor,
        /// Input features per group (32, 64 or 128).
        group: i64,
        /// Output features.
        out: i64,
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

    /// Quantises a dense `[out, in]` weight to 4 bits in groups of `group`
    /// input features (see the module doc for the formula). Errors with
    /// [`tch::TchError::Shape`] when `in` is not a multiple of `group` or
    /// `group` is not 32, 64 or 128 (what the kernel accepts).
    pub fn quantize_int4(w: &Tensor, group: i64) -> Result<Self, tch::TchError> {
        let (codes, scales_zeros) = int4_codes(w, group)?;
        Self::from_int4_codes(&codes, scales_zeros)
    }

    /// An int4 projection from its 4-bit codes `[out, in]` (uint8, each in
    /// `0..=15`) and `[in/group, out, 2]` bf16 scales and zeros, as
    /// [`int4_codes`] returns them (and the quantised-weight cache,
    /// [`super::quantized`], stores them). Packing is a cheap reshuffle;
    /// the expensive part of quantising is the fit. Errors with
    /// [`tch::TchError::Shape`] when the shapes disagree.
    pub fn from_int4_codes(codes: &Tensor, scales_zeros: Tensor) -> Result<Self, tch::TchError> {
        let (out, inner, groups) = match (codes.size().as_slice(), scales_zeros.size().as_slice()) {
            ([o, i], [g, o2, 2]) if o == o2 && *g > 0 && i % g == 0 => (*o, *i, *g),
            (c, s) => {
                return Err(tch::TchError::Shape(format!(
                    "int4: codes {c:?} and scales/zeros {s:?} do not fit together"
                )));
            }
        };
        let packed = codes
            .f_to_kind(Kind::Int)?
            .f_contiguous()?
            .f_internal_convert_weight_to_int4pack_for_cpu(2)?;
        Ok(Self::Int4 {
            packed,
            scales_zeros,
            group: inner / groups,
            out,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        match self {
            Self::Dense(w) | Self::Int8 { weight: w, .. } => w.size()[0],
            Self::Int4 { out, .. } => *out,
        }
    }

    /// `x·Wᵀ (+ bias)` for `x` of shape `[.., in]`, in `x`'s dtype (bf16 for
    /// the quantised formats).
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, tch::TchError> {
        let Self::Dense(w) = self else {
            let mut shape = x.size();
            let inner = shape.pop().unwrap_or(0);
            let rows: i64 = shape.iter().product();
            let x2 = x.f_reshape([rows, inner])?;
            let y = self.forward_rows(&x2)?;
            let y = match bias {
                Some(b) => y.f_add(b)?,
                None => y,
            };
            shape.push(self.out_features());
            return y.f_reshape(shape.as_slice());
        };
        x.f_linear(w, bias)
    }

    /// A quantised projection of `x` `[rows, in]`.
    fn forward_rows(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let rows = x.size()[0];
        match self {
            Self::Dense(w) => x.f_linear::<Tensor>(w, None),
            Self::Int8 { weight, scales } if rows <= INT8_MAX_ROWS => {
                x.f_internal_weight_int8pack_mm(weight, scales)
            }
            Self::Int8 { weight, scales } => {
                let dense = weight
                    .f_to_kind(x.kind())?
                    .f_mul(&scales.f_unsqueeze(1)?.f_to_kind(x.kind())?)?;
                x.f_linear::<Tensor>(&dense, None)
            }
            Self::Int4 {
                packed,
                scales_zeros,
                group,
                ..
            } => {
                let run = |x: &Tensor| {
                    x.f_contiguous()?.f_internal_weight_int4pack_mm_for_cpu(
                        packed,
                        *group,
                        scales_zeros,
                    )
                };
                if rows <= INT4_CHUNK_ROWS {
                    return run(x);
                }
                let parts = x
                    .f_split(INT4_CHUNK_ROWS, 0)?
                    .iter()
                    .map(run)
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::f_cat(&parts, 0)
            }
        }
    }
}

/// Quantises a dense `[out, in]` weight to 4-bit codes in groups of `group`
/// input features: (codes `[out, in]` uint8 in `0..=15`, scales and zeros
/// `[in/group, out, 2]` bf16), the inputs of [`Linear::from_int4_codes`].
/// Errors with [`tch::TchError::Shape`] when `w` is not 2-D, `in` is not a
/// multiple of `group` or `group` is not 32, 64 or 128 (what the kernel
/// accepts).
pub fn int4_codes(w: &Tensor, group: i64) -> Result<(Tensor, Tensor), tch::TchError> {
    let (out, inner) = match w.size().as_slice() {
        [o, i] => (*o, *i),
        other => {
            return Err(tch::TchError::Shape(format!(
                "int4: weight of shape {other:?} is not 2-D"
            )));
        }
    };
    if ![32, 64, 128].contains(&group) || inner % group != 0 {
        return Err(tch::TchError::Shape(format!(
            "int4: {inner} input features are not a multiple of group {group} (32, 64 or 128)"
        )));
    }
    let groups = inner / group;
    let wg = w.f_to_kind(Kind::Float)?.f_reshape([out, groups, group])?;
    let (q, scales, zeros) = fit_int4(&wg)?;
    let codes = q
        .f_to_kind(Kind::Uint8)?
        .f_reshape([out, inner])?
        .f_contiguous()?;
    let scales_zeros = Tensor::f_cat(&[scales, zeros], 2)?
        .f_transpose(0, 1)?
        .f_contiguous()?;
    Ok((codes, scales_zeros))
}

/// Clipping ranges tried per group by [`fit_int4`]: (fraction of the group's
/// range kept, where the kept range sits: 0 = at the minimum, 1 = at the
/// maximum).
const INT4_RANGES: [(f64, f64); 9] = [
    (1.0, 0.0),
    (0.9, 0.0),
    (0.9, 0.5),
    (0.9, 1.0),
    (0.8, 0.0),
    (0.8, 0.5),
    (0.8, 1.0),
    (0.7, 0.5),
    (0.6, 0.5),
];

/// Fits 4-bit codes to `w` `[out, groups, group]` f32: for each clipping
/// range of [`INT4_RANGES`], codes `q = round((w − lo) / s)` in `0..=15`,
/// then the least-squares scale and offset for those codes (`w ≈ s'·q +
/// m'`, a linear regression per group), keeping per group the candidate of
/// least squared error after rounding scale and zero to bf16. This is the
/// search of llama.cpp's `make_qkx2_quants` (ggml-quants.c) in tensor form;
/// on this model it halves the squared weight error of plain min–max
/// scaling. Returns (codes f32 `[out, groups, group]`, scales and zeros
/// bf16 `[out, groups, 1]` each, in the kernel's `(q − 8)·s + zero` form).
fn fit_int4(w: &Tensor) -> Result<(Tensor, Tensor, Tensor), tch::TchError> {
    let dim = [2i64];
    let max = w.f_amax(dim.as_slice(), true)?;
    let min = w.f_amin(dim.as_slice(), true)?;
    let range = max.f_sub(&min)?;
    let w_mean = w.f_mean_dim(dim.as_slice(), true, Kind::Float)?;
    let mut best: Option<(Tensor, Tensor, Tensor, Tensor)> = None;
    for (keep, at) in INT4_RANGES {
        let kept = range.f_mul_scalar(keep)?;
        let lo = min.f_add(&range.f_sub(&kept)?.f_mul_scalar(at)?)?;
        let s = kept.f_clamp_min(1e-6)?.f_div_scalar(15.0)?;
        let q = w.f_sub(&lo)?.f_div(&s)?.f_round()?.f_clamp(0.0, 15.0)?;
        let q_mean = q.f_mean_dim(dim.as_slice(), true, Kind::Float)?;
        let qc = q.f_sub(&q_mean)?;
        let cov =
            qc.f_mul(&w.f_sub(&w_mean)?)?
                .f_sum_dim_intlist(dim.as_slice(), true, Kind::Float)?;
        let var = qc
            .f_square()?
            .f_sum_dim_intlist(dim.as_slice(), true, Kind::Float)?;
        let fitted = cov.f_div(&var.f_clamp_min(1e-12)?)?;
        let scale = fitted.f_where_self(&var.f_gt(0.0)?, &s)?;
        let offset = w_mean.f_sub(&scale.f_mul(&q_mean)?)?;
        let scale = scale.f_to_kind(Kind::BFloat16)?;
        let zero = offset
            .f_add(&scale.f_to_kind(Kind::Float)?.f_mul_scalar(8.0)?)?
            .f_to_kind(Kind::BFloat16)?;
        let approx = q
            .f_sub_scalar(8.0)?
            .f_mul(&scale.f_to_kind(Kind::Float)?)?
            .f_add(&zero.f_to_kind(Kind::Float)?)?;
        let err =
            approx
                .f_sub(w)?
                .f_square()?
                .f_sum_dim_intlist(dim.as_slice(), true, Kind::Float)?;
        best = Some(match best {
            None => (q, scale, zero, err),
            Some((bq, bs, bz, be)) => {
                let better = err.f_lt_tensor(&be)?;
                (
                    q.f_where_self(&better, &bq)?,
                    scale.f_where_self(&better, &bs)?,
                    zero.f_where_self(&better, &bz)?,
                    err.f_where_self(&better, &be)?,
                )
            }
        });
    }
    match best {
        Some((q, scale, zero, _)) => Ok((q, scale, zero)),
        None => Err(tch::TchError::Shape("int4: no clipping range".into())),
    }
}
