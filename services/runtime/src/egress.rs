//! Egress guard for requests to configured third-party URLs (server-side
//! request forgery): which addresses a provider URL may name or resolve to,
//! and a DNS resolver for `reqwest` clients that enforces it at connect time.
//! A host name checked when it was configured may later resolve elsewhere
//! (DNS rebinding); [`GuardedResolver`] checks every resolved address, so
//! the client connects only to allowed ones. Loopback and private ranges
//! stay allowed (local providers and in-cluster gateways are legitimate).

use std::net::{IpAddr, SocketAddr};

/// Host names of cloud instance-metadata services.
pub const METADATA_HOSTS: [&str; 4] = [
    "metadata.google.internal",
    "metadata",
    "metadata.azure.com",
    "instance-data",
];

/// Why `ip` may not be connected to (link-local, unspecified, broadcast,
/// multicast, cloud metadata, or an IPv4-mapped such address), or `None`.
pub fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
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

/// The addresses of `addrs` that [`forbidden_ip`] accepts. Errors with a
/// message naming `host` and the first forbidden kind when none is left.
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

/// DNS resolution for HTTP clients that call providers (auth-rotation's
/// health checks and token requests, generation's remote backend): the
/// system resolver, then [`allowed_addresses`], so a provider
/// name that rebinds to a link-local or metadata address after it was
/// registered is never connected to. Cloud metadata host names are refused
/// outright. Literal IP hosts never reach a resolver; the
/// configuration check covers them.
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
}
