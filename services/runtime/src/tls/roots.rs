//! Extra trust anchors from the standard OpenSSL variables: `SSL_CERT_FILE`
//! (a PEM bundle) and `SSL_CERT_DIR` (`:`-separated directories of PEM
//! files). rustls-native-certs reads the same variables but then *replaces*
//! the platform store with them; reading them here too and adding the
//! platform bundle keeps both: the platform's roots plus the extra CAs.
//!
//! The bundles are handed out as PEM text, whole: each consumer parses them
//! with its own library (reqwest's `Certificate::from_pem_bundle`, tonic's
//! `Certificate::from_pem`, rustls-pki-types' `pem_slice_iter`).

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, pem::PemObject};

/// Where distributions keep the platform's CA bundle (the list of
/// openssl-probe, the crate rustls-native-certs uses on Linux).
const PLATFORM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// How many PEM certificates `bundle` holds (other blocks, e.g. keys, are
/// not counted).
fn certificates_in(bundle: &[u8]) -> usize {
    CertificateDer::pem_slice_iter(bundle)
        .filter(Result::is_ok)
        .count()
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))
}

/// The PEM bundles named by `SSL_CERT_FILE` and `SSL_CERT_DIR`, plus the
/// platform bundle when either is set (so it is not lost). Empty when
/// neither is set: the platform store is used as it is. Files in
/// `SSL_CERT_DIR` that hold no certificate are skipped. Errors when
/// `SSL_CERT_FILE` names a file that cannot be read or holds no
/// certificate.
pub fn extra_roots() -> Result<Vec<Vec<u8>>, String> {
    let file = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let dirs = std::env::var_os("SSL_CERT_DIR");
    if file.is_none() && dirs.is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    if let Some(file) = file {
        let bundle = read(&file)?;
        if certificates_in(&bundle) == 0 {
            return Err(format!(
                "SSL_CERT_FILE={} holds no PEM certificate",
                file.display()
            ));
        }
        out.push(bundle);
    }
    if let Some(dirs) = dirs {
        for dir in std::env::split_paths(&dirs) {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if let Ok(bundle) = read(&path)
                    && certificates_in(&bundle) > 0
                {
                    out.push(bundle);
                }
            }
        }
    }
    if let Some(bundle) = PLATFORM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
        out.extend(read(bundle).ok());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_counted_and_keys_skipped() {
        let text = "junk\n-----BEGIN CERTIFICATE-----\nQUFB\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nQUFB\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nQkJC\n-----END CERTIFICATE-----\n";
        assert_eq!(certificates_in(text.as_bytes()), 2);
        assert_eq!(certificates_in(b"no pem here"), 0);
    }
}
