//! The BERT encoder (Devlin et al. 2019) as `transformers`' `BertModel`:
//! word + position + token-type embeddings and LayerNorm, then per layer
//! post-norm self-attention and a GELU MLP; followed by sentence-transformers'
//! mean pooling and L2 normalisation.

use std::{collections::HashMap, path::Path};

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::EncoderError;

/// `config.json` fields of a BERT checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Width of the hidden states (= embedding dimension).
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Longest input in tokens.
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    /// `x W^T + b` in the weights' dtype (`x` is cast to it): `[t, in]` →
    /// `[t, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        x.f_to_kind(self.w.kind())?.f_linear(&self.w, Some(&self.b))
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Layer {
    /// q, k, v fused for inference; rebuilt from `parts` on every forward
    /// pass while training (so gradients reach the separate variables).
    qkv: Dense,
    parts: Option<[Dense; 3]>,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

/// Loaded weights.
pub struct Bert {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

impl Bert {
    /// Loads `model.safetensors` (names as `BertModel`, with or without a
    /// `bert.` prefix), every weight registered as a trainable variable of
    /// `vars` under its checkpoint name when given (so `VarStore::save`
    /// writes a checkpoint this reads back). The dense layers' weights are
    /// kept in `dense_kind` (`Kind::Float`, or `Kind::BFloat16` for mixed
    /// precision; trainable variables are always f32). Errors with
    /// [`EncoderError::Load`].
    pub fn load_into(
        config: &BertConfig,
        file: &Path,
        device: Device,
        vars: Option<&tch::nn::Path>,
        dense_kind: Kind,
    ) -> Result<Self, EncoderError> {
        if vars.is_some() && dense_kind != Kind::Float {
            return Err(EncoderError::Load(
                "trainable weights must be f32 (mixed precision is for inference)".into(),
            ));
        }
        let mut tensors: HashMap<String, Tensor> = Tensor::read_safetensors(file)
            .map_err(|e| EncoderError::Load(format!("{}: {e}", file.display())))?
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("bert.").map_or(k.clone(), str::to_owned), v))
            .collect();
        let mut take = |name: &str| -> Result<Tensor, EncoderError> {
            let t = tensors.remove(name).ok_or_else(|| {
                EncoderError::Load(format!("{}: tensor {name} missing", file.display()))
            })?;
            let t = t.f_to_kind(Kind::Float)?.f_to_device(device)?;
            match vars {
                Some(root) => {
                    // nn paths separate segments with '.': rebuild the name.
                    let mut segments: Vec<&str> = name.split('.').collect();
                    let last = segments.pop().unwrap_or(name);
                    let path = segments.iter().fold(root.clone(), |p, s| &p / *s);
                    Ok(path.f_var_copy(last, &t)?)
                }
                None => Ok(t),
            }
        };
        let mut norm = |p: &str| -> Result<Norm, EncoderError> {
            Ok(Norm {
                w: take(&format!("{p}.weight"))?,
                b: take(&format!("{p}.bias"))?,
            })
        };
        let emb_norm = norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut dense = |n: &str| -> Result<Dense, EncoderError> {
                Ok(Dense {
                    w: take(&format!("{p}.{n}.weight"))?,
                    b: take(&format!("{p}.{n}.bias"))?,
                })
            };
            let q = dense("attention.self.query")?;
            let k = dense("attention.self.key")?;
            let v = dense("attention.self.value")?;
            let cast = |d: Dense| -> Result<Dense, EncoderError> {
                Ok(Dense {
                    w: d.w.f_to_kind(dense_kind)?,
                    b: d.b.f_to_kind(dense_kind)?,
                })
            };
            let qkv = cast(Dense {
                w: Tensor::f_cat(&[&q.w, &k.w, &v.w], 0)?,
                b: Tensor::f_cat(&[&q.b, &k.b, &v.b], 0)?,
            })?;
            let parts = vars.is_some().then_some([q, k, v]);
            let attn_out = cast(dense("attention.output.dense")?)?;
            let inter = cast(dense("intermediate.dense")?)?;
            let out = cast(dense("output.dense")?)?;
            let mut norm = |n: &str| -> Result<Norm, EncoderError> {
                Ok(Norm {
                    w: take(&format!("{p}.{n}.weight"))?,
                    b: take(&format!("{p}.{n}.bias"))?,
                })
            };
            layers.push(Layer {
                qkv,
                parts,
                attn_out,
                attn_norm: norm("attention.output.LayerNorm")?,
                inter,
                out,
                out_norm: norm("output.LayerNorm")?,
            });
        }
        Ok(Self {
            word: take("embeddings.word_embeddings.weight")?,
            position: take("embeddings.position_embeddings.weight")?,
            token_type: take("embeddings.token_type_embeddings.weight")?,
            emb_norm,
            layers,
            config: config.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    fn layer_norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor, tch::TchError> {
        x.f_layer_norm(
            [self.config.hidden_size as i64].as_slice(),
            Some(&n.w),
            Some(&n.b),
            self.config.layer_norm_eps,
            false,
        )
    }

    /// Sentence embeddings of `ids`/`mask` (`[batch, len]` i64, mask 1 for
    /// real tokens): `[batch, hidden]` f32, mean-pooled over the mask and
    /// L2-normalised. No gradients.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, tch::TchError> {
        let _guard = tch::no_grad_guard();
        self.forward(ids, mask)
    }

    /// [`Bert::embed`] with gradients, for fine-tuning.
    ///
    /// With bf16 dense weights (mixed precision, as
    /// `torch.autocast("cpu", torch.bfloat16)`): every dense layer, the
    /// GELU and attention run in bf16; the residual stream, LayerNorm and
    /// pooling stay f32 (the dense outputs are promoted when added to it).
    ///
    /// Padding costs nothing outside attention: the `t` real tokens of the
    /// batch are packed into one `[t, hidden]` matrix for the embeddings,
    /// every dense layer, LayerNorm and GELU (as TGI / text-embeddings-
    /// inference do with variable-length batches), and only scattered into
    /// `[batch, len, 3·hidden]` for the attention scores. Pooling is a
    /// per-sentence `index_add` over the packed rows.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, tch::TchError> {
        let (b, l) = (ids.size()[0], ids.size()[1]);
        let h = self.config.num_attention_heads as i64;
        let width = self.config.hidden_size as i64;
        let d = width / h;
        let device = ids.device();
        // Real (non-padding) positions: [b, l] booleans.
        let real = mask.f_ne(0)?;
        let lengths = real.f_sum_dim_intlist(1, false, Kind::Int64)?;
        let tokens = lengths.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        // Row indices (into the `b·l` padded positions) of the real tokens;
        // `None` when nothing is padding.
        let keep = if tokens < b * l {
            Some(real.f_reshape([b * l])?.f_nonzero()?.f_squeeze_dim(1)?)
        } else {
            None
        };
        let pack = |x: &Tensor| -> Result<Tensor, tch::TchError> {
            let rows = x.f_reshape([b * l, -1])?;
            match &keep {
                Some(k) => rows.f_index_select(0, k),
                None => Ok(rows),
            }
        };
        let unpack = |x: &Tensor| -> Result<Tensor, tch::TchError> {
            let w = x.size()[1];
            match &keep {
                Some(k) => Tensor::f_zeros([b * l, w], (x.kind(), device))?
                    .f_index_copy(0, k, x)?
                    .f_view([b, l, w]),
                None => x.f_view([b, l, w]),
            }
        };
        let positions = Tensor::f_arange(l, (Kind::Int64, device))?.f_repeat([b])?;
        // Sentence of every padded position: [b·l].
        let sentence = Tensor::f_arange(b, (Kind::Int64, device))?
            .f_unsqueeze(1)?
            .f_expand([b, l], false)?
            .f_reshape([b * l])?;
        let mut x = Tensor::f_embedding(&self.word, &pack(ids)?.f_view([-1])?, 0, false, false)?
            .f_add(
                &self
                    .position
                    .f_index_select(0, &pack(&positions)?.f_view([-1])?)?,
            )?
            .f_add(&self.token_type.f_select(0, 0)?)?;
        x = self.layer_norm(&x, &self.emb_norm)?;
        // Keys that are padding get no attention: [b, 1, 1, l] booleans;
        // without padding no mask at all, which lets SDPA take its fused
        // (flash) CPU kernel instead of the masked math path.
        let attend = match &keep {
            Some(_) => Some(real.f_view([b, 1, 1, l])?),
            None => None,
        };
        for layer in &self.layers {
            let qkv = match &layer.parts {
                Some([q, k, v]) => x.f_linear(
                    &Tensor::f_cat(&[&q.w, &k.w, &v.w], 0)?,
                    Some(&Tensor::f_cat(&[&q.b, &k.b, &v.b], 0)?),
                )?,
                None => layer.qkv.forward(&x)?,
            };
            let parts = unpack(&qkv)?.f_split(width, -1)?;
            let heads = |t: &Tensor| t.f_view([b, l, h, d])?.f_transpose(1, 2);
            let ctx = Tensor::f_scaled_dot_product_attention(
                &heads(&parts[0])?,
                &heads(&parts[1])?,
                &heads(&parts[2])?,
                attend.as_ref(),
                0.0,
                false,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_reshape([b, l, width])?;
            let ctx = pack(&ctx)?;
            x = self.layer_norm(&layer.attn_out.forward(&ctx)?.f_add(&x)?, &layer.attn_norm)?;
            let inter = layer.inter.forward(&x)?.f_gelu("none")?;
            x = self.layer_norm(&layer.out.forward(&inter)?.f_add(&x)?, &layer.out_norm)?;
        }
        // Mean over each sentence's real tokens.
        let summed = Tensor::f_zeros([b, width], (x.kind(), device))?.f_index_add(
            0,
            &pack(&sentence)?.f_view([-1])?,
            &x,
        )?;
        let mean = summed.f_div(
            &lengths
                .f_to_kind(x.kind())?
                .f_clamp_min(1e-9)?
                .f_unsqueeze(-1)?,
        )?;
        let norm = mean
            .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
            .f_clamp_min(1e-12)?;
        mean.f_div(&norm)
    }
}
