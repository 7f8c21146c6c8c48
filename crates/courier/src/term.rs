//! Text from runs, steps and dead letters made safe to print to a terminal:
//! a step's output, an error or a dead letter's reason is anyone's to write,
//! and raw escape sequences in it would retitle, clear or recolour the
//! operator's terminal, or hide lines.

use std::borrow::Cow;

/// `text` with every control character but newline and tab, and every
/// bidirectional override, written as its Rust escape (`\u{1b}`).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `println!` of text that may hold what [`printable`] escapes.
macro_rules! out {
    ($($arg:tt)*) => {
        println!("{}", $crate::term::printable(&format!($($arg)*)))
    };
}
pub(crate) use out;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_sent_and_lines_stay_lines() {
        let hostile = "ok\u{1b}]0;pwned\u{7}\u{1b}[2J\r\n\tnext \u{202e}txt.exe\u{9b}";
        assert_eq!(
            printable(hostile),
            "ok\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{d}\n\tnext \\u{202e}txt.exe\\u{9b}"
        );
        assert!(matches!(printable("plain\ttext\nand ünïcode"), Cow::Borrowed(_)));
    }
}
