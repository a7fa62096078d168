//! [`Live`]: a value replaced atomically while its readers keep the version
//! they took — how a reloaded configuration reaches the gateway without
//! changing a turn (or a request's authentication) that already started.

use std::sync::{Arc, RwLock};

/// A shared, replaceable `T`. [`Live::get`] hands out the current version
/// as an `Arc` (a read lock held for one clone); [`Live::set`] swaps in the
/// next one. A reader holding an older `Arc` keeps it intact until it
/// drops it.
#[derive(Debug)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    /// A holder starting at `value`.
    pub fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    /// The current version.
    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            // A writer panicked mid-swap: the stored Arc is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the current version with `value`.
    pub fn set(&self, value: T) {
        let next = Arc::new(value);
        match self.0.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_keeps_the_version_it_took() {
        let live = Live::new(String::from("first"));
        let taken = live.get();
        live.set(String::from("second"));
        assert_eq!(*taken, "first");
        assert_eq!(*live.get(), "second");
    }
}
