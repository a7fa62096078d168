//! TLS for outbound connections: the HTTP client that calls providers (their
//! chat APIs, health checks and OAuth2 token endpoints) and the words that
//! explain a failed handshake.
//!
//! The client is rustls (ring provider) with the platform's root
//! certificates plus the CAs named by the standard `SSL_CERT_FILE` (a PEM
//! bundle) and `SSL_CERT_DIR` (a directory of PEM files, `:`-separated
//! list), e.g. a corporate proxy's CA or a private provider's. `HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` are honoured (reqwest reads them).
//! HTTP/2 is used where the server offers it in ALPN; connections are kept
//! alive and pooled per host.

mod roots;

use std::time::Duration;

pub use roots::extra_roots;

/// Settings of a provider-facing HTTP client.
#[derive(Debug, Clone, Copy)]
pub struct ProviderClient {
    /// Whole-request deadline (`None`: the caller sets its own, e.g. time to
    /// first token for streams).
    pub timeout: Option<Duration>,
    /// Idle keep-alive connections kept per host.
    pub pool_per_host: usize,
}

impl ProviderClient {
    /// Builds the client: rustls with the roots above, no redirects (a
    /// redirect could point at an internal host), and every resolved address
    /// checked by [`crate::egress::GuardedResolver`]. Errors with a message
    /// when an `SSL_CERT_FILE`/`SSL_CERT_DIR` certificate cannot be read or
    /// the TLS backend cannot start.
    pub fn build(self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_native_certs(true)
            .pool_max_idle_per_host(self.pool_per_host)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(std::sync::Arc::new(crate::egress::GuardedResolver));
        if let Some(t) = self.timeout {
            builder = builder.timeout(t);
        }
        for bundle in extra_roots()? {
            let certs = reqwest::Certificate::from_pem_bundle(&bundle)
                .map_err(|e| format!("a CA certificate from SSL_CERT_FILE/SSL_CERT_DIR: {e}"))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder.build().map_err(|e| format!("HTTP client: {e}"))
    }
}

/// A failed request in words that say what to fix: certificate problems
/// (unknown issuer, name mismatch, expired, not yet valid) are named with
/// the remedy; other errors keep reqwest's text, without the URL (it may
/// carry a secret in its query).
pub fn explain(error: &reqwest::Error) -> String {
    if let Some(tls) = certificate_problem(error) {
        return tls;
    }
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(&format!(" for url ({url})"), "");
    }
    // reqwest's own text is terse ("error sending request"): add the causes.
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    text
}

/// The rustls certificate error somewhere in `error`'s causes, explained.
fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = inside(e) {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// `e` itself, or what it wraps through layers of `io::Error` (whose
/// `source` skips the wrapped error; hyper-rustls wraps tokio-rustls's
/// `io::Error(rustls::Error)` in another `io::Error`).
fn inside(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(describe(r));
    }
    let io = e.downcast_ref::<std::io::Error>()?;
    let inner: &(dyn std::error::Error + 'static) = io.get_ref()?;
    inside(inner)
}

/// A rustls error as a sentence with its remedy.
pub fn describe(error: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match error {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "TLS certificate signed by an unknown issuer: the server's CA is not trusted here; add it to SSL_CERT_FILE or SSL_CERT_DIR".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!("TLS certificate not valid for this host name ({c:?}): use the name the certificate was issued for, or reissue it"),
            C::Expired | C::ExpiredContext { .. } => "TLS certificate expired: the provider must renew it (or check this machine's clock)".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "TLS certificate not valid yet: check this machine's clock".into(),
            C::Revoked => "TLS certificate revoked".into(),
            other => format!("TLS certificate rejected: {other:?}"),
        },
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_name_the_fix() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(describe(&e).contains("unknown issuer"));
        assert!(describe(&e).contains("SSL_CERT_FILE"));
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(describe(&e).contains("expired"));
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert!(describe(&e).contains("not valid for this host name"));
        // Wrapped the way tokio-rustls and then hyper-rustls wrap it: an
        // io::Error inside an io::Error.
        let io = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(
            certificate_problem(&io)
                .unwrap_or_default()
                .contains("unknown issuer")
        );
    }

    #[test]
    fn the_client_builds_with_the_platform_roots() {
        assert!(
            ProviderClient {
                timeout: Some(Duration::from_secs(1)),
                pool_per_host: 4
            }
            .build()
            .is_ok()
        );
    }
}
