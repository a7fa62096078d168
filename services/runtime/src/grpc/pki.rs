//! A development certificate authority for the mesh's mutual TLS, made with
//! rcgen: what `moltbot up` uses on one machine where no cert-manager
//! issues certificates (the Helm chart uses cert-manager, see
//! docs/security.md).
//!
//! The CA lives only in memory: its private key is never written, and each
//! `moltbot up` makes a new one and re-issues every leaf, so a copied leaf
//! stops working at the next start. Leaves are ECDSA P-256 (rcgen's
//! default), valid for [`LEAF_DAYS`] days, with SANs `127.0.0.1`,
//! `localhost` and the component's SPIFFE id, usable as server and client.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use super::authz::Principal;
use crate::RuntimeError;

/// Validity of issued leaves, days.
pub const LEAF_DAYS: i64 = 30;

/// An in-memory CA.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate issued to a principal.
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Certificate, DER.
    pub cert_der: CertificateDer<'static>,
}

/// Where [`DevCa::write`] puts the files of one principal.
#[derive(Debug, Clone)]
pub struct Files {
    /// `<dir>/<name>.pem`.
    pub cert: PathBuf,
    /// `<dir>/<name>.key` (mode 0600).
    pub key: PathBuf,
    /// `<dir>/ca.pem`, the CA every peer is verified against.
    pub ca: PathBuf,
}

impl Files {
    /// The files of the principal named `name` (e.g. `operator`,
    /// `auth-rotation`) under `dir`.
    pub fn of(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }
}

fn pki_error(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Config(format!("dev CA: {what}: {e}"))
}

impl DevCa {
    /// A new self-signed CA (`CN=MoltBot dev CA`). Errors with
    /// [`RuntimeError::Config`] when key generation fails.
    pub fn generate() -> Result<Self, RuntimeError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("parameters", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "MoltBot dev CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| pki_error("key", e))?;
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key)
                .map_err(|e| pki_error("self-signing", e))?,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `principal`. Errors with [`RuntimeError::Config`] when
    /// signing fails.
    pub fn issue(&self, principal: Principal) -> Result<Issued, RuntimeError> {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .map_err(|e| pki_error("parameters", e))?;
        let uri = rcgen::string::Ia5String::try_from(principal.spiffe_id())
            .map_err(|e| pki_error("SPIFFE id", e))?;
        params.subject_alt_names.push(SanType::URI(uri));
        params
            .distinguished_name
            .push(DnType::CommonName, principal.name());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(LEAF_DAYS);
        let key = KeyPair::generate().map_err(|e| pki_error("key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| pki_error("signing", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }

    /// Writes `ca.pem` and, for every principal, `<name>.pem` and
    /// `<name>.key` into `dir` ([`Files::of`]; created; keys mode 0600,
    /// replaced by rename so a reader never sees half a file). Errors with
    /// [`RuntimeError::Config`] naming the file that could not be written.
    pub fn write(&self, dir: &Path) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| pki_error(&dir.display().to_string(), e))?;
        write_file(&dir.join("ca.pem"), &self.ca_pem(), false)?;
        for p in Principal::ALL {
            let issued = self.issue(p)?;
            let files = Files::of(dir, p.name());
            write_file(&files.key, &issued.key_pem, true)?;
            write_file(&files.cert, &issued.cert_pem, false)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), RuntimeError> {
    use std::io::Write;
    let fail = |e: std::io::Error| pki_error(&path.display().to_string(), e);
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(fail)?;
    file.write_all(contents.as_bytes()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}
