//! A checkpoint's safetensors (`model.safetensors`, or every `*.safetensors`
//! shard of the directory), read one tensor at a time onto the target device
//! and dtype.
//!
//! [`Weights::load`] reads only each file's header (the safetensors format:
//! an 8-byte little-endian header length, then a JSON map of tensor name to
//! dtype, shape and byte offsets, parsed with the `safetensors` crate's
//! `Metadata`); [`Weights::take`] reads one tensor's bytes from the file when
//! it is asked for. The load's peak memory is therefore the model being
//! built plus one source tensor, not the whole checkpoint, and a tensor never
//! asked for — a projection whose int4 codes come from the quantised-weight
//! cache ([`super::quantized`]) — is never read.

use std::{collections::HashMap, os::unix::fs::FileExt, path::Path};

use safetensors::tensor::{Metadata, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::GenerationError;

/// Largest safetensors header accepted, in bytes (the `safetensors` crate's
/// own limit, `MAX_HEADER_SIZE`).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Named tensors of a checkpoint, taken one by one while the model is built.
pub struct Weights {
    files: Vec<std::fs::File>,
    /// Name → (file index, absolute byte offset of the data, its info).
    index: HashMap<String, (usize, u64, TensorInfo)>,
    dir: String,
    device: Device,
    kind: Kind,
}

impl Weights {
    /// Reads the header of every `*.safetensors` file of `dir`. Errors with
    /// [`GenerationError::Load`] when none is there, one is unreadable, or a
    /// header is malformed or points past its file's end.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, GenerationError> {
        let load_err = |reason: String| GenerationError::Load {
            path: dir.display().to_string(),
            reason,
        };
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| load_err(format!("{e}; run `moltbot models prepare`")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(load_err(
                "no *.safetensors file; run `moltbot models prepare`".into(),
            ));
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let err = |reason: String| load_err(format!("{}: {reason}", path.display()));
            let file = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
            let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
            let mut head = [0u8; 8];
            file.read_exact_at(&mut head, 0)
                .map_err(|e| err(format!("header: {e}")))?;
            let n = u64::from_le_bytes(head);
            if n > MAX_HEADER_BYTES || 8 + n > len {
                return Err(err(format!("header of {n} bytes does not fit the file")));
            }
            let mut header = vec![0u8; n as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| err(format!("header: {e}")))?;
            let metadata: Metadata =
                serde_json::from_slice(&header).map_err(|e| err(format!("header: {e}")))?;
            let data_start = 8 + n;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                if start > end || data_start + end as u64 > len {
                    return Err(err(format!("tensor {name} lies past the end of the file")));
                }
                index.insert(name, (files.len(), data_start + start as u64, info.clone()));
            }
            files.push(file);
        }
        Ok(Self {
            files,
            index,
            dir: dir.display().to_string(),
            device,
            kind,
        })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads `name` from its file, converted to the model's dtype and
    /// device. Errors with [`GenerationError::Load`] when it is missing or
    /// unreadable, [`GenerationError::Tensor`] for a dtype libtorch lacks.
    pub fn take(&mut self, name: &str) -> Result<Tensor, GenerationError> {
        let load_err = |reason: String| GenerationError::Load {
            path: self.dir.clone(),
            reason,
        };
        let (file, offset, info) = self
            .index
            .remove(name)
            .ok_or_else(|| load_err(format!("tensor {name} is missing from the checkpoint")))?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.files[file]
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| load_err(format!("tensor {name}: {e}")))?;
        let kind = Kind::try_from(info.dtype)?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(&bytes, &shape, kind)?;
        drop(bytes);
        Ok(t.f_to_kind(self.kind)?
            .f_to_device(self.device)?
            .f_contiguous()?)
    }

    /// Forgets `name` if present (a source weight whose quantised form came
    /// from the cache): it is never read.
    pub fn discard(&mut self, name: &str) {
        self.index.remove(name);
    }

    /// Takes `name` if present.
    pub fn take_optional(&mut self, name: &str) -> Result<Option<Tensor>, GenerationError> {
        if self.contains(name) {
            self.take(name).map(Some)
        } else {
            Ok(None)
        }
    }
}
