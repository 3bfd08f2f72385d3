//! What the CLI prints: `--json` lines (in the shapes the HTTP API uses, defined once in
//! `redrive_server::json`) and plain tables.

use serde::Serialize;

pub use redrive_server::json::{DeadJson, GroupJson, QueueJson, payload_fields, rfc3339};

/// Writes one line to stdout. A closed pipe (`redrive dlq list | head`) ends the
/// process quietly, as it does for other Unix tools, instead of panicking.
pub fn emit(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Prints one JSON value per line.
pub fn json_line<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => emit(&line),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

/// One line of an error message for a table cell: the first line, shortened.
pub fn one_line(text: &str, max: usize) -> String {
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if first.chars().count() <= max {
        first.to_owned()
    } else {
        let cut: String = first.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// `text` with every control character a terminal could act on written visibly:
/// `ESC` as `\x1b`, `CR` as `\r`, a C1 control as `\u{9b}`. Dead letters carry
/// whatever their producer wrote; printed raw, `ESC ] 0;…` would retitle the
/// operator's terminal and `ESC [2J` clear it. Newlines and tabs are kept.
pub fn visible(text: &str) -> std::borrow::Cow<'_, str> {
    let acts = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(acts) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            c if acts(c) && u32::from(c) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if acts(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Prints rows as aligned columns; the last column is not padded. Cells are shown
/// with [`visible`].
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| visible(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let print = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let line: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        emit(line.join("  ").trim_end());
    };
    print(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        print(row);
    }
}

/// `println!` for human output: control characters shown with [`visible`], and a closed
/// pipe ends the process quietly (see [`emit`]).
macro_rules! outln {
    () => {
        $crate::output::emit("")
    };
    ($($arg:tt)*) => {
        $crate::output::emit(&$crate::output::visible(&format!($($arg)*)))
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::visible;

    #[test]
    fn terminal_controls_are_shown_not_acted_on() {
        for (raw, shown) in [
            ("plain text, é ✓", "plain text, é ✓"),
            ("line one\nline two\ttab", "line one\nline two\ttab"),
            ("\u{1b}]0;pwned\u{7}", "\\x1b]0;pwned\\x07"),
            ("\u{1b}[2J\u{1b}[31mred", "\\x1b[2J\\x1b[31mred"),
            ("fake\roverwrite", "fake\\roverwrite"),
            ("c1 \u{9b}2J del \u{7f}", "c1 \\u{9b}2J del \\x7f"),
        ] {
            assert_eq!(visible(raw), shown, "{raw:?}");
        }
    }
}
