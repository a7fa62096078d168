//! The forward pass of a Llama/Qwen2-family decoder, written against
//! `transformers`' `modeling_qwen2.py` / `modeling_llama.py`:
//!
//! `x = embed(ids)`; per layer `x += o_proj(attn(rope(q), rope(k), v))` on
//! `rms_norm(x)`, then `x += down(silu(gate(h)) · up(h))` on `rms_norm(x)`;
//! logits `= lm_head(rms_norm(x))`. Attention is grouped-query (each key/value
//! head serves `heads / kv_heads` query heads); Qwen2 adds q/k/v biases.
//!
//! Two entry points over the paged KV cache ([`crate::kv`]):
//! [`Decoder::forward`] runs a run of one sequence's tokens after the
//! positions already cached (a whole prompt, the part after a cached prefix,
//! or one chunk of a long prompt); [`Decoder::decode_paged`] advances many
//! sequences by one token each in one batched pass — every weight matrix is
//! read once per step for the whole batch, which is what makes continuous
//! batching pay on a memory-bound CPU. [`Decoder::prefill`] and
//! [`Decoder::decode`] wrap them for one sequence in its own [`KvCache`].
//! q/k/v and gate/up are fused into one matrix each at load.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{
    KvCache, Linear, ModelConfig, Precision,
    quantized::{self, Int4Cache},
    rope::Rope,
    weights::Weights,
};
use crate::{
    GenerationError,
    kv::{KvPool, Slots},
};

/// One decoder layer's weights, `[out, in]`.
struct Layer {
    input_norm: Tensor,
    /// q, k and v projections stacked: `[(heads + 2·kv_heads)·head_dim, hidden]`.
    qkv: Linear,
    qkv_bias: Option<Tensor>,
    o_proj: Linear,
    post_norm: Tensor,
    /// gate and up projections stacked: `[2·intermediate, hidden]`.
    gate_up: Linear,
    down: Linear,
}

/// A loaded model, ready to run.
pub struct Decoder {
    config: ModelConfig,
    device: Device,
    kind: Kind,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    precision: Precision,
}

impl Decoder {
    /// Loads `config.json` and the safetensors of `dir` onto `device` in
    /// `kind`. Errors with [`GenerationError::Load`] for a missing file,
    /// tensor or an unsupported architecture.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, GenerationError> {
        Self::load_with(dir, device, kind.into())
    }

    /// [`Decoder::load`] in any [`Precision`]; int8 weights are quantised
    /// at load (see [`Linear::quantize_int8`]).
    pub fn load_with(
        dir: &Path,
        device: Device,
        precision: Precision,
    ) -> Result<Self, GenerationError> {
        let kind = precision.kind;
        // Int4 codes come from the quantised-weight cache when it has them
        // (seconds), and are fitted and cached otherwise (minutes).
        let mut int4 = match quantized::int4_group(precision.weights) {
            Some(group) => Some(Int4Cache::open(dir, group)?),
            None => None,
        };
        let mut linear = |name: String,
                          dense: &mut dyn FnMut() -> Result<Tensor, GenerationError>|
         -> Result<Linear, GenerationError> {
            match int4.as_mut() {
                Some(cache) => cache.linear(&name, dense),
                None => Ok(precision.linear(dense()?)?),
            }
        };
        let load_err = |reason: String| GenerationError::Load {
            path: dir.display().to_string(),
            reason,
        };
        let raw = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| load_err(format!("config.json: {e}; run `moltbot models prepare`")))?;
        let config: ModelConfig =
            serde_json::from_str(&raw).map_err(|e| load_err(format!("config.json: {e}")))?;
        config.validate().map_err(load_err)?;
        let read = std::time::Instant::now();
        let mut w = Weights::load(dir, device, kind)?;
        tracing::debug!(seconds = read.elapsed().as_secs_f64(), "checkpoint read");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            let attn = |n: &str| format!("{p}self_attn.{n}");
            let qkv_bias = match (
                w.take_optional(&attn("q_proj.bias"))?,
                w.take_optional(&attn("k_proj.bias"))?,
                w.take_optional(&attn("v_proj.bias"))?,
            ) {
                (Some(qb), Some(kb), Some(vb)) => Some(Tensor::f_cat(&[qb, kb, vb], 0)?),
                _ => None,
            };
            // Each projection's dense weight is built only when the
            // quantised-weight cache does not have it; on a hit the source
            // tensors are dropped unread.
            let qkv = linear(p.clone() + "self_attn.qkv", &mut || {
                let q = w.take(&attn("q_proj.weight"))?;
                let k = w.take(&attn("k_proj.weight"))?;
                let v = w.take(&attn("v_proj.weight"))?;
                Ok(Tensor::f_cat(&[q, k, v], 0)?)
            })?;
            let o_proj = linear(attn("o_proj"), &mut || w.take(&attn("o_proj.weight")))?;
            let gate_up = linear(format!("{p}mlp.gate_up"), &mut || {
                let gate = w.take(&format!("{p}mlp.gate_proj.weight"))?;
                let up = w.take(&format!("{p}mlp.up_proj.weight"))?;
                Ok(Tensor::f_cat(&[gate, up], 0)?)
            })?;
            let down = linear(format!("{p}mlp.down_proj"), &mut || {
                w.take(&format!("{p}mlp.down_proj.weight"))
            })?;
            for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                w.discard(&attn(&format!("{name}.weight")));
            }
            for name in ["gate_proj", "up_proj", "down_proj"] {
                w.discard(&format!("{p}mlp.{name}.weight"));
            }
            layers.push(Layer {
                input_norm: w.take(&format!("{p}input_layernorm.weight"))?,
                qkv,
                qkv_bias,
                o_proj,
                post_norm: w.take(&format!("{p}post_attention_layernorm.weight"))?,
                gate_up,
                down,
            });
        }
        if let Some(cache) = int4 {
            cache.finish();
        }
        let embed = w.take("model.embed_tokens.weight")?;
        let lm_head = precision.head(match w.take_optional("lm_head.weight")? {
            Some(head) if !config.tie_word_embeddings => head,
            _ => embed.shallow_clone(),
        })?;
        let rope = Rope::new(
            config.head_dim(),
            config.max_position_embeddings,
            config.rope_theta,
            device,
        )?;
        Ok(Self {
            norm: w.take("model.norm.weight")?,
            config,
            device,
            kind,
            embed,
            layers,
            lm_head,
            rope,
            precision,
        })
    }

    /// The numeric format.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The weights' dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// An empty KV cache for one sequence of up to `capacity` tokens on this
    /// model's device.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, GenerationError> {
        Ok(KvCache::new(self.new_pool(capacity)?))
    }

    /// A KV pool of `slots` token slots (the paged cache's memory) on this
    /// model's device, in the model's dtype.
    pub fn new_pool(&self, slots: usize) -> Result<KvPool, GenerationError> {
        Ok(KvPool::new(
            self.config.num_hidden_layers,
            self.config.kv_heads(),
            self.config.head_dim(),
            slots,
            self.kind,
            self.device,
        )?)
    }

    /// Bytes of one token's keys and values over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.num_hidden_layers
            * self.config.kv_heads()
            * self.config.head_dim()
            * self.kind.elt_size_in_bytes()
    }

    /// RMSNorm (Zhang & Sennrich 2019) as `Qwen2RMSNorm`, through
    /// libtorch's fused `rms_norm` (one op instead of six; a decode step runs
    /// 49 of them). It accumulates in f32 as `Qwen2RMSNorm` does; in half
    /// precision it rounds once where transformers rounds twice (before and
    /// after scaling by `weight`).
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor, tch::TchError> {
        let hidden = [self.config.hidden_size as i64];
        x.f_rms_norm(hidden.as_slice(), Some(weight), self.config.rms_norm_eps)
    }

    /// q, k, v of `h` (`[b, n, hidden]`): q `[b, n, heads, d]`, k and v
    /// `[b, n, kv_heads, d]` (views of the fused projection; callers
    /// transpose as they need), with RoPE applied to q and k in one pass
    /// (`cos`/`sin` broadcastable to `[b, n, 1, d]`).
    fn qkv(
        &self,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), tch::TchError> {
        let (b, n) = (h.size()[0], h.size()[1]);
        let d = self.config.head_dim() as i64;
        let heads = self.config.num_attention_heads as i64;
        let kv = self.config.kv_heads() as i64;
        let qkv = layer.qkv.forward(h, layer.qkv_bias.as_ref())?;
        let qk = qkv
            .f_narrow(-1, 0, (heads + kv) * d)?
            .f_view([b, n, heads + kv, d])?;
        let qk = super::rope::apply(&qk, cos, sin)?;
        let q = qk.f_narrow(2, 0, heads)?;
        let k = qk.f_narrow(2, heads, kv)?;
        let v = qkv
            .f_narrow(-1, (heads + kv) * d, kv * d)?
            .f_view([b, n, kv, d])?;
        Ok((q, k, v))
    }

    /// The MLP half of a layer, with its residual: `x + down(silu(gate)·up)`.
    fn mlp(&self, layer: &Layer, mut x: Tensor) -> Result<Tensor, tch::TchError> {
        let h = self.rms_norm(&x, &layer.post_norm)?;
        let gu = layer.gate_up.forward(&h, None)?;
        let inter = self.config.intermediate_size as i64;
        let gate = gu.f_narrow(-1, 0, inter)?;
        let up = gu.f_narrow(-1, inter, inter)?;
        let act = gate.f_silu()?.f_mul(&up)?;
        let _ = x.f_add_(&layer.down.forward(&act, None)?)?;
        Ok(x)
    }

    /// Runs `ids` (one prompt, positions `0..n`) through the model, filling
    /// the empty `cache`. Returns logits `[n, vocab]` f32 for every position
    /// when `all_logits`, else `[1, vocab]` for the last one only.
    ///
    /// Errors: out of memory, or a cache that is not empty or too small.
    pub fn prefill(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor, GenerationError> {
        if !cache.is_empty() || cache.capacity() < ids.len() || ids.is_empty() {
            return Err(GenerationError::InvalidArgument(format!(
                "prefill of {} tokens into a cache holding {} of {}",
                ids.len(),
                cache.len(),
                cache.capacity()
            )));
        }
        let slots: Vec<i64> = (0..ids.len() as i64).collect();
        let logits = self.forward(ids, 0, cache.pool_mut(), &slots, all_logits)?;
        cache.advance(ids.len());
        Ok(logits)
    }

    /// Appends `token` to the single sequence of `cache` and returns the
    /// next token's logits `[1, vocab]` f32. Errors: out of memory or a
    /// full cache.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Tensor, GenerationError> {
        if cache.len() >= cache.capacity() {
            return Err(GenerationError::InvalidArgument(format!(
                "KV cache full at {} tokens",
                cache.capacity()
            )));
        }
        let slots: Vec<i64> = (0..=cache.len() as i64).collect();
        let logits = self.decode_paged(&[token], cache.pool_mut(), &[&slots])?;
        cache.advance(1);
        Ok(logits)
    }

    /// Runs `ids` at positions `start..start + n` of one sequence whose
    /// positions `0..start` are already in `pool`: writes their keys and
    /// values at `slots[start..]` and attends over `slots[..start + n]`
    /// (causal: position `start + i` sees `0..=start + i`). This is prefill
    /// of a whole prompt (`start = 0`), of the part after a cached prefix,
    /// or of one chunk of a long prompt. Returns logits `[n, vocab]` f32
    /// when `all_logits`, else `[1, vocab]` for the last position.
    ///
    /// Errors: out of memory, `ids` empty, or `slots` not of length
    /// `start + n`.
    pub fn forward(
        &self,
        ids: &[u32],
        start: usize,
        pool: &mut KvPool,
        slots: &[i64],
        all_logits: bool,
    ) -> Result<Tensor, GenerationError> {
        if ids.is_empty() || slots.len() != start + ids.len() {
            return Err(GenerationError::InvalidArgument(format!(
                "forward of {} tokens after {start} with {} slots",
                ids.len(),
                slots.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        let n = ids.len() as i64;
        let total = slots.len() as i64;
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::f_from_slice(&ids)?.f_to_device(self.device)?;
        let positions = Tensor::f_arange_start(start as i64, total, (Kind::Int64, self.device))?;
        let (cos, sin) = self.rope.at(&positions, self.kind)?;
        let (cos, sin) = (cos.f_view([1, n, 1, -1])?, sin.f_view([1, n, 1, -1])?);
        let group = (self.config.num_attention_heads / self.config.kv_heads()) as i64;
        let write = Slots::of(&slots[start..], self.device)?;
        // After a cached prefix (start > 0), attention reads every position
        // back from the pool, and position start+i sees keys 0..=start+i: a
        // bool mask (true = attend), since SDPA's `is_causal` aligns the
        // triangle top-left, right only when start = 0.
        let prefix = if start > 0 {
            let keys = Tensor::f_arange(total, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
            let queries = positions.f_unsqueeze(1)?;
            Some((Slots::of(slots, self.device)?, keys.f_le_tensor(&queries)?))
        } else {
            None
        };
        let mut x = self.embed.f_index_select(0, &ids)?.f_unsqueeze(0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.input_norm)?;
            let (q, k, v) = self.qkv(layer, &h, &cos, &sin)?;
            // [1, n, kv, d] → [kv, n, d], the pool's layout.
            let (k, v) = (k.f_squeeze_dim(0)?, v.f_squeeze_dim(0)?);
            let (k, v) = (k.f_transpose(0, 1)?, v.f_transpose(0, 1)?);
            pool.write(i, &write, &k, &v)?;
            let q = q.f_transpose(1, 2)?;
            let (k, v) = match &prefix {
                Some((read, _)) => pool.read(i, read)?,
                None => (k.f_unsqueeze(0)?, v.f_unsqueeze(0)?),
            };
            let (k, v) = if group > 1 {
                (
                    k.f_repeat_interleave_self_int(group, 1, None)?,
                    v.f_repeat_interleave_self_int(group, 1, None)?,
                )
            } else {
                (k, v)
            };
            let attn = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                prefix.as_ref().map(|(_, mask)| mask),
                0.0,
                prefix.is_none(),
                None,
                false,
            )?;
            let attn = attn.f_transpose(1, 2)?.f_reshape([1, n, -1])?;
            let _ = x.f_add_(&layer.o_proj.forward(&attn, None)?)?;
            x = self.mlp(layer, x)?;
        }
        let x = if all_logits {
            x
        } else {
            x.f_narrow(1, n - 1, 1)?
        };
        let x = self.rms_norm(&x, &self.norm)?;
        let logits = self.lm_head.forward(&x, None)?;
        Ok(logits.f_squeeze_dim(0)?.f_to_kind(Kind::Float)?)
    }

    /// Advances every sequence by one token in one batched pass: sequence
    /// `i` feeds `tokens[i]` at position `slots[i].len() − 1`, writing its
    /// key and value at the last of `slots[i]` and attending over all of
    /// them. Returns logits `[batch, vocab]` f32 for each next token.
    ///
    /// Everything runs batched, attention included: each layer gathers every
    /// sequence's keys and values in one `index_select` into `[batch,
    /// kv_heads, L, d]` (L the longest sequence; shorter ones padded and
    /// masked, see [`DecodeReads`]) for one SDPA call, with the query heads
    /// of each key/value head folded into `[batch, kv_heads, group, d]` so
    /// grouped-query attention needs no copy of the keys. A step's op count
    /// does not grow with the batch.
    ///
    /// Errors: out of memory, mismatched lengths, or an empty slot list.
    pub fn decode_paged(
        &self,
        tokens: &[u32],
        pool: &mut KvPool,
        slots: &[&[i64]],
    ) -> Result<Tensor, GenerationError> {
        if tokens.len() != slots.len() || tokens.is_empty() || slots.iter().any(|s| s.is_empty()) {
            return Err(GenerationError::InvalidArgument(format!(
                "decode of {} tokens for {} sequences",
                tokens.len(),
                slots.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        let b = tokens.len() as i64;
        let d = self.config.head_dim() as i64;
        let kv = self.config.kv_heads() as i64;
        let group = self.config.num_attention_heads as i64 / kv;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::f_from_slice(&ids)?.f_to_device(self.device)?;
        let pos: Vec<i64> = slots.iter().map(|s| s.len() as i64 - 1).collect();
        let positions = Tensor::f_from_slice(&pos)?.f_to_device(self.device)?;
        let (cos, sin) = self.rope.at(&positions, self.kind)?;
        let (cos, sin) = (cos.f_view([b, 1, 1, d])?, sin.f_view([b, 1, 1, d])?);
        let last: Vec<i64> = slots.iter().map(|s| s[s.len() - 1]).collect();
        let write = Slots::of(&last, self.device)?;
        let reads = DecodeReads::new(slots, self.device)?;
        let mut x = self.embed.f_index_select(0, &ids)?.f_view([b, 1, -1])?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.input_norm)?;
            let (q, k, v) = self.qkv(layer, &h, &cos, &sin)?;
            // [b, 1, kv, d] → [kv, b, d]: one write for the whole batch.
            let k = k.f_squeeze_dim(1)?.f_transpose(0, 1)?;
            let v = v.f_squeeze_dim(1)?.f_transpose(0, 1)?;
            pool.write(l, &write, &k, &v)?;
            let (keys, values) = reads.read(pool, l)?;
            let q = q.f_reshape([b, kv, group, d])?;
            let o = Tensor::f_scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                reads.mask.as_ref(),
                0.0,
                false,
                None,
                false,
            )?;
            let _ = x.f_add_(&layer.o_proj.forward(&o.f_reshape([b, 1, -1])?, None)?)?;
            x = self.mlp(layer, x)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        let logits = self.lm_head.forward(&x, None)?;
        Ok(logits.f_view([b, -1])?.f_to_kind(Kind::Float)?)
    }
}

/// Where a decode step's attention reads keys and values: one sequence's
/// slots as they are (a view when consecutive), or every sequence's slots
/// in one gather of `b·L` slots, each sequence padded to the longest length
/// `L` with its own first slot and the padding masked out.
struct DecodeReads {
    slots: Slots,
    /// `[b, 1, 1, L]` bool, true = attend; `None` when no row is padded.
    mask: Option<Tensor>,
    batch: i64,
    len: i64,
}

impl DecodeReads {
    fn new(slots: &[&[i64]], device: Device) -> Result<Self, tch::TchError> {
        let len = slots.iter().map(|s| s.len()).max().unwrap_or(0);
        if let [one] = slots {
            return Ok(Self {
                slots: Slots::of(one, device)?,
                mask: None,
                batch: 1,
                len: len as i64,
            });
        }
        let mut index = Vec::with_capacity(slots.len() * len);
        let mut attend = Vec::with_capacity(slots.len() * len);
        for s in slots {
            let pad = len - s.len();
            index.extend_from_slice(s);
            index.extend(std::iter::repeat_n(s[0], pad));
            attend.extend(std::iter::repeat_n(true, s.len()));
            attend.extend(std::iter::repeat_n(false, pad));
        }
        let batch = slots.len() as i64;
        let mask = if attend.iter().all(|&a| a) {
            None
        } else {
            Some(
                Tensor::f_from_slice(&attend)?
                    .f_to_device(device)?
                    .f_view([batch, 1, 1, len as i64])?,
            )
        };
        Ok(Self {
            slots: Slots::Indexed(Tensor::f_from_slice(&index)?.f_to_device(device)?),
            mask,
            batch,
            len: len as i64,
        })
    }

    /// Keys and values of `layer`, `[b, kv_heads, L, d]`.
    fn read(&self, pool: &KvPool, layer: usize) -> Result<(Tensor, Tensor), tch::TchError> {
        let (k, v) = pool.read(layer, &self.slots)?;
        if self.batch == 1 {
            return Ok((k, v));
        }
        // [1, kv, b·L, d] → [kv, b, L, d] → [b, kv, L, d] (a strided view).
        let unfold = |t: Tensor| -> Result<Tensor, tch::TchError> {
            let (kv, d) = (t.size()[1], t.size()[3]);
            t.f_view([kv, self.batch, self.len, d])?.f_transpose(0, 1)
        };
        Ok((unfold(k)?, unfold(v)?))
    }
}
