//! Extra trust anchors from the standard OpenSSL variables:
//! `SSL_CERT_FILE` (a PEM bundle) and `SSL_CERT_DIR` (`:`-separated
//! directories of PEM files). rustls-native-certs reads the same variables
//! but then *replaces* the platform store with them; reading them here too
//! and adding the platform bundle keeps both: the platform's roots plus the
//! extra CAs.

use std::path::{Path, PathBuf};

/// Where distributions keep the platform's CA bundle (the list of
/// openssl-probe, the crate rustls-native-certs uses on Linux).
const PLATFORM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The PEM blocks of `text`, each as its own `-----BEGIN CERTIFICATE-----`
/// block (other blocks, e.g. keys, are skipped).
fn certificates(text: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(len) = rest[start..].find("-----END CERTIFICATE-----") else {
            break;
        };
        let end = start + len + "-----END CERTIFICATE-----".len();
        out.push(rest.as_bytes()[start..end].to_vec());
        rest = &rest[end..];
    }
    out
}

fn read(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
    Ok(certificates(&text))
}

/// The extra CA certificates (PEM, one block each) named by `SSL_CERT_FILE`
/// and `SSL_CERT_DIR`, plus the platform bundle when either is set (so it
/// is not lost). Empty when neither is set: the platform store is used as
/// it is. Errors when `SSL_CERT_FILE` names a file that cannot be read or
/// holds no certificate.
pub fn extra_roots() -> Result<Vec<Vec<u8>>, String> {
    let file = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let dirs = std::env::var_os("SSL_CERT_DIR");
    if file.is_none() && dirs.is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    if let Some(file) = file {
        let found = read(&file)?;
        if found.is_empty() {
            return Err(format!(
                "SSL_CERT_FILE={} holds no PEM certificate",
                file.display()
            ));
        }
        out.extend(found);
    }
    if let Some(dirs) = dirs {
        for dir in std::env::split_paths(&dirs) {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_file() {
                    out.extend(read(&path).unwrap_or_default());
                }
            }
        }
    }
    if let Some(bundle) = PLATFORM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
        out.extend(read(bundle).unwrap_or_default());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_are_split_and_keys_skipped() {
        let text = "junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let certs = certificates(text);
        assert_eq!(certs.len(), 2);
        assert!(String::from_utf8_lossy(&certs[1]).contains("BBB"));
    }
}
