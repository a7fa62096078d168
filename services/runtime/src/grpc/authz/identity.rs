//! Who a mesh peer is: the SPIFFE id (`spiffe://moltbot/<component>`) in
//! the URI subject-alternative-name of the client certificate it presented
//! during the mutual-TLS handshake (SPIFFE X.509-SVID,
//! <https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>,
//! section 2: exactly one URI SAN names the workload).
//!
//! The handshake already proved the certificate chains to the mesh CA
//! (`MOLTBOT_TLS_CA`, see [`super::super::tls`]); this module only reads the
//! name out of it.

use rustls::pki_types::CertificateDer;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// The trust domain of every MoltBot SPIFFE id.
pub const TRUST_DOMAIN: &str = "moltbot";

/// A mesh component, or the operator (the CLI and whoever holds the
/// operator certificate that `moltbot up` writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Principal {
    /// `moltbot-gateway`, the HTTP edge.
    Gateway,
    /// `moltbot-understanding`.
    Understanding,
    /// `moltbot-context`.
    Context,
    /// `moltbot-retrieval`.
    Retrieval,
    /// `moltbot-generation`.
    Generation,
    /// `moltbot-auth-rotation`.
    AuthRotation,
    /// A human operator or their tooling (`moltbot keys`, `moltbot kb`,
    /// grpcurl with the operator certificate).
    Operator,
}

impl Principal {
    /// Every principal, in the order of the authorisation table's docs.
    pub const ALL: [Principal; 7] = [
        Principal::Gateway,
        Principal::Understanding,
        Principal::Context,
        Principal::Retrieval,
        Principal::Generation,
        Principal::AuthRotation,
        Principal::Operator,
    ];

    /// The path segment of its SPIFFE id, e.g. `auth-rotation`.
    pub fn name(self) -> &'static str {
        match self {
            Principal::Gateway => "gateway",
            Principal::Understanding => "understanding",
            Principal::Context => "context",
            Principal::Retrieval => "retrieval",
            Principal::Generation => "generation",
            Principal::AuthRotation => "auth-rotation",
            Principal::Operator => "operator",
        }
    }

    /// `spiffe://moltbot/<name>`.
    pub fn spiffe_id(self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}", self.name())
    }

    /// The principal a SPIFFE id names; `None` for any other URI.
    pub fn from_spiffe_id(uri: &str) -> Option<Self> {
        let name = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?;
        let name = name.strip_prefix('/')?;
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// A peer's identity as its certificate states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No client certificate (a plaintext connection, or TLS without one).
    Anonymous,
    /// A certificate of the mesh CA naming a known principal.
    Principal(Principal),
    /// A certificate of the mesh CA whose URI SAN names no principal (or
    /// none at all): authenticated, but allowed nothing but health. Holds
    /// the URI, or `(no URI SAN)`.
    Unknown(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Anonymous => f.write_str("an anonymous caller (no client certificate)"),
            Identity::Principal(p) => f.write_str(&p.spiffe_id()),
            Identity::Unknown(uri) => write!(f, "{uri}"),
        }
    }
}

/// The identity in a verified peer chain (leaf first); [`Identity::Anonymous`]
/// for an empty chain. A leaf that does not parse is
/// [`Identity::Unknown`] (`(unparseable certificate)`), never an error: the
/// table then allows it nothing.
pub fn from_chain(chain: &[CertificateDer<'_>]) -> Identity {
    let Some(leaf) = chain.first() else {
        return Identity::Anonymous;
    };
    let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else {
        return Identity::Unknown("(unparseable certificate)".into());
    };
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    match uris.as_slice() {
        [uri] => match Principal::from_spiffe_id(uri) {
            Some(p) => Identity::Principal(p),
            None => Identity::Unknown((*uri).to_owned()),
        },
        [] => Identity::Unknown("(no URI SAN)".into()),
        // X509-SVID: exactly one URI SAN. Several is ambiguous: trust none.
        many => Identity::Unknown(many.join(",")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_others_are_refused() {
        for p in Principal::ALL {
            assert_eq!(Principal::from_spiffe_id(&p.spiffe_id()), Some(p));
        }
        assert_eq!(Principal::from_spiffe_id("spiffe://other/gateway"), None);
        assert_eq!(
            Principal::from_spiffe_id("spiffe://moltbot/gateway/x"),
            None
        );
        assert_eq!(Principal::from_spiffe_id("spiffe://moltbotx/gateway"), None);
        assert_eq!(Principal::from_spiffe_id("https://moltbot/gateway"), None);
    }

    #[test]
    fn identities_come_from_the_uri_san() {
        let pki = crate::grpc::pki::DevCa::generate().unwrap();
        let gateway = pki.issue(Principal::Gateway).unwrap();
        assert_eq!(
            from_chain(std::slice::from_ref(&gateway.cert_der)),
            Identity::Principal(Principal::Gateway)
        );
        assert_eq!(from_chain(&[]), Identity::Anonymous);
        assert_eq!(
            from_chain(&[CertificateDer::from(vec![1u8, 2, 3])]),
            Identity::Unknown("(unparseable certificate)".into())
        );
    }
}
