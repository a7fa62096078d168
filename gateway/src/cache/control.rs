//! The client's say over the response cache: the request's `Cache-Control`
//! header (RFC 9111 §5.2.1 request directives).

use std::time::Duration;

use crate::ApiError;

/// What a request's `Cache-Control` asks of the response cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-cache`: do not answer from the cache (the answer may still be
    /// stored).
    pub no_cache: bool,
    /// `no-store`: do not store this answer.
    pub no_store: bool,
    /// `max-age=N`: only entries younger than N seconds may answer.
    pub max_age: Option<Duration>,
}

impl CacheControl {
    /// Parses a `Cache-Control` value: comma-separated directives, case
    /// insensitive; directives that do not concern a request's cache lookup
    /// (`max-stale`, `only-if-cached`, extensions) are ignored as RFC 9111
    /// requires of unrecognised ones. Errors with 400 for a `max-age`
    /// without a non-negative integer.
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        let mut out = Self::default();
        for directive in value.split(',') {
            let directive = directive.trim();
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive, None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => out.no_cache = true,
                "no-store" => out.no_store = true,
                "max-age" => {
                    let secs = arg.and_then(|a| a.parse::<u64>().ok()).ok_or_else(|| {
                        ApiError::InvalidRequest(format!(
                            "Cache-Control: `{directive}` needs a number of seconds, e.g. max-age=60"
                        ))
                    })?;
                    out.max_age = Some(Duration::from_secs(secs));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_three_directives() {
        let c = CacheControl::parse("No-Cache, no-store, max-age=30, x-ext").unwrap();
        assert!(c.no_cache && c.no_store);
        assert_eq!(c.max_age, Some(Duration::from_secs(30)));
        assert_eq!(CacheControl::parse("").unwrap(), CacheControl::default());
        assert!(CacheControl::parse("max-age=soon").is_err());
        assert!(CacheControl::parse("max-age").is_err());
    }
}
