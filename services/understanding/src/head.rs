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
//! in-scope training utterances in the fine-tuned encoder's space; `intents`
//! `[n]` i64: each row's intent logit index, optional) and with
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
    /// Logit index of the predicted in-scope intent.
    pub intent_index: usize,
}

/// In-scope training embeddings for the nearest-neighbour rule: unit
/// vectors of the encoder's dimension, row-major f32, grouped by the intent
/// they illustrate when the table says (`intents`), so a scan can start
/// where the nearest neighbour most likely is.
#[derive(Debug, Clone)]
pub struct Neighbours {
    vectors: Vec<f32>,
    dimension: usize,
    /// Row range of every intent (by logit index); empty without labels.
    groups: Vec<std::ops::Range<usize>>,
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
    /// Reads `embeddings` (`[n, dimension]` f32) and, when present,
    /// `intents` (`[n]` i64 logit indices) of a safetensors file; rows are
    /// regrouped by intent. Errors with what `bad` makes of the problem.
    fn load(
        file: &Path,
        dimension: usize,
        bad: &dyn Fn(String) -> UnderstandingError,
    ) -> Result<Self, UnderstandingError> {
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut tensors: HashMap<String, Tensor> = Tensor::read_safetensors(file)
            .map_err(|e| bad(format!("{name}: {e}")))?
            .into_iter()
            .collect();
        let t = tensors
            .remove("embeddings")
            .ok_or_else(|| bad(format!("{name} lacks `embeddings`")))?;
        if t.size().len() != 2 || t.size()[1] as usize != dimension {
            return Err(bad(format!("{name}: embeddings have shape {:?}", t.size())));
        }
        let rows = t.size()[0] as usize;
        let flat = Vec::<f32>::try_from(
            &t.f_to_kind(tch::Kind::Float)?
                .f_contiguous()?
                .f_view([-1])?,
        )?;
        let Some(intents) = tensors.remove("intents") else {
            return Ok(Self {
                vectors: flat,
                dimension,
                groups: Vec::new(),
            });
        };
        let intents = Vec::<i64>::try_from(&intents.f_to_kind(tch::Kind::Int64)?.f_view([-1])?)?;
        if intents.len() != rows || intents.iter().any(|&i| i < 0) {
            return Err(bad(format!(
                "{name}: `intents` must hold one non-negative index per row"
            )));
        }
        // Stable regrouping: rows of intent 0, then intent 1, …
        let mut order: Vec<usize> = (0..rows).collect();
        order.sort_by_key(|&r| intents[r]);
        let mut vectors = Vec::with_capacity(flat.len());
        let mut groups = vec![0..0; intents.iter().max().map_or(0, |&m| m as usize + 1)];
        for (position, &r) in order.iter().enumerate() {
            vectors.extend_from_slice(&flat[r * dimension..(r + 1) * dimension]);
            let g = &mut groups[intents[r] as usize];
            if g.start == g.end {
                *g = position..position;
            }
            g.end = position + 1;
        }
        Ok(Self {
            vectors,
            dimension,
            groups,
        })
    }

    fn best_in(&self, rows: std::ops::Range<usize>, e: &[f32]) -> f32 {
        self.vectors[rows.start * self.dimension..rows.end * self.dimension]
            .chunks_exact(self.dimension)
            .map(|row| dot8(row, e))
            .fold(f32::MIN, f32::max)
    }

    /// Rows in the table.
    fn rows(&self) -> usize {
        self.vectors.len() / self.dimension
    }

    /// Cosine similarity of unit vector `e` to its nearest neighbour.
    pub fn nearest(&self, e: &[f32]) -> f32 {
        self.best_in(0..self.rows(), e)
    }

    /// [`Neighbours::nearest`] where only whether it reaches `enough`
    /// matters above it: scans the rows of intent `hint` first and stops
    /// there when one is at least `enough` similar (the exact maximum when
    /// the result is below `enough`, some similarity ≥ `enough` otherwise).
    /// An in-scope text's nearest neighbour is usually of its predicted
    /// intent, so most texts read one group (~1/150 of the table), not all.
    pub fn nearest_up_to(&self, e: &[f32], hint: usize, enough: f32) -> f32 {
        let Some(group) = self.groups.get(hint).cloned() else {
            return self.nearest(e);
        };
        let first = self.best_in(group.clone(), e);
        if first >= enough {
            return first;
        }
        first
            .max(self.best_in(0..group.start, e))
            .max(self.best_in(group.end..self.rows(), e))
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
            .map(|(o, b)| b + dot8(&self.w[o * self.inputs..(o + 1) * self.inputs], x))
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
    /// marked: flags it out of scope when `base_embedding` (the text in
    /// the base encoder's space) is far from every in-scope training
    /// utterance.
    pub fn second_opinion(&self, c: &mut Classified, base_embedding: &[f32]) {
        if let (Some(n), Some(rule)) = (&self.base_neighbours, self.labels.base_knn)
            && n.nearest_up_to(base_embedding, c.intent_index, rule.threshold) < rule.threshold
        {
            c.classification.out_of_scope = true;
        }
    }

    /// The head's identifier.
    pub fn model_id(&self) -> &str {
        &self.labels.model_id
    }

    /// Its labels and decision rule (`labels.json`).
    pub fn labels(&self) -> &Labels {
        &self.labels
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
        // Only whether the nearest neighbour reaches the larger of the two
        // similarity thresholds matters above it: the scan may stop there.
        let enough = self
            .labels
            .knn_threshold
            .unwrap_or(f32::MIN)
            .max(self.labels.base_knn.map_or(f32::MIN, |r| r.gate));
        let nearest = self
            .neighbours
            .as_ref()
            .map(|n| n.nearest_up_to(&e.vector, best, enough));
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
            intent_index: best,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of a seeded random table, unit-normalised: `[n, d]`.
    fn unit_rows(n: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let t = Tensor::randn([n, d], (tch::Kind::Float, tch::Device::Cpu));
        let norm = t.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        t / norm
    }

    #[test]
    fn the_early_exit_scan_decides_as_the_full_scan() {
        let (n, d, intents) = (600i64, 24i64, 12i64);
        let table = unit_rows(n, d, 3);
        // Intents interleaved (as in training order) and regrouped on load.
        let labels: Vec<i64> = (0..n).map(|r| (r * 7) % intents).collect();
        let file =
            std::env::temp_dir().join(format!("moltbot-knn-{}.safetensors", std::process::id()));
        Tensor::write_safetensors(
            &[
                ("embeddings", &table),
                ("intents", &Tensor::from_slice(&labels)),
            ],
            &file,
        )
        .unwrap();
        let bad = |m: String| UnderstandingError::BadHead(m);
        let grouped = Neighbours::load(&file, d as usize, &bad).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(grouped.groups.len(), intents as usize);
        let rows = Vec::<f32>::try_from(&table.view([-1])).unwrap();
        let plain = Neighbours {
            vectors: rows,
            dimension: d as usize,
            groups: Vec::new(),
        };
        let queries = Vec::<f32>::try_from(&unit_rows(200, d, 4).view([-1])).unwrap();
        let mut stopped_early = 0;
        for (q, e) in queries.chunks_exact(d as usize).enumerate() {
            let exact = plain.nearest(e);
            assert_eq!(grouped.nearest(e), exact, "regrouping lost or changed rows");
            for enough in [0.3f32, 0.5, 0.7, 0.9] {
                let got = grouped.nearest_up_to(e, q % intents as usize, enough);
                if exact < enough {
                    assert_eq!(got, exact, "below the bar the maximum must be exact");
                } else {
                    assert!(
                        got >= enough,
                        "{got} < {enough} though the nearest is {exact}"
                    );
                    stopped_early += usize::from(got < exact);
                }
            }
        }
        assert!(stopped_early > 0, "no query stopped in its hint group");
    }

    #[test]
    fn erf_matches_known_values() {
        assert!((erf(0.5) - 0.520_499_9).abs() < 1e-6);
        assert!((erf(-1.0) + 0.842_700_8).abs() < 1e-6);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    }
}
