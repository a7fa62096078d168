//! A trained intent head: an optional GELU hidden layer over the sentence
//! embedding, then two softmax classifiers — intents (with an `oos` class)
//! and domains — and the out-of-scope decision rule chosen on validation
//! data (`crate::train::rule`: `oos` wins, the best in-scope intent's
//! probability is below `threshold`, the text's nearest in-scope training
//! utterance is less similar than `knn_threshold`, or — the cascade — that
//! similarity is under `base_knn.gate` and the base encoder's nearest
//! in-scope utterance is less similar than `base_knn.threshold`). The
//! reported domain is hierarchical: the mean of the domain head's
//! probability and the intent head's mass within the domain.
//!
//! On disk (written by `moltbot-understanding train`): `head.safetensors`
//! (`hidden.weight` `[h, d]` + `hidden.bias` optional; `intent.weight`
//! `[intents, h|d]`, `intent.bias`, `domain.weight` `[domains, h|d]`,
//! `domain.bias`; f32), `labels.json` ([`Labels`]) and, with the
//! nearest-neighbour rule, `knn.safetensors` (`embeddings` `[n, d]` f32: the
//! in-scope training utterances in the fine-tuned encoder's space) and with
//! the cascade `base_knn.safetensors` (the same utterances, base encoder).

use std::{collections::HashMap, path::Path};

use moltbot_encoder::Embedded;
use moltbot_proto::understanding::v1 as pb;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::UnderstandingError;

/// `labels.json`: label names in logit order and the decision rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Labels {
    /// Identifier reported in every classification.
    pub model_id: String,
    /// Encoder the head was trained on (its directory name).
    pub encoder: String,
    /// Intent names in logit order; includes `oos_label`.
    pub intents: Vec<String>,
    /// The out-of-scope class.
    pub oos_label: String,
    /// Domain names in logit order.
    pub domains: Vec<String>,
    /// Domain of every in-scope intent.
    pub intent_domain: HashMap<String, String>,
    /// Smallest in-scope probability accepted as in scope.
    pub threshold: f32,
    /// Smallest cosine similarity to the nearest in-scope training utterance
    /// (`knn.safetensors`) accepted as in scope; `None`: rule off.
    #[serde(default)]
    pub knn_threshold: Option<f32>,
    /// The cascade's second opinion from the base encoder; `None`: off.
    #[serde(default)]
    pub base_knn: Option<BaseKnnRule>,
}

/// The cascade of the out-of-scope rule (`labels.json` `base_knn`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BaseKnnRule {
    /// Texts whose fine-tuned nearest-neighbour similarity is below this
    /// are embedded by the base encoder too.
    pub gate: f32,
    /// Such a text is out of scope when its nearest in-scope training
    /// utterance in the base space is less similar than this.
    pub threshold: f32,
}

/// A classification before the cascade.
#[derive(Debug, Clone)]
pub struct Classified {
    /// The answer as it stands.
    pub classification: pb::Classification,
    /// Whether the base encoder must give its second opinion
    /// ([`IntentHead::second_opinion`]) before the answer is final.
    pub needs_base: bool,
}

/// In-scope training embeddings for the nearest-neighbour rule: `rows` unit
/// vectors of the encoder's dimension, row-major f32.
#[derive(Debug, Clone)]
pub struct Neighbours {
    vectors: Vec<f32>,
    dimension: usize,
}

/// Dot product in 8 independent lanes (lets the compiler use SIMD without
/// reassociating one serial sum).
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl Neighbours {
    /// Reads `embeddings` (`[n, dimension]` f32) of a safetensors file.
    /// Errors with what `bad` makes of the problem.
    fn load(
        file: &Path,
        dimension: usize,
        bad: &dyn Fn(String) -> UnderstandingError,
    ) -> Result<Self, UnderstandingError> {
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let t = Tensor::read_safetensors(file)
            .map_err(|e| bad(format!("{name}: {e}")))?
            .into_iter()
            .find(|(n, _)| n == "embeddings")
            .map(|(_, t)| t)
            .ok_or_else(|| bad(format!("{name} lacks `embeddings`")))?;
        if t.size().len() != 2 || t.size()[1] as usize != dimension {
            return Err(bad(format!("{name}: embeddings have shape {:?}", t.size())));
        }
        Ok(Self {
            vectors: Vec::<f32>::try_from(
                &t.f_to_kind(tch::Kind::Float)?
                    .f_contiguous()?
                    .f_view([-1])?,
            )?,
            dimension,
        })
    }

    /// Cosine similarity of unit vector `e` to its nearest neighbour.
    pub fn nearest(&self, e: &[f32]) -> f32 {
        self.vectors
            .chunks_exact(self.dimension)
            .map(|row| dot8(row, e))
            .fold(f32::MIN, f32::max)
    }
}

/// A dense layer in row-major f32.
#[derive(Debug, Clone)]
pub struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    inputs: usize,
}

impl Dense {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.b
            .iter()
            .enumerate()
            .map(|(o, b)| {
                let row = &self.w[o * self.inputs..(o + 1) * self.inputs];
                b + row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>()
            })
            .collect()
    }
}

/// A loaded head.
#[derive(Debug)]
pub struct IntentHead {
    dir: std::path::PathBuf,
    labels: Labels,
    hidden: Option<Dense>,
    intent: Dense,
    domain: Dense,
    oos_index: usize,
    neighbours: Option<Neighbours>,
    base_neighbours: Option<Neighbours>,
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// GELU, exact (erf) form, as `torch.nn.GELU()`.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * (-x * x).exp();
    if x >= 0.0 { y } else { -y }
}

impl IntentHead {
    /// Loads a head from `dir` for embeddings of `dimension`. Errors with
    /// [`UnderstandingError::NoHead`] when the directory has no head and
    /// [`UnderstandingError::BadHead`] when it does not fit.
    pub fn load(dir: &Path, dimension: usize) -> Result<Self, UnderstandingError> {
        let labels_path = dir.join("labels.json");
        if !labels_path.exists() {
            return Err(UnderstandingError::NoHead(dir.display().to_string()));
        }
        let bad = |m: String| UnderstandingError::BadHead(format!("{}: {m}", dir.display()));
        let labels: Labels = serde_json::from_str(
            &std::fs::read_to_string(&labels_path).map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(format!("labels.json: {e}")))?;
        let mut tensors: HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("head.safetensors"))
                .map_err(|e| bad(format!("head.safetensors: {e}")))?
                .into_iter()
                .collect();
        let mut dense = |name: &str, inputs: usize| -> Result<Option<Dense>, UnderstandingError> {
            let (Some(w), Some(b)) = (
                tensors.remove(&format!("{name}.weight")),
                tensors.remove(&format!("{name}.bias")),
            ) else {
                return Ok(None);
            };
            let size = w.size();
            if size.len() != 2 || size[1] as usize != inputs {
                return Err(bad(format!(
                    "{name}.weight has shape {size:?}, expected [_, {inputs}]"
                )));
            }
            let flat = |t: &Tensor| -> Result<Vec<f32>, UnderstandingError> {
                Ok(Vec::<f32>::try_from(
                    &t.f_to_kind(tch::Kind::Float)?
                        .f_contiguous()?
                        .f_view([-1])?,
                )?)
            };
            Ok(Some(Dense {
                w: flat(&w)?,
                b: flat(&b)?,
                inputs,
            }))
        };
        let hidden = dense("hidden", dimension)?;
        let width = hidden.as_ref().map_or(dimension, |h| h.b.len());
        let intent = dense("intent", width)?.ok_or_else(|| bad("intent.weight missing".into()))?;
        let domain = dense("domain", width)?.ok_or_else(|| bad("domain.weight missing".into()))?;
        if intent.b.len() != labels.intents.len() || domain.b.len() != labels.domains.len() {
            return Err(bad("label counts do not match the weights".into()));
        }
        let oos_index = labels
            .intents
            .iter()
            .position(|i| *i == labels.oos_label)
            .ok_or_else(|| bad(format!("intents lack the oos label {:?}", labels.oos_label)))?;
        let neighbours = match labels.knn_threshold {
            None => None,
            Some(_) => Some(Neighbours::load(
                &dir.join("knn.safetensors"),
                dimension,
                &bad,
            )?),
        };
        let base_neighbours = match labels.base_knn {
            None => None,
            Some(_) => Some(Neighbours::load(
                &dir.join("base_knn.safetensors"),
                dimension,
                &bad,
            )?),
        };
        if labels.base_knn.is_some() && neighbours.is_none() {
            return Err(bad("base_knn needs knn_threshold (the gate's table)".into()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            neighbours,
            base_neighbours,
            labels,
            hidden,
            intent,
            domain,
            oos_index,
        })
    }

    /// The fine-tuned encoder trained with this head (`<dir>/encoder`), when
    /// the head was trained that way (`labels.json` `encoder: "encoder"`).
    pub fn encoder_dir(&self) -> Option<std::path::PathBuf> {
        (self.labels.encoder == "encoder").then(|| self.dir.join("encoder"))
    }

    /// Whether the cascade is on (Classify needs the base encoder too).
    pub fn has_cascade(&self) -> bool {
        self.base_neighbours.is_some()
    }

    /// The base encoder's opinion on a text [`Classified::needs_base`]
    /// marked: flags `c` out of scope when `base_embedding` (the text in
    /// the base encoder's space) is far from every in-scope training
    /// utterance.
    pub fn second_opinion(&self, c: &mut pb::Classification, base_embedding: &[f32]) {
        if let (Some(n), Some(rule)) = (&self.base_neighbours, self.labels.base_knn)
            && n.nearest(base_embedding) < rule.threshold
        {
            c.out_of_scope = true;
        }
    }

    /// The head's identifier.
    pub fn model_id(&self) -> &str {
        &self.labels.model_id
    }

    /// Probabilities of intents and domains for one embedding.
    pub fn probabilities(&self, embedding: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let h = match &self.hidden {
            Some(hidden) => hidden.forward(embedding).into_iter().map(gelu).collect(),
            None => embedding.to_vec(),
        };
        (
            softmax(&self.intent.forward(&h)),
            softmax(&self.domain.forward(&h)),
        )
    }

    /// Classifies one embedded text (fine-tuned space) with `k`
    /// alternatives; the cascade, when it applies, is left to
    /// [`IntentHead::second_opinion`].
    pub fn classify(&self, e: &Embedded, k: usize) -> Result<Classified, UnderstandingError> {
        let (intents, domains) = self.probabilities(&e.vector);
        let mut ranked: Vec<(usize, f32)> = intents
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| *i != self.oos_index)
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (best, best_p) = ranked.first().copied().unwrap_or((0, 0.0));
        let oos_wins = intents[self.oos_index] > best_p;
        // Hierarchical domain: the domain head averaged with the intent
        // head's in-scope mass per domain.
        let mut combined: Vec<f32> = domains.iter().map(|p| p / 2.0).collect();
        for (i, p) in intents.iter().enumerate() {
            if i == self.oos_index {
                continue;
            }
            if let Some(j) = self
                .labels
                .intent_domain
                .get(&self.labels.intents[i])
                .and_then(|d| self.labels.domains.iter().position(|x| x == d))
            {
                combined[j] += p / 2.0;
            }
        }
        let domain = combined
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        let nearest = self.neighbours.as_ref().map(|n| n.nearest(&e.vector));
        let far = matches!((nearest, self.labels.knn_threshold), (Some(s), Some(k)) if s < k);
        let out_of_scope = oos_wins || best_p < self.labels.threshold || far;
        let needs_base = !out_of_scope
            && matches!((nearest, self.labels.base_knn), (Some(s), Some(rule)) if s < rule.gate);
        let name = |i: usize| self.labels.intents.get(i).cloned().unwrap_or_default();
        let domain_of = |i: usize| {
            self.labels
                .intent_domain
                .get(&name(i))
                .cloned()
                .unwrap_or_default()
        };
        let classification = pb::Classification {
            domain: Some(pb::Label {
                name: self
                    .labels
                    .domains
                    .get(domain.0)
                    .cloned()
                    .unwrap_or_default(),
                confidence: domain.1,
            }),
            intent: Some(pb::Label {
                name: name(best),
                confidence: best_p,
            }),
            out_of_scope,
            alternatives: ranked
                .iter()
                .take(k)
                .map(|&(i, p)| pb::IntentCandidate {
                    domain: domain_of(i),
                    intent: name(i),
                    confidence: p,
                })
                .collect(),
            input_tokens: e.tokens as u32,
            truncated: e.truncated,
            model_id: self.labels.model_id.clone(),
        };
        Ok(Classified {
            classification,
            needs_base,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        assert!((erf(0.5) - 0.520_499_9).abs() < 1e-6);
        assert!((erf(-1.0) + 0.842_700_8).abs() < 1e-6);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    }
}
