//! Text a client chose (an xDS node id, a NACK's message, a type URL or a
//! nonce), made safe to log and to keep.
//!
//! Every log line that shows client text shows it through [`loggable`]: at
//! most [`MAX_LOGGED_CHARS`] characters, with control characters (newlines,
//! ANSI escape sequences' `ESC`) and other unprintable characters written as
//! visible escapes (`\n`, `\u{1b}`), so a client can neither flood the log
//! through one field nor forge a line of its own. What is kept for Admin goes
//! through [`kept`]: at most [`MAX_KEPT_BYTES`], cut on a character boundary.

use std::fmt::{self, Write};

/// The most characters of one piece of client text a log line shows.
pub const MAX_LOGGED_CHARS: usize = 256;

/// The most bytes of one piece of client text kept for Admin (an xDS node id,
/// cluster or user agent, the message of the last NACK of each type).
pub const MAX_KEPT_BYTES: usize = 1024;

/// Client text as a log shows it; see the module docs.
#[derive(Clone, Copy)]
pub struct Loggable<'a>(&'a str);

/// `text`, truncated and escaped for a log line.
pub fn loggable(text: &str) -> Loggable<'_> {
    Loggable(text)
}

impl fmt::Display for Loggable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_LOGGED_CHARS) {
            // `escape_debug` writes `\n`, `\u{1b}` and the like for every
            // character that is not printable; printable ones pass as they are.
            for escaped in c.escape_debug() {
                f.write_char(escaped)?;
            }
        }
        if let Some((cut, _)) = chars.next() {
            write!(f, "…[{} more bytes]", self.0.len() - cut)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Loggable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `text` cut to at most [`MAX_KEPT_BYTES`] on a character boundary, with
/// `…` in place of what was cut.
pub fn kept(text: &str) -> String {
    if text.len() <= MAX_KEPT_BYTES {
        return text.to_owned();
    }
    let ellipsis = '…';
    let mut cut = MAX_KEPT_BYTES - ellipsis.len_utf8();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut short = String::with_capacity(cut + ellipsis.len_utf8());
    short.push_str(&text[..cut]);
    short.push(ellipsis);
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_and_ansi_escapes_cannot_start_a_log_line() {
        let forged = "bad config\n\u{1b}[31mERROR\u{1b}[0m lb_server: FORGED\r\u{202e}";
        let shown = loggable(forged).to_string();
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{shown:?}"
        );
        assert_eq!(
            shown,
            r"bad config\n\u{1b}[31mERROR\u{1b}[0m lb_server: FORGED\r\u{202e}"
        );
    }

    #[test]
    fn long_text_is_cut_to_the_limit_and_says_how_much_was_cut() {
        let long = "é".repeat(1000);
        let shown = loggable(&long).to_string();
        assert_eq!(
            shown.chars().filter(|&c| c == 'é').count(),
            MAX_LOGGED_CHARS
        );
        assert!(shown.ends_with("…[1488 more bytes]"), "{shown}");
        let exact = "a".repeat(MAX_LOGGED_CHARS);
        assert_eq!(loggable(&exact).to_string(), exact);
    }

    #[test]
    fn escaping_cannot_grow_a_line_past_a_bound() {
        let worst = "\u{1b}".repeat(100_000);
        let shown = loggable(&worst).to_string();
        assert!(shown.len() <= MAX_LOGGED_CHARS * "\\u{10ffff}".len() + 32);
    }

    #[test]
    fn kept_text_is_cut_on_a_char_boundary() {
        assert_eq!(kept("short"), "short");
        let long = "€".repeat(MAX_KEPT_BYTES);
        let short = kept(&long);
        assert!(short.len() <= MAX_KEPT_BYTES, "{}", short.len());
        assert!(short.ends_with('…'));
        assert!(short.trim_end_matches('…').chars().all(|c| c == '€'));
    }
}
