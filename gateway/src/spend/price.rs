//! Costs in nano-USD (10⁻⁹ USD, `i64`): integers, so that reservations
//! and settlements add up exactly in Redis; `i64` holds 9.2 billion USD.
//! Prices are configured in USD per million tokens, the unit every
//! provider's price list uses.

use super::config::Price;

/// Nano-USD per USD.
pub const NANO_PER_USD: f64 = 1e9;

/// USD as nano-USD, rounded up (a budget never rounds in the caller's
/// favour).
pub fn nano(usd: f64) -> i64 {
    (usd * NANO_PER_USD).ceil() as i64
}

/// Nano-USD as USD.
pub fn usd(nano: i64) -> f64 {
    nano as f64 / NANO_PER_USD
}

/// Tokens of one request, by how they are billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens, the cached ones included.
    pub input: u32,
    /// Prompt tokens served from the provider's prompt cache.
    pub cached: u32,
    /// Completion tokens.
    pub output: u32,
}

/// What `tokens` cost at `price`, in nano-USD, rounded up: uncached input
/// at `input`, cached input at `cached_input` (default `input`), output at
/// `output`, each in USD per million tokens.
pub fn cost(price: &Price, tokens: Tokens) -> i64 {
    let cached = tokens.cached.min(tokens.input);
    let per_token = |usd_per_million: f64| usd_per_million * NANO_PER_USD / 1e6;
    let total = f64::from(tokens.input - cached) * per_token(price.input)
        + f64::from(cached) * per_token(price.cached_input.unwrap_or(price.input))
        + f64::from(tokens.output) * per_token(price.output);
    total.ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_the_price_list() {
        // gpt-4o-mini's list price: 1,000 input tokens at $0.15/M cost
        // $0.00015, 500 output at $0.60/M $0.0003.
        let p = Price {
            input: 0.15,
            cached_input: Some(0.075),
            output: 0.60,
        };
        let t = Tokens {
            input: 1_000,
            cached: 0,
            output: 500,
        };
        assert_eq!(cost(&p, t), 150_000 + 300_000);
        // Half the prompt cached: those 500 at half price.
        let c = Tokens { cached: 500, ..t };
        assert_eq!(cost(&p, c), 75_000 + 37_500 + 300_000);
        // Cached never exceeds the prompt.
        let odd = Tokens {
            input: 10,
            cached: 99,
            output: 0,
        };
        assert_eq!(cost(&p, odd), 750);
        assert_eq!(nano(1.0), 1_000_000_000);
        assert!((usd(nano(0.25)) - 0.25).abs() < 1e-12);
    }
}
