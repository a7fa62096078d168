//! Early stopping of fine-tuning on validation accuracy (Prechelt, "Early
//! Stopping — But When?", 1998): after every epoch the head's accuracy on
//! the validation texts is recorded; once `patience` epochs in a row bring
//! no improvement, training stops and the weights of the best epoch are
//! restored from a checkpoint.

use std::path::{Path, PathBuf};

use tch::nn::VarStore;

/// What to do after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// This epoch is the best so far: checkpoint it.
    pub improved: bool,
    /// Stop training.
    pub stop: bool,
}

/// The patience rule, with no model: pure, unit-tested.
#[derive(Debug, Clone, Default)]
pub struct EarlyStop {
    patience: usize,
    best: Option<(usize, f64)>,
    since_best: usize,
    /// Validation accuracy after each epoch (a share).
    pub history: Vec<f64>,
}

impl EarlyStop {
    /// Stops after `patience` epochs without improvement (0: never stops,
    /// still keeps the best epoch).
    pub fn new(patience: usize) -> Self {
        Self {
            patience,
            ..Self::default()
        }
    }

    /// Records epoch `epoch` (0-based) with validation accuracy `accuracy`.
    pub fn record(&mut self, epoch: usize, accuracy: f64) -> Decision {
        self.history.push(accuracy);
        let improved = self.best.is_none_or(|(_, b)| accuracy > b);
        if improved {
            self.best = Some((epoch, accuracy));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        Decision {
            improved,
            stop: self.patience > 0 && self.since_best >= self.patience,
        }
    }

    /// The best epoch (0-based) so far.
    pub fn best_epoch(&self) -> Option<usize> {
        self.best.map(|(e, _)| e)
    }
}

/// A checkpoint of variable stores in a private temporary directory,
/// removed on drop.
pub struct Checkpoint {
    dir: PathBuf,
}

impl Checkpoint {
    /// A fresh checkpoint directory. Errors with the I/O failure.
    pub fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("moltbot-train-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    fn file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{i}.safetensors"))
    }

    /// Saves `stores` (in order).
    pub fn save(&self, stores: &[&VarStore]) -> Result<(), String> {
        for (i, s) in stores.iter().enumerate() {
            s.save(self.file(i)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Loads what [`Checkpoint::save`] saved back into `stores`.
    pub fn restore(&self, stores: &mut [&mut VarStore]) -> Result<(), String> {
        for (i, s) in stores.iter_mut().enumerate() {
            s.load(self.file(i)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_improvement_and_keeps_the_best() {
        let mut s = EarlyStop::new(1);
        let d = |improved, stop| Decision { improved, stop };
        assert_eq!(s.record(0, 0.80), d(true, false));
        assert_eq!(s.record(1, 0.90), d(true, false));
        assert_eq!(s.record(2, 0.90), d(false, true));
        assert_eq!(s.best_epoch(), Some(1));
        let mut s = EarlyStop::new(2);
        s.record(0, 0.9);
        assert!(!s.record(1, 0.8).stop);
        assert!(s.record(2, 0.85).stop);
        let mut never = EarlyStop::new(0);
        never.record(0, 0.9);
        assert!(!never.record(1, 0.1).stop);
        assert_eq!(never.best_epoch(), Some(0));
        assert_eq!(never.history, vec![0.9, 0.1]);
    }
}
