//! What the CLI prints. Lists are tables, one object is `key: value` lines, and `--json`
//! prints the API's answer as it is instead, for scripts. Everything goes through these
//! helpers, which return the write error: stdout closed early (`fleetgate devices list |
//! head -1`) ends the command quietly instead of panicking ([`super::report`]).

use std::fmt::Display;
use std::io::Write;

use serde_json::Value;

/// How a command prints what it got.
#[derive(Debug, Clone, Copy, Default)]
pub struct Out {
    /// Print the API's JSON answers instead of tables and fields.
    pub json: bool,
}

/// Writes one line to stdout.
pub fn line(text: impl Display) -> std::io::Result<()> {
    writeln!(std::io::stdout().lock(), "{text}")
}

/// Writes a JSON value, pretty.
pub fn json(v: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    line(text)
}

/// A JSON value as a table cell or field: strings bare, nothing as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::Array(a) if a.is_empty() => "-".to_owned(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(m) if m.is_empty() => "-".to_owned(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (None, Some(i), _) => i.to_string(),
            // At most 4 decimals: a table is for reading; --json has every digit.
            (None, None, Some(f)) => {
                let text = format!("{f:.4}");
                let text = text.trim_end_matches('0').trim_end_matches('.');
                if text == "-0" {
                    "0".to_owned()
                } else {
                    text.to_owned()
                }
            }
            _ => n.to_string(),
        },
    }
}

/// Columns sized to their widest cell; the last column is not padded.
#[derive(Debug)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let mut out = std::io::stdout().lock();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, c) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    text.push_str(c);
                } else {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    text.push_str(c);
                    text.push_str(&" ".repeat(pad + 2));
                }
            }
            writeln!(out, "{}", text.trim_end())?;
        }
        Ok(())
    }
}

/// `key: value` lines, the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> std::io::Result<()> {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = std::io::stdout().lock();
    for (k, v) in pairs {
        writeln!(out, "{:<width$} {v}", format!("{k}:"))?;
    }
    Ok(())
}
