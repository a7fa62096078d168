//! A minimal Server-Sent Events reader (WHATWG HTML, "Server-sent events",
//! §9.2.6): splits a byte stream into events and yields each event's joined
//! `data:` lines. Comments and other fields are skipped.

/// Accumulates bytes and yields complete events' data.
#[derive(Debug, Default)]
pub struct SseReader {
    buffer: Vec<u8>,
}

impl SseReader {
    /// Feeds bytes; returns the data of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = find_event_end(&self.buffer) {
            let raw: Vec<u8> = self.buffer.drain(..end.0 + end.1).collect();
            let text = String::from_utf8_lossy(&raw[..end.0]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// Position and length of the first blank-line separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks() {
        let mut r = SseReader::default();
        assert!(r.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            r.push(b":1}\n\n: comment\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n"),
            vec![
                "{\"a\":1}".to_owned(),
                "x\ny".to_owned(),
                "[DONE]".to_owned()
            ]
        );
        assert_eq!(
            r.push(b"event: ping\r\ndata: z\r\n\r\n"),
            vec!["z".to_owned()]
        );
    }
}
