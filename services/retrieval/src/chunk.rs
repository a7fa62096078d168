//! Chunking: a document is cut into passages of at most `chunk_tokens` encoder
//! tokens, consecutive passages sharing up to `overlap_tokens`, cutting at
//! sentence ends and preferring paragraph ends (blank lines). A sentence
//! longer than a chunk is cut at token boundaries. Each chunk's text is the
//! original slice of the document, formatting kept.

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::RetrievalError;

/// Default chunk size, in tokens.
pub const DEFAULT_CHUNK_TOKENS: u32 = 200;
/// Default overlap, in tokens.
pub const DEFAULT_OVERLAP_TOKENS: u32 = 40;
/// Largest chunk: all-MiniLM-L6-v2 reads 256 tokens, two of them `[CLS]` and
/// `[SEP]` (its `max_seq_length` in sentence-transformers' config).
pub const MAX_CHUNK_TOKENS: u32 = 254;

/// Loads the encoder's `tokenizer.json` for counting: its padding and
/// truncation settings (all-MiniLM-L6-v2 ships `truncation: 128` and fixed
/// padding) are turned off, so every text gets its true token count. Errors
/// with [`RetrievalError::InvalidArgument`] for an unreadable file.
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer, RetrievalError> {
    let mut t = Tokenizer::from_file(path).map_err(|e| {
        RetrievalError::InvalidArgument(format!("cannot load {}: {e}", path.display()))
    })?;
    t.with_padding(None);
    t.with_truncation(None)
        .map_err(|e| RetrievalError::InvalidArgument(format!("tokenizer: {e}")))?;
    Ok(t)
}

/// Chunk size and overlap, in encoder tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Target (and largest) chunk size.
    pub chunk_tokens: u32,
    /// Tokens shared by consecutive chunks.
    pub overlap_tokens: u32,
}

impl Chunking {
    /// Applies the defaults to zero fields and validates. Errors with
    /// [`RetrievalError::InvalidArgument`] for a size over
    /// [`MAX_CHUNK_TOKENS`] or an overlap not smaller than half the size.
    pub fn resolve(chunk_tokens: u32, overlap_tokens: u32) -> Result<Self, RetrievalError> {
        let chunk_tokens = if chunk_tokens == 0 {
            DEFAULT_CHUNK_TOKENS
        } else {
            chunk_tokens
        };
        let overlap_tokens = if overlap_tokens == 0 {
            DEFAULT_OVERLAP_TOKENS.min(chunk_tokens / 4)
        } else {
            overlap_tokens
        };
        if !(8..=MAX_CHUNK_TOKENS).contains(&chunk_tokens) {
            return Err(RetrievalError::InvalidArgument(format!(
                "chunking.chunk_tokens is {chunk_tokens}; it must be in 8..={MAX_CHUNK_TOKENS} (the encoder reads 256 tokens)"
            )));
        }
        if overlap_tokens * 2 > chunk_tokens {
            return Err(RetrievalError::InvalidArgument(format!(
                "chunking.overlap_tokens is {overlap_tokens}; it must be at most half of chunk_tokens ({chunk_tokens})"
            )));
        }
        Ok(Self {
            chunk_tokens,
            overlap_tokens,
        })
    }
}

/// A piece of text that is never cut further: a sentence, or a slice of a
/// sentence longer than a chunk.
#[derive(Debug, Clone)]
struct Unit {
    span: Range<usize>,
    tokens: u32,
    paragraph: usize,
}

/// Byte ranges of sentences within `text[range]`: ends after `.`, `!`, `?`
/// followed by whitespace, and at line breaks (headings, list items).
fn sentences(text: &str, range: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let slice = &text[range.clone()];
    let mut start = 0;
    let mut chars = slice.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end_here = match c {
            '\n' => true,
            '.' | '!' | '?' => chars.peek().is_some_and(|(_, n)| n.is_whitespace()),
            _ => false,
        };
        if end_here {
            let end = i + c.len_utf8();
            if !slice[start..end].trim().is_empty() {
                out.push(range.start + start..range.start + end);
            }
            start = end;
        }
    }
    if !slice[start..].trim().is_empty() {
        out.push(range.start + start..range.end);
    }
    out
}

/// Byte ranges of paragraphs (separated by blank lines).
fn paragraphs(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    let mut blank_run = false;
    for line in text.split_inclusive('\n') {
        let is_blank = line.trim().is_empty();
        if is_blank && !blank_run && offset > start {
            out.push(start..offset);
        }
        if is_blank {
            blank_run = true;
            start = offset + line.len();
        } else {
            blank_run = false;
        }
        offset += line.len();
    }
    if offset > start && !text[start..].trim().is_empty() {
        out.push(start..offset);
    }
    out
}

/// Cuts `text` into chunks. Returns each chunk's text (trimmed). Errors with
/// [`RetrievalError::InvalidArgument`] when the tokenizer fails.
pub fn chunk(
    tokenizer: &Tokenizer,
    text: &str,
    cfg: Chunking,
) -> Result<Vec<String>, RetrievalError> {
    let mut units: Vec<Unit> = Vec::new();
    for (p, para) in paragraphs(text).into_iter().enumerate() {
        for sentence in sentences(text, para) {
            let enc = tokenizer
                .encode(&text[sentence.clone()], false)
                .map_err(|e| RetrievalError::InvalidArgument(format!("cannot tokenize: {e}")))?;
            let n = enc.get_ids().len() as u32;
            if n <= cfg.chunk_tokens {
                units.push(Unit {
                    span: sentence,
                    tokens: n.max(1),
                    paragraph: p,
                });
                continue;
            }
            // A sentence longer than a chunk: cut at token boundaries, by the
            // tokens' character offsets.
            let offsets = enc.get_offsets();
            let step = cfg.chunk_tokens as usize;
            let mut i = 0;
            while i < offsets.len() {
                let j = (i + step).min(offsets.len());
                let from = sentence.start + offsets[i].0;
                let to = if j < offsets.len() {
                    sentence.start + offsets[j].0
                } else {
                    sentence.end
                };
                if to > from {
                    units.push(Unit {
                        span: from..to,
                        tokens: (j - i) as u32,
                        paragraph: p,
                    });
                }
                i = j;
            }
        }
    }
    let mut chunks: Vec<Range<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut tokens = 0u32;
    // Closes the current chunk; with `carry`, its trailing units that fit in
    // the overlap start the next one (not across a paragraph break).
    let close = |current: &mut Vec<usize>,
                 tokens: &mut u32,
                 chunks: &mut Vec<Range<usize>>,
                 carry: bool| {
        if let (Some(&first), Some(&last)) = (current.first(), current.last()) {
            chunks.push(units[first].span.start..units[last].span.end);
        }
        // Carry the trailing units that fit in the overlap, never all of them
        // (each chunk must add something new).
        let mut keep = Vec::new();
        let mut kept = 0;
        for &u in current.iter().rev() {
            if !carry
                || kept + units[u].tokens > cfg.overlap_tokens
                || keep.len() + 1 >= current.len()
            {
                break;
            }
            kept += units[u].tokens;
            keep.push(u);
        }
        keep.reverse();
        *current = keep;
        *tokens = kept;
    };
    for (i, u) in units.iter().enumerate() {
        let new_paragraph = current
            .last()
            .is_some_and(|&last| units[last].paragraph != u.paragraph);
        let over = tokens + u.tokens > cfg.chunk_tokens;
        let paragraph_break = new_paragraph && tokens * 2 >= cfg.chunk_tokens;
        if !current.is_empty() && (over || paragraph_break) {
            close(&mut current, &mut tokens, &mut chunks, !paragraph_break);
            // The carried overlap must leave room for this unit.
            while !current.is_empty() && tokens + u.tokens > cfg.chunk_tokens {
                tokens -= units[current.remove(0)].tokens;
            }
        }
        current.push(i);
        tokens += u.tokens;
    }
    if current
        .iter()
        .any(|&u| chunks.last().is_none_or(|c| units[u].span.end > c.end))
    {
        close(&mut current, &mut tokens, &mut chunks, false);
    }
    Ok(chunks
        .into_iter()
        .map(|r| text[r].trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sentences_and_paragraphs() {
        let text = "# Title\n\nFirst one. Second one! Third?\nLine two\n\n\nLast para.";
        let p = paragraphs(text);
        assert_eq!(p.len(), 3);
        let s: Vec<&str> = sentences(text, p[1].clone())
            .iter()
            .map(|r| text[r.clone()].trim())
            .collect();
        assert_eq!(s, vec!["First one.", "Second one!", "Third?", "Line two"]);
        // "e.g. this" is cut too (a known limit of the rule), "3.14" is not.
        let t = "Pi is 3.14 here. Done";
        let s: Vec<&str> = sentences(t, 0..t.len())
            .iter()
            .map(|r| t[r.clone()].trim())
            .collect();
        assert_eq!(s, vec!["Pi is 3.14 here.", "Done"]);
    }

    #[test]
    fn chunking_limits_are_validated() {
        assert_eq!(
            Chunking::resolve(0, 0).unwrap(),
            Chunking {
                chunk_tokens: 200,
                overlap_tokens: 40
            }
        );
        assert!(Chunking::resolve(300, 0).is_err());
        assert!(Chunking::resolve(100, 60).is_err());
    }
}
