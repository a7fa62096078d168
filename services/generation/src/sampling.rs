//! Next-token selection from one row of logits, in the order of
//! `transformers`' logits processors: repetition penalty (Keskar et al. 2019,
//! CTRL), temperature, top-k, top-p (Holtzman et al. 2019, nucleus sampling),
//! then a draw from a seeded ChaCha8 generator — or greedy argmax when the
//! temperature is 0.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::GenerationError;

/// Validated sampling parameters of one request.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// ≥ 1; 1 disables.
    pub repetition_penalty: f32,
    /// Seed of the generator; `None` = drawn from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges. Errors with [`GenerationError::InvalidArgument`]
    /// naming the field.
    pub fn validate(&self) -> Result<(), GenerationError> {
        let bad = |m: String| Err(GenerationError::InvalidArgument(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad(format!(
                "temperature {} must be in [0, 100]",
                self.temperature
            ));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !self.repetition_penalty.is_finite()
            || self.repetition_penalty < 1.0
            || self.repetition_penalty > 10.0
        {
            return bad(format!(
                "repetition_penalty {} must be in [1, 10]",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Per-sequence sampler state.
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for validated `config`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = match config.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { config, rng }
    }

    /// Picks the next token from `logits` (one row, f32, modified in place);
    /// `history` holds the prompt and completion so far, for the repetition
    /// penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::with_capacity(history.len());
            for &id in history {
                if seen.insert(id)
                    && let Some(l) = logits.get_mut(id as usize)
                {
                    *l = if *l > 0.0 {
                        *l / c.repetition_penalty
                    } else {
                        *l * c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature == 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / c.temperature))
            .collect();
        // Descending by logit; ties keep the lower id first.
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 && c.top_k < candidates.len() {
            candidates.truncate(c.top_k);
        }
        let max = candidates.first().map_or(0.0, |x| x.1);
        let mut probs: Vec<f32> = candidates.iter().map(|x| (x.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if c.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut r: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return candidates[i].0;
            }
            r -= p;
        }
        candidates[probs.len().saturating_sub(1)].0
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed: Some(seed),
        })
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(0.0, 0, 1.0, 0);
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits = [0.1, 2.0, 0.5, 1.9, -1.0];
        for seed in 0..20 {
            assert_eq!(
                sampler(1.0, 1, 1.0, seed).sample(&mut logits.clone(), &[]),
                1
            );
        }
        let draw = |seed| {
            let mut s = sampler(1.0, 0, 1.0, seed);
            (0..32)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps ids 0 and 1.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = sampler(1.0, 0, 0.8, 3);
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..SamplingConfig::default()
        });
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]), 1);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingConfig {
            top_p: 0.0,
            ..SamplingConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
    }
}
