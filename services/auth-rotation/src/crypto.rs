//! Secrets at rest: AES-256-GCM (NIST SP 800-38D) under the master key from
//! `MOLTBOT_MASTER_KEY`, a fresh 96-bit random nonce per encryption; stored as
//! `nonce ‖ ciphertext ‖ tag`. The credential id is the associated data, so a
//! ciphertext copied onto another credential's row does not decrypt.

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::Engine;
use rand::RngCore;

use crate::AuthError;

/// Nonce length of AES-GCM, bytes.
const NONCE_BYTES: usize = 12;

/// A secret string (API key, client secret, access token). Its `Debug` and
/// `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it (a header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The master key.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// How to make a master key, quoted in errors.
pub const HOW_TO_MAKE_A_KEY: &str = "set MOLTBOT_MASTER_KEY to 32 random bytes in base64, e.g. `export MOLTBOT_MASTER_KEY=$(openssl rand -base64 32)`";

impl MasterKey {
    /// Parses 32 bytes given as base64 (standard alphabet) or 64 hex digits.
    /// Errors with [`AuthError::Config`] saying how to make one.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| {
                    AuthError::Config(format!(
                        "MOLTBOT_MASTER_KEY is not valid hex; {HOW_TO_MAKE_A_KEY}"
                    ))
                })?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| {
                    AuthError::Config(format!(
                        "MOLTBOT_MASTER_KEY is neither base64 nor hex; {HOW_TO_MAKE_A_KEY}"
                    ))
                })?
        };
        if bytes.len() != 32 {
            return Err(AuthError::Config(format!(
                "MOLTBOT_MASTER_KEY is {} bytes; AES-256 needs 32: {HOW_TO_MAKE_A_KEY}",
                bytes.len()
            )));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
            AuthError::Config(format!("bad MOLTBOT_MASTER_KEY; {HOW_TO_MAKE_A_KEY}"))
        })?;
        Ok(Self { cipher })
    }

    /// A new random key in base64 (for `moltbot up`'s dev mode).
    pub fn generate_base64() -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Encrypts `secret` bound to `credential_id`.
    pub fn seal(&self, credential_id: &str, secret: &Secret) -> Result<Vec<u8>, AuthError> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.expose().as_bytes(),
                    aad: credential_id.as_bytes(),
                },
            )
            .map_err(|_| AuthError::Crypto("encryption failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend(ct);
        Ok(out)
    }

    /// Decrypts what [`MasterKey::seal`] made for `credential_id`. Errors with
    /// [`AuthError::Crypto`] for a wrong key or a tampered ciphertext.
    pub fn open(&self, credential_id: &str, sealed: &[u8]) -> Result<Secret, AuthError> {
        if sealed.len() < NONCE_BYTES + 16 {
            return Err(AuthError::Crypto("ciphertext too short".into()));
        }
        let (nonce, ct) = sealed.split_at(NONCE_BYTES);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: credential_id.as_bytes(),
                },
            )
            .map_err(|_| {
                AuthError::Crypto(format!(
                    "cannot decrypt credential {credential_id}: wrong MOLTBOT_MASTER_KEY or tampered data"
                ))
            })?;
        String::from_utf8(plain)
            .map(Secret)
            .map_err(|_| AuthError::Crypto("decrypted secret is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let key = MasterKey::parse(&MasterKey::generate_base64()).unwrap();
        let s = Secret::new("sk-live-123");
        let sealed = key.seal("cred-1", &s).unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"sk-live-123"));
        assert_eq!(key.open("cred-1", &sealed).unwrap(), s);
        assert!(key.open("cred-2", &sealed).is_err());
        let other = MasterKey::parse(&"ab".repeat(32)).unwrap();
        assert!(other.open("cred-1", &sealed).is_err());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(
            MasterKey::parse("short")
                .unwrap_err()
                .to_string()
                .contains("openssl rand")
        );
    }
}
