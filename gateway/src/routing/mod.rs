//! Routing: which route a turn takes (by request model, then intent), and the
//! ordered chain of models it tries (weighted candidates, then fallbacks) with
//! the retry backoff between attempts.

pub mod config;

use std::time::Duration;

use rand::Rng;

pub use config::{GatewayConfig, Route};

/// What understanding said about the turn, as routing sees it.
#[derive(Debug, Clone, Default)]
pub struct IntentKey<'a> {
    /// Domain name, when classified and in scope.
    pub domain: Option<&'a str>,
    /// Intent name, when classified and in scope.
    pub intent: Option<&'a str>,
}

/// The routes of the configuration.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
}

fn listed(list: &[String], value: Option<&str>) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|x| x == v))
}

impl Router {
    /// Wraps validated routes.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    /// The route named `name`.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// Every request `model` name some route matches explicitly, in file order
    /// without duplicates (for `/v1/models`).
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for r in &self.routes {
            for m in &r.matches.models {
                if !names.contains(m) {
                    names.push(m.clone());
                }
            }
        }
        names
    }

    /// The routes a request `model` may take: those listing it (or listing no
    /// model at all). Empty means the model is unknown to routing.
    pub fn for_model<'a>(&'a self, model: &str) -> Vec<&'a Route> {
        self.routes
            .iter()
            .filter(|r| listed(&r.matches.models, Some(model)))
            .collect()
    }

    /// The first of `routes` whose intent conditions hold for `intent`; a
    /// route without intent conditions holds for any turn.
    pub fn select<'a>(routes: &[&'a Route], intent: &IntentKey<'_>) -> Option<&'a Route> {
        routes
            .iter()
            .find(|r| {
                listed(&r.matches.domains, intent.domain)
                    && listed(&r.matches.intents, intent.intent)
            })
            .copied()
    }

    /// The route a turn takes before understanding has answered: the first
    /// route of `routes` without intent conditions, else the first one. Used
    /// to start retrieval concurrently with classification.
    pub fn provisional<'a>(routes: &[&'a Route]) -> Option<&'a Route> {
        routes
            .iter()
            .find(|r| r.matches.domains.is_empty() && r.matches.intents.is_empty())
            .or(routes.first())
            .copied()
    }
}

/// The models a route tries, in order: its candidates in a weighted random
/// order (sampling without replacement, weight-proportional), then its
/// fallbacks. Models of weight 0 are skipped; duplicates are tried once.
pub fn model_chain(route: &Route, rng: &mut impl Rng) -> Vec<String> {
    let mut pool: Vec<(&str, u32)> = route
        .candidates
        .iter()
        .filter(|c| c.weight > 0)
        .map(|c| (c.model.as_str(), c.weight))
        .collect();
    let mut chain: Vec<String> = Vec::new();
    while !pool.is_empty() {
        let total: u64 = pool.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut pick = rng.random_range(0..total);
        let mut index = 0;
        for (i, (_, w)) in pool.iter().enumerate() {
            if pick < u64::from(*w) {
                index = i;
                break;
            }
            pick -= u64::from(*w);
        }
        let (model, _) = pool.remove(index);
        chain.push(model.to_owned());
    }
    for f in &route.fallbacks {
        if !chain.contains(f) {
            chain.push(f.clone());
        }
    }
    chain
}

/// Backoff before attempt `attempt` (1-based: attempt 2 waits
/// `initial_backoff_ms`, attempt 3 that times `backoff_factor`, …), scaled by
/// a uniform factor in `[1 - jitter, 1 + jitter]`.
pub fn backoff(policy: &config::RetryPolicy, attempt: u32, rng: &mut impl Rng) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exponent = i32::try_from(attempt - 2).unwrap_or(i32::MAX);
    let base = policy.initial_backoff_ms as f64 * policy.backoff_factor.powi(exponent);
    let jitter = if policy.jitter > 0.0 {
        rng.random_range(-policy.jitter..=policy.jitter)
    } else {
        0.0
    };
    Duration::from_secs_f64((base * (1.0 + jitter)).max(0.0) / 1000.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rand::SeedableRng;

    use super::*;

    fn router() -> Router {
        let c: GatewayConfig = serde_yaml_ng::from_str(
            r#"
routes:
  - name: banking
    match: { models: [default], domains: [banking] }
    candidates: [{ model: bank-model }]
  - name: general
    match: { models: [default, local] }
    candidates: [{ model: a, weight: 3 }, { model: b, weight: 1 }, { model: off, weight: 0 }]
    fallbacks: [remote/c, a]
"#,
        )
        .unwrap();
        Router::new(c.routes)
    }

    #[test]
    fn routes_by_model_then_intent() {
        let r = router();
        let routes = r.for_model("default");
        assert_eq!(routes.len(), 2);
        assert!(r.for_model("nope").is_empty());
        let banking = IntentKey {
            domain: Some("banking"),
            intent: Some("balance"),
        };
        assert_eq!(Router::select(&routes, &banking).unwrap().name, "banking");
        assert_eq!(
            Router::select(&routes, &IntentKey::default()).unwrap().name,
            "general"
        );
        assert_eq!(Router::provisional(&routes).unwrap().name, "general");
        assert_eq!(r.model_names(), vec!["default", "local"]);
    }

    #[test]
    fn chain_follows_weights_then_fallbacks() {
        let r = router();
        let route = r.for_model("local")[0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut first_a = 0;
        for _ in 0..4000 {
            let chain = model_chain(route, &mut rng);
            assert_eq!(chain.len(), 3, "{chain:?}");
            assert_eq!(chain[2], "remote/c");
            if chain[0] == "a" {
                first_a += 1;
            }
        }
        // Weight 3:1 → "a" first about 75% of the time.
        assert!((2800..3200).contains(&first_a), "{first_a}");
    }

    #[test]
    fn backoff_grows_by_the_factor_within_jitter() {
        let policy = config::RetryPolicy {
            max_attempts: 4,
            backoff_factor: 2.0,
            initial_backoff_ms: 100,
            jitter: 0.1,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(backoff(&policy, 1, &mut rng), Duration::ZERO);
        for _ in 0..100 {
            let b2 = backoff(&policy, 2, &mut rng).as_secs_f64();
            let b3 = backoff(&policy, 3, &mut rng).as_secs_f64();
            assert!((0.09..=0.11).contains(&b2), "{b2}");
            assert!((0.18..=0.22).contains(&b3), "{b3}");
        }
    }
}
