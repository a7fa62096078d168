//! Provider URL safety (server-side request forgery): a configured base URL
//! must be https (plain http only on loopback and on the in-cluster hosts
//! the operator names in `MOLTBOT_PLAIN_HTTP_HOSTS`), carry no user info, and not name a
//! link-local, unspecified, multicast or cloud metadata address, so a
//! provider entry cannot be turned into a request to an internal host.
//!
//! A host name is checked again when it is resolved, by
//! [`moltbot_runtime::egress::GuardedResolver`]:
//! a name that passed [`validate`] may later resolve to a forbidden address
//! (DNS rebinding), and the HTTP client then connects only to the allowed
//! ones.

use std::net::IpAddr;

use moltbot_runtime::egress::{METADATA_HOSTS, forbidden_ip};

use crate::AuthError;

/// Whether `host` is a loopback name or address.
pub fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => *d == "localhost" || d.ends_with(".localhost"),
        url::Host::Ipv4(v4) => v4.is_loopback(),
        url::Host::Ipv6(v6) => v6.is_loopback(),
    }
}

/// Whether `host` is one of `allowed`: an entry is a host name (`vllm`,
/// `vllm.llm.svc`), or, starting with a dot, every name under a domain
/// (`.svc.cluster.local`). Case-insensitive.
pub fn plain_http_allowed(host: &url::Host<&str>, allowed: &[String]) -> bool {
    let url::Host::Domain(d) = host else {
        return allowed.iter().any(|a| *a == host.to_string());
    };
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_prefix('.') {
            Some(domain) => d.ends_with(&a) || d == domain,
            None => d == a,
        }
    })
}

/// Validates and normalises (no trailing `/`) a provider or token URL;
/// plain `http` is accepted on loopback and for the hosts of
/// `plain_http` ([`plain_http_allowed`]). Errors with
/// [`AuthError::InvalidArgument`] naming the rule broken.
pub fn validate(field: &str, raw: &str, plain_http: &[String]) -> Result<String, AuthError> {
    let bad = |why: String| AuthError::InvalidArgument(format!("{field} {raw:?}: {why}"));
    let url = url::Url::parse(raw).map_err(|e| bad(format!("not a URL ({e})")))?;
    let host = url.host().ok_or_else(|| bad("has no host".into()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "must not carry user info; put keys in credentials".into()
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) || plain_http_allowed(&host, plain_http) => {}
        "http" => {
            return Err(bad(
                "must be https outside loopback and the hosts named in MOLTBOT_PLAIN_HTTP_HOSTS"
                    .into(),
            ));
        }
        other => return Err(bad(format!("scheme {other} is not allowed; use https"))),
    }
    let ip = match host {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if METADATA_HOSTS.contains(&d.as_str()) {
                return Err(bad("names a cloud metadata service".into()));
            }
            None
        }
    };
    if let Some(why) = ip.and_then(forbidden_ip) {
        return Err(bad(format!("names {why}")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment".into()));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssrf_rules() {
        assert_eq!(
            validate("base_url", "https://api.openai.com/v1/", &[])
                .ok()
                .as_deref(),
            Some("https://api.openai.com/v1")
        );
        assert!(validate("base_url", "http://127.0.0.1:8080/v1", &[]).is_ok());
        assert!(validate("base_url", "http://localhost:9/v1", &[]).is_ok());
        for bad in [
            "http://api.example.com/v1",
            "https://169.254.169.254/latest",
            "http://169.254.169.254/latest",
            "https://metadata.google.internal/computeMetadata",
            "https://[fe80::1]/v1",
            "https://[::ffff:169.254.169.254]/",
            "https://0.0.0.0/v1",
            "https://user:pw@api.example.com/v1",
            "file:///etc/passwd",
            "https://api.example.com/v1?x=1",
            "not a url",
        ] {
            assert!(validate("base_url", bad, &[]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn plain_http_only_for_the_named_in_cluster_hosts() {
        let allowed = vec!["vllm".to_owned(), ".svc.cluster.local".to_owned()];
        for ok in [
            "http://vllm:8000/v1",
            "http://llama.models.svc.cluster.local:8080/v1",
            "http://VLLM:8000/v1",
        ] {
            assert!(validate("base_url", ok, &allowed).is_ok(), "{ok} refused");
        }
        for bad in [
            "http://vllm.evil.com/v1",
            "http://api.example.com/v1",
            "http://cluster.local.evil/v1",
            // Still no metadata service, even when named.
            "http://169.254.169.254/latest",
        ] {
            assert!(
                validate("base_url", bad, &allowed).is_err(),
                "{bad} accepted"
            );
        }
        assert!(validate("base_url", "http://vllm:8000/v1", &[]).is_err());
    }
}
