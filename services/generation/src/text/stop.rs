//! Caller stop sequences over streamed text: text that could still be the
//! start of a stop sequence is held back, and generation ends before the
//! first full occurrence (OpenAI semantics: the stop text is not returned).

/// Stop-sequence state of one sequence.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to do with a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and go on.
    Continue(String),
    /// Emit this text, then finish: a stop sequence was matched.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds new text; returns what may be emitted now.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_owned());
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return StopOutcome::Stop(out);
        }
        // Hold back the longest suffix that is a proper prefix of a stop.
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > keep && self.held.ends_with(&stop[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_partial_matches_and_stops_before_the_sequence() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("Dx"), StopOutcome::Stop("".into()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("a E"), StopOutcome::Continue("a ".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("Ex".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn no_stops_pass_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc"), StopOutcome::Continue("abc".into()));
    }
}
