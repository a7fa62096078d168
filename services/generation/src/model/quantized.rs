//! The quantised-weight cache: int4 codes fitted once, reused by every later
//! load of the same checkpoint.
//!
//! Fitting int4 codes ([`super::linear::int4_codes`]: nine clipping ranges
//! and a least-squares fit per group of every projection) takes about two
//! minutes for the 0.5B model on the 2-core machine; reading its result back
//! takes seconds. The cache is one safetensors file per (checkpoint,
//! quantisation settings) in `<model dir>/.quantized/`, named
//! `int4-g<group>-<key>.safetensors` where `key` is the first 16 hex digits
//! of the SHA-256 over [`FORMAT`], the settings and every source
//! `*.safetensors` file's name and content digest: new weights or new
//! settings give a new file, never a stale one. Per projection it holds two tensors:
//! `<name>.codes`, `[out, in/2]` uint8 (two 4-bit codes a byte, the even
//! input feature in the low nibble), and `<name>.scales_zeros`, `[in/group,
//! out, 2]` bf16. libtorch's packed layout is not stored (it is private to
//! the libtorch version); packing from the codes is cheap.
//!
//! A cache that cannot be written (a read-only model directory) is logged
//! and skipped: the model still loads, quantising at every start. A cache
//! file that does not read back is ignored and rewritten.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    time::Instant,
};

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::{Linear, WeightFormat, linear::int4_codes};
use crate::GenerationError;

/// Version of the file layout; part of the key, so a layout change never
/// reads an old file.
pub const FORMAT: &str = "moltbot-int4-codes-v1";

/// Directory of the cache files inside a model directory.
pub const DIR: &str = ".quantized";

/// Int4 codes of one checkpoint under one group size: read from the cache
/// file when it exists, fitted (and remembered for [`Int4Cache::finish`])
/// otherwise.
pub struct Int4Cache {
    path: PathBuf,
    group: i64,
    stored: HashMap<String, Tensor>,
    hit: bool,
    fitted: Vec<(String, Tensor)>,
    started: Instant,
}

impl Int4Cache {
    /// The cache of the checkpoint in `dir` for int4 groups of `group`
    /// input features. Hashes the source weights (a few seconds a GB) unless
    /// their digest is remembered ([`digest`]).
    /// Errors with [`GenerationError::Load`] when a source file cannot be
    /// read.
    pub fn open(dir: &Path, group: i64) -> Result<Self, GenerationError> {
        let started = Instant::now();
        let path = dir
            .join(DIR)
            .join(format!("int4-g{group}-{}.safetensors", key(dir, group)?));
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "int4 cache key computed"
        );
        let stored = match path.exists() {
            false => HashMap::new(),
            true => match Tensor::read_safetensors(&path) {
                Ok(tensors) => tensors.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "quantised-weight cache unreadable; quantising again");
                    HashMap::new()
                }
            },
        };
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            tensors = stored.len(),
            "int4 cache read"
        );
        Ok(Self {
            hit: !stored.is_empty(),
            path,
            group,
            stored,
            fitted: Vec::new(),
            started,
        })
    }

    /// Whether the cache file was there and read.
    pub fn hit(&self) -> bool {
        self.hit
    }

    /// The cache file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The int4 projection `name`: from the cache when stored, else fitted
    /// from the dense `[out, in]` weight `dense()` returns (only called on a
    /// miss, so a hit never builds it). Errors with the tensor error of the
    /// fit or the packing.
    pub fn linear(
        &mut self,
        name: &str,
        dense: impl FnOnce() -> Result<Tensor, GenerationError>,
    ) -> Result<Linear, GenerationError> {
        let codes_key = format!("{name}.codes");
        let sz_key = format!("{name}.scales_zeros");
        if let (Some(packed), Some(sz)) =
            (self.stored.remove(&codes_key), self.stored.remove(&sz_key))
        {
            return Ok(Linear::from_int4_codes(&unpack(&packed)?, sz)?);
        }
        let (codes, scales_zeros) = int4_codes(&dense()?, self.group)?;
        self.fitted.push((codes_key, pack(&codes)?));
        self.fitted.push((sz_key, scales_zeros.shallow_clone()));
        Ok(Linear::from_int4_codes(&codes, scales_zeros)?)
    }

    /// Writes what was fitted (when anything was) to the cache file,
    /// through a temporary file renamed into place so a reader never sees
    /// half a file; logs the outcome. Never fails: a cache that cannot be
    /// written only costs the next start its fit.
    pub fn finish(self) {
        let seconds = self.started.elapsed().as_secs_f64();
        if self.fitted.is_empty() {
            tracing::info!(path = %self.path.display(), seconds, "int4 weights read from the quantised-weight cache");
            return;
        }
        match write_atomically(&self.path, &self.fitted) {
            Ok(bytes) => {
                self.remove_stale();
                tracing::info!(
                path = %self.path.display(),
                bytes,
                seconds,
                "int4 weights quantised and cached; later loads read them back"
                );
            }
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "int4 weights quantised but not cached (the next load quantises again)"
            ),
        }
    }
}

impl Int4Cache {
    /// Removes the cache files of this group size for other weights (an
    /// earlier version of the checkpoint): only the current one is read
    /// again.
    fn remove_stale(&self) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        let prefix = format!("int4-g{}-", self.group);
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let other = entry.file_name();
            let other = other.to_string_lossy();
            if other.starts_with(&prefix)
                && other.ends_with(".safetensors")
                && *other != *name.to_string_lossy()
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether `format` is served through an [`Int4Cache`], and its group.
pub fn int4_group(format: WeightFormat) -> Option<i64> {
    match format {
        WeightFormat::Int4 { group } => Some(group),
        _ => None,
    }
}

/// The first 16 hex digits of SHA-256 over [`FORMAT`], `group` and every
/// `*.safetensors` file of `dir` (name and content digest, [`digest`]) in
/// name order.
fn key(dir: &Path, group: i64) -> Result<String, GenerationError> {
    let load_err = |reason: String| GenerationError::Load {
        path: dir.display().to_string(),
        reason,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| load_err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut hash = Sha256::new();
    hash.update(FORMAT.as_bytes());
    hash.update(group.to_le_bytes());
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        hash.update(name.unwrap_or_default().as_bytes());
        hash.update(digest(&file).map_err(|e| load_err(format!("{}: {e}", file.display())))?);
    }
    let digest = hash.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 of a file's bytes, remembered in `<dir>/.quantized/<name>.sha256`
/// beside the file's length, modification time and inode: a file that none
/// of those say changed is not read again (hashing the 2.5 GB f32
/// checkpoint takes about 7 s of CPU on the 2-core machine, the rest of a
/// cached load about 3 s). Rewriting the file — `moltbot models prepare`,
/// a copy, an editor — changes its modification time and so its digest is
/// recomputed: the same rule make and ccache rely on.
fn digest(file: &Path) -> std::io::Result<[u8; 32]> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(file)?;
    let stamp = format!(
        "{} {} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    );
    let memo = file.parent().map(|d| {
        d.join(DIR).join(format!(
            "{}.sha256",
            file.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ))
    });
    if let Some(text) = memo.as_ref().and_then(|m| std::fs::read_to_string(m).ok())
        && let Some((seen, hex)) = text.trim().rsplit_once(' ')
        && seen == stamp
        && let Some(bytes) = from_hex(hex)
    {
        return Ok(bytes);
    }
    let mut f = std::fs::File::open(file)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let bytes: [u8; 32] = hash.finalize().into();
    if let Some(memo) = memo {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // A memo that cannot be written only costs the next load a hash.
        let _ = memo
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&memo, format!("{stamp} {hex}\n")));
    }
    Ok(bytes)
}

/// 64 hex digits as 32 bytes.
fn from_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Two codes a byte: `[out, in]` uint8 codes in `0..=15` to `[out, in/2]`,
/// the even input feature in the low nibble.
fn pack(codes: &Tensor) -> Result<Tensor, tch::TchError> {
    let size = codes.size();
    let (out, inner) = (size[0], size[1]);
    let pairs = codes.f_to_kind(Kind::Int)?.f_reshape([out, inner / 2, 2])?;
    let low = pairs.f_select(2, 0)?;
    let high = pairs.f_select(2, 1)?;
    low.f_add(&high.f_mul_scalar(16)?)?
        .f_to_kind(Kind::Uint8)?
        .f_contiguous()
}

/// The inverse of [`pack`]: `[out, in/2]` to `[out, in]` uint8 codes.
fn unpack(packed: &Tensor) -> Result<Tensor, tch::TchError> {
    let size = packed.size();
    let (out, half) = (size[0], size[1]);
    let p = packed.f_to_kind(Kind::Int)?;
    let low = p.f_remainder(16)?;
    let high = p.f_floor_divide_scalar(16)?;
    Tensor::f_stack(&[low, high], 2)?
        .f_reshape([out, half * 2])?
        .f_to_kind(Kind::Uint8)
}

/// Writes `tensors` to `path` through `path.tmp-<pid>` and a rename;
/// returns the file's size in bytes.
fn write_atomically(path: &Path, tensors: &[(String, Tensor)]) -> Result<u64, String> {
    let dir = path.parent().ok_or("the cache path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    Tensor::write_safetensors(tensors, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_packing() -> Result<(), tch::TchError> {
        let codes = Tensor::f_randint(16, [6, 64], (Kind::Uint8, tch::Device::Cpu))?;
        let back = unpack(&pack(&codes)?)?;
        assert_eq!(back.size(), vec![6, 64]);
        assert!(back.f_equal(&codes)?);
        Ok(())
    }

    #[test]
    fn a_second_load_reads_the_fitted_codes_back_and_computes_the_same()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("moltbot-int4-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let w = Tensor::f_randn([64, 128], (Kind::Float, tch::Device::Cpu))?;
        Tensor::write_safetensors(&[("w", &w)], dir.join("model.safetensors"))?;
        let x = Tensor::f_randn([3, 128], (Kind::BFloat16, tch::Device::Cpu))?;

        let mut first = Int4Cache::open(&dir, 32)?;
        assert!(!first.hit());
        let fitted = first.linear("w", || Ok(w.shallow_clone()))?;
        let path = first.path().to_path_buf();
        first.finish();
        assert!(path.exists(), "the fit is cached");

        let mut second = Int4Cache::open(&dir, 32)?;
        assert!(second.hit());
        let read = second.linear("w", || Err(GenerationError::Tensor("refitted".into())))?;
        assert!(
            fitted
                .forward(&x, None)?
                .f_equal(&read.forward(&x, None)?)?
        );

        // Other settings or other weights: another key, no stale reuse.
        assert!(!Int4Cache::open(&dir, 64)?.hit());
        Tensor::write_safetensors(&[("w", &w.f_neg()?)], dir.join("model.safetensors"))?;
        assert!(!Int4Cache::open(&dir, 32)?.hit());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
