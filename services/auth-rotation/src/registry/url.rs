//! Provider URL safety (server-side request forgery): a configured base URL
//! must be https (http only on loopback), carry no user info, and not name a
//! link-local, unspecified, multicast or cloud metadata address, so a
//! provider entry cannot be turned into a request to an internal host.
//!
//! A host name is checked again when it is resolved, by [`GuardedResolver`]:
//! a name that passed [`validate`] may later resolve to a forbidden address
//! (DNS rebinding), and the HTTP client then connects only to the allowed
//! ones.

use std::net::{IpAddr, SocketAddr};

use crate::AuthError;

/// Host names of cloud instance-metadata services.
const METADATA_HOSTS: [&str; 4] = [
    "metadata.google.internal",
    "metadata",
    "metadata.azure.com",
    "instance-data",
];

fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                Some("a link-local address (169.254.0.0/16, cloud metadata)")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                Some("an unspecified, broadcast or multicast address")
            } else if v4.octets() == [100, 100, 100, 200] {
                Some("a cloud metadata address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if (seg[0] & 0xffc0) == 0xfe80 {
                Some("a link-local address (fe80::/10)")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("an unspecified or multicast address")
            } else if seg[0] == 0xfd00 && seg[1] == 0x0ec2 {
                Some("a cloud metadata address (fd00:ec2::/32)")
            } else if let Some(v4) = v6.to_ipv4_mapped() {
                forbidden_ip(IpAddr::V4(v4))
            } else {
                None
            }
        }
    }
}

/// The addresses of `addrs` that [`validate`] would accept as literal
/// hosts. Errors with a message naming `host` and the first forbidden kind
/// when none is left.
pub fn allowed_addresses(host: &str, addrs: &[SocketAddr]) -> Result<Vec<SocketAddr>, String> {
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| forbidden_ip(a.ip()).is_none())
        .collect();
    if allowed.is_empty() {
        let why = addrs
            .iter()
            .find_map(|a| forbidden_ip(a.ip()))
            .unwrap_or("no address");
        return Err(format!("{host} resolves to {why}"));
    }
    Ok(allowed)
}

/// DNS resolution for the service's HTTP client (health checks, token
/// requests): the system resolver, then [`allowed_addresses`], so a provider
/// name that rebinds to a link-local or metadata address after it was
/// registered is never connected to. Cloud metadata host names are refused
/// outright. Literal IP hosts never reach a resolver; [`validate`] checked
/// them.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            if METADATA_HOSTS.contains(&host.as_str()) {
                return Err(format!("{host} is a cloud metadata service").into());
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = allowed_addresses(&host, &addrs)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether `host` is a loopback name or address.
pub fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => *d == "localhost" || d.ends_with(".localhost"),
        url::Host::Ipv4(v4) => v4.is_loopback(),
        url::Host::Ipv6(v6) => v6.is_loopback(),
    }
}

/// Validates and normalises (no trailing `/`) a provider or token URL.
/// Errors with [`AuthError::InvalidArgument`] naming the rule broken.
pub fn validate(field: &str, raw: &str) -> Result<String, AuthError> {
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
        "http" if is_loopback(&host) => {}
        "http" => return Err(bad("must be https outside loopback".into())),
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
    fn resolved_addresses_are_filtered() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            allowed_addresses(
                "api.example.com",
                &[a("169.254.169.254:0"), a("10.1.2.3:0"), a("[fe80::1]:0")]
            ),
            Ok(vec![a("10.1.2.3:0")])
        );
        let err = allowed_addresses("rebound.example.com", &[a("169.254.169.254:0")]).unwrap_err();
        assert!(
            err.contains("rebound.example.com") && err.contains("link-local"),
            "{err}"
        );
        assert!(allowed_addresses("empty.example.com", &[]).is_err());
    }

    #[tokio::test]
    async fn the_resolver_refuses_metadata_names_and_resolves_others() {
        use reqwest::dns::Resolve;
        let resolve = |n: &str| GuardedResolver.resolve(n.parse().unwrap());
        let err = resolve("metadata.google.internal.").await.err().unwrap();
        assert!(err.to_string().contains("metadata"), "{err}");
        let local: Vec<SocketAddr> = resolve("localhost").await.unwrap().collect();
        assert!(!local.is_empty() && local.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn ssrf_rules() {
        assert_eq!(
            validate("base_url", "https://api.openai.com/v1/")
                .ok()
                .as_deref(),
            Some("https://api.openai.com/v1")
        );
        assert!(validate("base_url", "http://127.0.0.1:8080/v1").is_ok());
        assert!(validate("base_url", "http://localhost:9/v1").is_ok());
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
            assert!(validate("base_url", bad).is_err(), "{bad} accepted");
        }
    }
}
