//! Incremental detokenization: turns a growing list of token ids into text
//! deltas that are always whole UTF-8 characters, the scheme of TGI's
//! `decode_token` (a prefix window re-decoded with and without the newest
//! tokens; a delta ending in U+FFFD waits for the tokens that complete it).

use super::ChatTokenizer;
use crate::GenerationError;

/// Decoding state of one sequence.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds `id` and returns the new text it completes (possibly empty), with
    /// the ids consumed by that text.
    pub fn push(
        &mut self,
        tokenizer: &ChatTokenizer,
        id: u32,
    ) -> Result<(String, Vec<u32>), GenerationError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let consumed = self.ids[self.read_offset..].to_vec();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok((full[prefix.len()..].to_owned(), consumed))
        } else {
            Ok((String::new(), Vec::new()))
        }
    }
}
