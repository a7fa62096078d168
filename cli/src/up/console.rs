//! What `moltbot up` prints: one human-readable line per state change or
//! progress step, `up: [tag] message`, coloured on a terminal (green for
//! ready, yellow for a warning, red for a failure; `NO_COLOR` turns colour
//! off, as no-color.org asks). The services' own JSON logs never reach the
//! terminal: they go to `<log-dir>/<service>.log` ([`super::supervisor`]),
//! read with `moltbot logs`.

use std::io::IsTerminal;

/// How a line reads: its colour on a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Progress: no colour.
    Info,
    /// Something is ready: green.
    Good,
    /// Degraded, retried or restarted: yellow.
    Warn,
    /// Failed: red.
    Bad,
}

/// Whether stderr gets ANSI colours: a terminal, and `NO_COLOR` unset.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The line for `tag` and `message` in `tone`, with colour codes when
/// `colour`.
pub fn line(tone: Tone, tag: &str, message: &str, colour: bool) -> String {
    let code = match tone {
        Tone::Info => "",
        Tone::Good => "32",
        Tone::Warn => "33",
        Tone::Bad => "31",
    };
    let tag = if tag.is_empty() {
        String::new()
    } else {
        format!("[{tag}] ")
    };
    if colour && !code.is_empty() {
        format!("up: \x1b[{code}m{tag}{message}\x1b[0m")
    } else {
        format!("up: {tag}{message}")
    }
}

/// Prints one line to stderr.
pub fn say(tone: Tone, tag: &str, message: impl AsRef<str>) {
    eprintln!("{}", line(tone, tag, message.as_ref(), colour()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_coloured_lines() {
        assert_eq!(
            line(Tone::Good, "ready", "chat is served", false),
            "up: [ready] chat is served"
        );
        assert_eq!(
            line(Tone::Bad, "x", "failed", true),
            "up: \x1b[31m[x] failed\x1b[0m"
        );
        assert_eq!(line(Tone::Info, "", "plain", true), "up: plain");
    }
}
