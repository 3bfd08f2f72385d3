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

/// Prints rows as aligned columns; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
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
        print(row.clone());
    }
}

/// `println!` that ends quietly on a closed pipe (see [`emit`]).
macro_rules! outln {
    () => {
        $crate::output::emit("")
    };
    ($($arg:tt)*) => {
        $crate::output::emit(&format!($($arg)*))
    };
}
pub(crate) use outln;
