//! Config errors that name their place: `FILE:LINE:COL: key.path: message`.
//!
//! A [`KeyPath`] is built while validating (`routes[app].stable.endpoints[1]`); the position
//! is looked up afterwards in the spanned TOML tree, so validation code never deals with
//! byte offsets and every error, structural or semantic, prints the same way.

use std::fmt;
use std::ops::Range;

use toml::de::{DeArray, DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
    /// An element of `[[routes]]`: shown by its name when it has one, found by it too
    /// (a route removed by an earlier error would shift indices, names do not move).
    Named {
        index: usize,
        name: Option<String>,
    },
}

/// Where in the config a value lives, e.g. `routes[app].canary_weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }

    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub fn named(&self, index: usize, name: Option<&str>) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Named {
            index,
            name: name.map(str::to_string),
        });
        p
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Named { name: Some(n), .. } => write!(f, "[{n}]")?,
                Seg::Named { index, name: None } => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A line and column, both 1-based, columns counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

impl Position {
    pub fn of_offset(src: &str, offset: usize) -> Position {
        let offset = offset.min(src.len());
        let before = src.get(..offset).unwrap_or(src);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        Position { line, col }
    }
}

/// One problem in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub position: Option<Position>,
    pub path: KeyPath,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.col)?;
        }
        write!(f, ": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in one config, in file order where positions are known.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// An error about the file as a whole (unreadable, missing).
    pub fn whole_file(file: &str, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            position: None,
            path: KeyPath::root(),
            message: message.into(),
        }])
    }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The bytes a value covers, children included. A `[table]`'s own span is only its
/// header, and an array of tables' only its first header, so containment needs the union.
fn extent(v: &toml::Spanned<DeValue<'_>>) -> Range<usize> {
    let mut r = v.span();
    let mut widen = |o: Range<usize>| {
        r.start = r.start.min(o.start);
        r.end = r.end.max(o.end);
    };
    match v.get_ref() {
        DeValue::Table(t) => {
            for (k, child) in t.iter() {
                widen(k.span());
                widen(extent(child));
            }
        }
        DeValue::Array(a) => {
            for child in a.iter() {
                widen(extent(child));
            }
        }
        _ => {}
    }
    r
}

/// The span of the value at `path`, or of its deepest ancestor present in the file (a key
/// left to its default has no place of its own; its table is the next best thing).
pub fn span_of(root: &DeTable<'_>, path: &KeyPath) -> Option<Range<usize>> {
    let mut best = None;
    let mut table = Some(root);
    let mut array: Option<&DeArray<'_>> = None;
    for seg in &path.0 {
        let found = match seg {
            Seg::Key(k) => table.and_then(|t| t.iter().find(|(key, _)| key.get_ref() == k)),
            _ => None,
        }
        .map(|(_, v)| v)
        .or_else(|| match seg {
            Seg::Index(i) => array.and_then(|a| a.get(*i)),
            Seg::Named { index, name } => array.and_then(|a| {
                // The element at the index if it still carries the name (names can repeat:
                // that is an error too), else the element with the name.
                let named = |el: &&toml::Spanned<DeValue<'_>>| {
                    name.is_none() || element_name(el) == name.as_deref()
                };
                a.get(*index).filter(named).or_else(|| a.iter().find(named))
            }),
            Seg::Key(_) => None,
        });
        let Some(v) = found else { break };
        best = Some(v.span());
        table = v.get_ref().as_table();
        array = v.get_ref().as_array();
    }
    best
}

/// Remove the entry that `span` (a deserialization error's place) points into, so that
/// deserializing again can report the next error. Returns the removed entry's key path,
/// or `None` when nothing narrower than the whole document holds the error.
pub fn remove_at(table: &mut DeTable<'_>, span: &Range<usize>, path: &KeyPath) -> Option<KeyPath> {
    let key = table
        .iter()
        .find(|(k, v)| contains(&k.span(), span) || contains(&extent(v), span))
        .map(|(k, _)| k.clone())?;
    let here = path.key(key.get_ref());
    // The narrowest entry holding the error goes: descend first, remove this key only when
    // nothing inside holds it (a missing field's span is its table's header).
    let inside_value = if contains(&key.span(), span) {
        None
    } else {
        match table.get_mut(&key)?.get_mut() {
            DeValue::Table(t) => remove_at(t, span, &here),
            DeValue::Array(a) => remove_in_array(a, span, &here),
            _ => None,
        }
    };
    match inside_value {
        Some(p) => Some(p),
        None => {
            table.remove(&key);
            Some(here)
        }
    }
}

/// The `name` key of a table element, if any.
fn element_name<'a>(el: &'a toml::Spanned<DeValue<'_>>) -> Option<&'a str> {
    el.get_ref()
        .as_table()
        .and_then(|t| t.iter().find(|(k, _)| k.get_ref() == "name"))
        .and_then(|(_, v)| v.get_ref().as_str())
}

fn remove_in_array(
    array: &mut DeArray<'_>,
    span: &Range<usize>,
    path: &KeyPath,
) -> Option<KeyPath> {
    let i = array.iter().position(|el| contains(&extent(el), span))?;
    let name = element_name(&array[i]).map(str::to_string);
    let here = path.named(i, name.as_deref());
    let inner = match array.get_mut(i).map(|el| el.get_mut()) {
        Some(DeValue::Table(t)) => remove_at(t, span, &here),
        _ => None,
    };
    match inner {
        Some(p) => Some(p),
        None => {
            // DeArray has no `remove`: rebuild it without element i.
            let kept: DeArray<'_> = array
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, v)| v.clone())
                .collect();
            *array = kept;
            Some(here)
        }
    }
}
