//! Strict YAML reading: parser errors keep their line, unknown keys are errors,
//! and every other error gets the line of the step and field it names.
//!
//! Resource types are shared with the wire crate, where unknown fields must be
//! ignored, so strictness for files comes from `serde_ignored` here rather than
//! `deny_unknown_fields` on the types.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::ConfigError;

/// Parse `text` as `T`. Returns the value and the dotted paths of keys `T`
/// does not have, so the caller can name the step they belong to.
pub(crate) fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<(T, Vec<String>), ConfigError> {
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let value =
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string())).map_err(|e: serde_yaml_ng::Error| {
            let mut err = ConfigError::file(file, e.to_string());
            err.line = e.location().map(|l| l.line());
            err
        })?;
    Ok((value, unknown))
}

/// Parse `text` as `T`, with every unknown key reported as an error.
pub(crate) fn parse_strict<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, Vec<ConfigError>> {
    let (value, unknown) = parse(file, text).map_err(|e| vec![e])?;
    if unknown.is_empty() {
        Ok(value)
    } else {
        Err(unknown.into_iter().map(|path| unknown_field(file, path)).collect())
    }
}

/// The error for a key the schema does not have.
pub(crate) fn unknown_field(file: &Path, path: String) -> ConfigError {
    let message = if path == "api_key" || path.ends_with(".api_key") {
        "API keys never go in files: set `api_key_env` to the NAME of an environment variable"
    } else {
        "unknown field"
    };
    ConfigError::file(file, message).field(path)
}

/// Give every error without a line the line of what it names: its field in
/// its step (a prefix of the field when the field itself is absent, as a
/// default is), or the step. Files are read again, once each.
pub(crate) fn add_lines(errors: &mut [ConfigError]) {
    let mut texts: BTreeMap<PathBuf, Option<(String, usize)>> = BTreeMap::new();
    for err in errors
        .iter_mut()
        .filter(|e| e.line.is_none() && (e.step.is_some() || e.field.is_some()))
    {
        let Some((yaml, offset)) = texts.entry(err.file.clone()).or_insert_with(|| yaml_of(&err.file)) else {
            continue;
        };
        let mut path: Vec<String> = Vec::new();
        if let Some(step) = &err.step {
            // An error about a step's name concerns the later of two steps so named.
            let later = err.field.as_deref() == Some("name");
            let Some(index) = step_index(yaml, step, later) else {
                continue;
            };
            path.extend(["steps".to_string(), index.to_string()]);
        }
        let base = path.len();
        path.extend(err.field.iter().flat_map(|f| f.split('.')).map(String::from));
        err.line = (base.max(1)..=path.len())
            .rev()
            .find_map(|n| line_of(yaml, &path[..n]))
            .map(|line| line + *offset);
    }
}

/// A file's YAML and the number of lines before it: a workflow or model file
/// whole, a Markdown file's front matter (after its `---` line).
fn yaml_of(file: &Path) -> Option<(String, usize)> {
    let text = std::fs::read_to_string(file).ok()?;
    if file.extension().is_some_and(|e| e == "md") {
        front_matter(&text).map(|(yaml, _)| (yaml.to_string(), 1))
    } else {
        Some((text, 0))
    }
}

/// Position of the first (or the last) step named `name` in a workflow's `steps`.
fn step_index(yaml: &str, name: &str, last: bool) -> Option<usize> {
    let file: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).ok()?;
    let steps = file.get("steps")?.as_sequence()?;
    let named = |step: &serde_yaml_ng::Value| step.get("name").and_then(|n| n.as_str()) == Some(name);
    if last {
        steps.iter().rposition(named)
    } else {
        steps.iter().position(named)
    }
}

/// The line (1-based) where the value at `path` (map keys and sequence
/// indexes) starts in `yaml`.
///
/// The walk raises an error at the value, and the YAML deserializer stamps
/// errors with the position of the value being read.
fn line_of(yaml: &str, path: &[String]) -> Option<usize> {
    let de = serde_yaml_ng::Deserializer::from_str(yaml);
    match (Seek { path }).deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| l.line()),
        _ => None,
    }
}

const FOUND: &str = "found the value sought";

/// Walks to the value at `path`, skipping everything else.
struct Seek<'p> {
    path: &'p [String],
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
            if key.as_str() == Some(first.as_str()) {
                return map.next_value_seed(Seek { path: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let Ok(index) = first.parse::<usize>() else {
            return Ok(());
        };
        for _ in 0..index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Seek { path: rest }).map(|_| ())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
}

impl Seek<'_> {
    /// A scalar is the value sought when the path ends here; nothing below it.
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

/// Split a Markdown file into its YAML front matter and body.
pub(crate) fn front_matter(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix("---\n").or_else(|| text.strip_prefix("---\r\n"))?;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            let body = &rest[offset + line.len()..];
            return Some((&rest[..offset], body.strip_prefix('\n').unwrap_or(body)));
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{front_matter, line_of};

    #[test]
    fn line_of_finds_keys_items_and_flow_items() {
        let yaml = "name: x\nsteps:\n  - name: a\n    command: [echo]\n  - name: b\n    agent:\n      skills: [one,\n        two]\n      soul: s\n";
        let line = |path: &[&str]| line_of(yaml, &path.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(line(&["name"]), Some(1));
        assert_eq!(line(&["steps", "1"]), Some(5));
        assert_eq!(line(&["steps", "1", "agent", "soul"]), Some(9));
        assert_eq!(line(&["steps", "1", "agent", "skills", "1"]), Some(8));
        assert_eq!(line(&["steps", "0", "command"]), Some(4));
        assert_eq!(line(&["steps", "2"]), None);
        assert_eq!(line(&["steps", "0", "agent"]), None);
        assert_eq!(line(&["name", "deeper"]), None);
    }

    #[test]
    fn front_matter_splits_yaml_and_body() {
        assert_eq!(
            front_matter("---\nname: a\n---\n\nBody\n"),
            Some(("name: a\n", "Body\n"))
        );
        assert_eq!(
            front_matter("---\r\nname: a\r\n---\r\nBody"),
            Some(("name: a\r\n", "Body"))
        );
        assert_eq!(front_matter("---\nname: a\n---"), Some(("name: a\n", "")));
        assert_eq!(front_matter("no front matter"), None);
        assert_eq!(front_matter("---\nname: a\nunterminated"), None);
    }
}
