//! What a client balances over: one or more `http(s)://host:port` URLs
//! (comma-separated), each host resolved by the system resolver to every
//! address it has. A Kubernetes headless Service name resolves to the IPs of
//! its ready pods; a static list (`https://127.0.0.1:50052,https://127.0.0.1:51052`)
//! resolves to itself. Both take the same path: resolve each name, take the
//! union.

use std::{collections::BTreeMap, net::SocketAddr};

use crate::RuntimeError;

/// One URL of an upstream's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://`: every connection is TLS, verified against `host`.
    pub tls: bool,
    /// Host name (or IP literal, without brackets) as written in the URL;
    /// the TLS server name and the `:authority` of each call.
    pub host: String,
    /// Port (the scheme's default when the URL has none: 80 or 443).
    pub port: u16,
}

impl Target {
    /// `scheme://host:port` as written, for the `:authority` of calls.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Parses `spec`: one URL or several separated by commas, all `http://` or
/// all `https://`, each with a host and no path. Errors with
/// [`RuntimeError::Config`] naming the offending URL.
pub fn parse(spec: &str) -> Result<Vec<Target>, RuntimeError> {
    let mut targets = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = url::Url::parse(part)
            .map_err(|e| RuntimeError::Config(format!("{part:?} is not a URL: {e}")))?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(RuntimeError::Config(format!(
                    "{part:?}: scheme {other:?} is neither http nor https"
                )));
            }
        };
        let host = url
            .host_str()
            .ok_or_else(|| RuntimeError::Config(format!("{part:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !matches!(url.path(), "" | "/") {
            return Err(RuntimeError::Config(format!(
                "{part:?}: a gRPC upstream URL has no path"
            )));
        }
        let port = url.port().unwrap_or(if tls { 443 } else { 80 });
        targets.push(Target { tls, host, port });
    }
    match targets.first() {
        None => Err(RuntimeError::Config(format!("{spec:?} names no URL"))),
        Some(first) if targets.iter().any(|t| t.tls != first.tls) => Err(RuntimeError::Config(
            format!("{spec:?} mixes http:// and https:// URLs"),
        )),
        Some(_) => Ok(targets),
    }
}

/// Resolves every target, mapping each address to the target that named it
/// (the first, when two names share an address). A name that does not
/// resolve is skipped while others do; errors with the resolver's message
/// only when no target gave an address.
pub async fn resolve(targets: &[Target]) -> Result<BTreeMap<SocketAddr, Target>, String> {
    let mut found = BTreeMap::new();
    let mut errors = Vec::new();
    for target in targets {
        match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
            Ok(addrs) => {
                for addr in addrs {
                    found.entry(addr).or_insert_with(|| target.clone());
                }
            }
            Err(e) => errors.push(format!("{}: {e}", target.host)),
        }
    }
    if found.is_empty() {
        return Err(if errors.is_empty() {
            "no address".to_owned()
        } else {
            errors.join("; ")
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_mixed_schemes_are_refused() {
        let t = parse("https://ctx:50054, https://127.0.0.1:51054").unwrap_or_default();
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.tls));
        assert_eq!(t[0].host, "ctx");
        assert_eq!(t[1].origin(), "https://127.0.0.1:51054");
        assert!(parse("http://a:1,https://b:2").is_err());
        assert!(parse("grpc://a:1").is_err());
        assert!(parse("http://a:1/path").is_err());
        assert!(parse(" , ").is_err());
        assert_eq!(
            parse("http://[::1]:5").map(|t| t[0].origin()).ok(),
            Some("http://[::1]:5".to_owned())
        );
    }

    #[tokio::test]
    async fn a_list_resolves_to_the_union_and_a_bad_name_is_skipped() {
        let targets =
            parse("http://127.0.0.1:7001,http://127.0.0.2:7001,http://no-such-host.invalid:7001")
                .unwrap_or_default();
        let found = resolve(&targets).await.unwrap_or_default();
        let addrs: Vec<String> = found.keys().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:7001", "127.0.0.2:7001"]);
        assert!(
            resolve(&parse("http://no-such-host.invalid:1").unwrap_or_default())
                .await
                .is_err()
        );
    }
}
