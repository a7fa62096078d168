//! Dev-mode secrets of `moltbot up`: without `MOLTBOT_MASTER_KEY` (or
//! `MOLTBOT_ADMIN_TOKEN`) a random one is generated once and kept in the data
//! directory (`master.key`, `admin.token`, mode 0600), and `moltbot keys`
//! reads the admin token from there too.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use crate::CliError;

/// 32 random bytes from the OS, base64 (standard alphabet).
fn random_base64() -> Result<String, CliError> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The value of `var`, else the content of `<data_dir>/<file>`, else a new
/// random value written there (0600). Returns the value and, when it was
/// generated now, the file.
pub fn dev_secret(
    var: &str,
    data_dir: &Path,
    file: &str,
) -> Result<(String, Option<PathBuf>), CliError> {
    if let Ok(v) = std::env::var(var)
        && !v.trim().is_empty()
    {
        return Ok((v, None));
    }
    let path = data_dir.join(file);
    if let Ok(v) = std::fs::read_to_string(&path) {
        return Ok((v.trim().to_owned(), None));
    }
    std::fs::create_dir_all(data_dir)?;
    let value = random_base64()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(value.as_bytes())?;
    Ok((value, Some(path)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("moltbot-devkeys-{}", std::process::id()));
        let (a, made) = dev_secret("MOLTBOT_TEST_NOT_SET", &dir, "k").unwrap();
        assert!(made.is_some());
        assert_eq!(a.len(), 44);
        let (b, made) = dev_secret("MOLTBOT_TEST_NOT_SET", &dir, "k").unwrap();
        assert_eq!((a, made), (b, None));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
