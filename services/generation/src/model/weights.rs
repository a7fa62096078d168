//! Loads a checkpoint's safetensors (`model.safetensors`, or every
//! `*.safetensors` shard of the directory) into named tensors on the target
//! device and dtype.

use std::{collections::HashMap, path::Path};

use tch::{Device, Kind, Tensor};

use crate::GenerationError;

/// Named tensors of a checkpoint, taken one by one while the model is built.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    dir: String,
    device: Device,
    kind: Kind,
}

impl Weights {
    /// Reads every `*.safetensors` file of `dir`. Errors with
    /// [`GenerationError::Load`] when none is there or one is unreadable.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, GenerationError> {
        let load_err = |reason: String| GenerationError::Load {
            path: dir.display().to_string(),
            reason,
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| load_err(format!("{e}; run `moltbot models prepare`")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(load_err(
                "no *.safetensors file; run `moltbot models prepare`".into(),
            ));
        }
        let mut tensors = HashMap::new();
        for file in files {
            for (name, t) in Tensor::read_safetensors(&file).map_err(|e| load_err(e.to_string()))? {
                tensors.insert(name, t);
            }
        }
        Ok(Self {
            tensors,
            dir: dir.display().to_string(),
            device,
            kind,
        })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes `name`, converted to the model's dtype and device. Errors with
    /// [`GenerationError::Load`] when it is missing.
    pub fn take(&mut self, name: &str) -> Result<Tensor, GenerationError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| GenerationError::Load {
                path: self.dir.clone(),
                reason: format!("tensor {name} is missing from the checkpoint"),
            })?;
        Ok(t.f_to_kind(self.kind)?
            .f_to_device(self.device)?
            .f_contiguous()?)
    }

    /// Drops `name` if present (a source weight whose quantised form came
    /// from the cache), so the load's peak memory does not hold it.
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
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
