//! Walking a merged TOML table: typed getters that record every problem with its path instead
//! of stopping at the first one.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use toml::{Table, Value};

use crate::ConfigError;

#[derive(Debug, Default)]
pub(crate) struct Problems {
    errors: Vec<ConfigError>,
}

impl Problems {
    pub(crate) fn push(&mut self, path: String, message: String) {
        self.errors.push(ConfigError { path, message });
    }

    pub(crate) fn into_result<T>(self, value: T) -> Result<T, Vec<ConfigError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

pub(crate) fn internal(message: &str) -> ConfigError {
    ConfigError {
        path: String::new(),
        message: format!("internal: embedded default is not valid TOML: {message}"),
    }
}

/// Merges `user` over `base`: tables merge key by key, anything else (arrays included) replaces.
pub(crate) fn merge(base: &mut Table, user: Table) {
    for (key, value) in user {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(u)) => merge(b, u),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// One table of the config, and which of its keys have been read.
#[derive(Debug)]
pub(crate) struct Section<'t> {
    path: String,
    table: Option<&'t Table>,
    used: Vec<&'t str>,
}

impl<'t> Section<'t> {
    pub(crate) fn root(table: &'t Table) -> Self {
        Section {
            path: String::new(),
            table: Some(table),
            used: Vec::new(),
        }
    }

    /// A table found at `path` (an array item, say).
    pub(crate) fn at(path: String, table: &'t Table) -> Self {
        Section {
            path,
            table: Some(table),
            used: Vec::new(),
        }
    }

    /// The items of an array of any values, each with its path; a missing key is an error.
    pub(crate) fn array(&mut self, p: &mut Problems, key: &str) -> Vec<(String, &'t Value)> {
        let path = self.key_path(key);
        match self.required(p, key) {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{path}[{i}]"), v))
                .collect(),
            Some(other) => {
                p.push(
                    path,
                    format!("expected an array, found {}", other.type_str()),
                );
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// The raw value of `key`, without marking it read.
    pub(crate) fn raw(&self, key: &str) -> Option<&'t Value> {
        self.table?.get(key)
    }

    /// Whether the table has `key` (without reading it).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    pub(crate) fn boolean(&mut self, p: &mut Problems, key: &str) -> bool {
        match self.required(p, key) {
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.error(
                    p,
                    key,
                    &format!("expected true or false, found {}", other.type_str()),
                );
                false
            }
            None => false,
        }
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn error(&self, p: &mut Problems, key: &str, message: &str) {
        p.push(self.key_path(key), message.to_owned());
    }

    fn get(&mut self, key: &str) -> Option<&'t Value> {
        let (k, v) = self.table?.get_key_value(key)?;
        self.used.push(k.as_str());
        Some(v)
    }

    fn required(&mut self, p: &mut Problems, key: &str) -> Option<&'t Value> {
        let value = self.get(key);
        if value.is_none() && self.table.is_some() {
            self.error(p, key, "missing");
        }
        value
    }

    pub(crate) fn section(&mut self, p: &mut Problems, key: &str) -> Section<'t> {
        let path = self.key_path(key);
        let table = match self.required(p, key) {
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                p.push(
                    path.clone(),
                    format!("expected a table, found {}", other.type_str()),
                );
                None
            }
            None => None,
        };
        Section {
            path,
            table,
            used: Vec::new(),
        }
    }

    /// An array of tables (`[[key]]`); a missing key is an empty array.
    pub(crate) fn tables(&mut self, p: &mut Problems, key: &str) -> Vec<Section<'t>> {
        let path = self.key_path(key);
        match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let path = format!("{path}[{i}]");
                    match item {
                        Value::Table(t) => Some(Section {
                            path,
                            table: Some(t),
                            used: Vec::new(),
                        }),
                        other => {
                            p.push(
                                path,
                                format!("expected a table, found {}", other.type_str()),
                            );
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                p.push(
                    path,
                    format!("expected an array of tables, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    pub(crate) fn string(&mut self, p: &mut Problems, key: &str) -> String {
        match self.required(p, key) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                self.error(
                    p,
                    key,
                    &format!("expected a string, found {}", other.type_str()),
                );
                String::new()
            }
            None => String::new(),
        }
    }

    pub(crate) fn strings(&mut self, p: &mut Problems, key: &str) -> Vec<String> {
        match self.required(p, key) {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::String(s) => Some(s.clone()),
                    other => {
                        let found = other.type_str();
                        self.error(
                            p,
                            &format!("{key}[{i}]"),
                            &format!("expected a string, found {found}"),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.error(
                    p,
                    key,
                    &format!("expected an array of strings, found {}", other.type_str()),
                );
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    pub(crate) fn usize(
        &mut self,
        p: &mut Problems,
        key: &str,
        range: RangeInclusive<usize>,
    ) -> usize {
        self.int(p, key, range)
    }

    pub(crate) fn u64(&mut self, p: &mut Problems, key: &str, range: RangeInclusive<u64>) -> u64 {
        self.int(p, key, range)
    }

    fn int<T>(&mut self, p: &mut Problems, key: &str, range: RangeInclusive<T>) -> T
    where
        T: TryFrom<i64> + PartialOrd + Copy + std::fmt::Display,
    {
        match self.required(p, key) {
            Some(Value::Integer(i)) => match T::try_from(*i) {
                Ok(n) if range.contains(&n) => n,
                _ => {
                    let (lo, hi) = (range.start(), range.end());
                    self.error(p, key, &format!("{i} is out of range {lo}..={hi}"));
                    *range.start()
                }
            },
            Some(other) => {
                self.error(
                    p,
                    key,
                    &format!("expected an integer, found {}", other.type_str()),
                );
                *range.start()
            }
            None => *range.start(),
        }
    }

    pub(crate) fn float_in(
        &mut self,
        p: &mut Problems,
        key: &str,
        range: RangeInclusive<f64>,
    ) -> f64 {
        match self.required(p, key) {
            Some(Value::Float(f)) if range.contains(f) => *f,
            Some(Value::Integer(i)) if range.contains(&(*i as f64)) => *i as f64,
            Some(Value::Float(_) | Value::Integer(_)) => {
                self.error(
                    p,
                    key,
                    &format!("is out of range {}..={}", range.start(), range.end()),
                );
                *range.start()
            }
            Some(other) => {
                self.error(
                    p,
                    key,
                    &format!("expected a number, found {}", other.type_str()),
                );
                *range.start()
            }
            None => *range.start(),
        }
    }

    pub(crate) fn opt_float(&mut self, p: &mut Problems, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::Float(f) if f.is_finite() => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            other => {
                self.error(
                    p,
                    key,
                    &format!("expected a number, found {}", other.type_str()),
                );
                None
            }
        }
    }

    pub(crate) fn duration(
        &mut self,
        p: &mut Problems,
        key: &str,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let text = match self.required(p, key) {
            Some(Value::String(s)) => s,
            Some(other) => {
                let found = other.type_str();
                self.error(
                    p,
                    key,
                    &format!("expected a duration like \"5s\", found {found}"),
                );
                return *range.start();
            }
            None => return *range.start(),
        };
        match humantime::parse_duration(text) {
            Ok(d) if range.contains(&d) => d,
            Ok(_) => {
                let lo = humantime::format_duration(*range.start());
                let hi = humantime::format_duration(*range.end());
                self.error(p, key, &format!("{text:?} is out of range {lo} to {hi}"));
                *range.start()
            }
            Err(e) => {
                self.error(p, key, &format!("{text:?} is not a duration ({e})"));
                *range.start()
            }
        }
    }

    pub(crate) fn socket_addr(&mut self, p: &mut Problems, key: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 0));
        let text = match self.required(p, key) {
            Some(Value::String(s)) => s,
            Some(other) => {
                let found = other.type_str();
                self.error(p, key, &format!("expected \"host:port\", found {found}"));
                return fallback;
            }
            None => return fallback,
        };
        text.parse().unwrap_or_else(|_| {
            let msg = format!("{text:?} is not an IP address and port such as \"127.0.0.1:1883\"");
            self.error(p, key, &msg);
            fallback
        })
    }

    /// An address like [`Section::socket_addr`], or `None` for an empty string (a listener
    /// that is off).
    pub(crate) fn opt_socket_addr(&mut self, p: &mut Problems, key: &str) -> Option<SocketAddr> {
        match self.raw(key) {
            Some(Value::String(s)) if s.is_empty() => {
                self.get(key);
                None
            }
            Some(_) => Some(self.socket_addr(p, key)),
            None => {
                self.required(p, key);
                None
            }
        }
    }

    /// Whether this section is a table (a missing or mistyped one has been reported already).
    pub(crate) fn exists(&self) -> bool {
        self.table.is_some()
    }

    /// Reports every key of this table that nobody read.
    pub(crate) fn finish(self, p: &mut Problems) {
        let Some(table) = self.table else { return };
        for key in table.keys() {
            if !self.used.contains(&key.as_str()) {
                p.push(self.key_path(key), "unknown key".to_owned());
            }
        }
    }
}
