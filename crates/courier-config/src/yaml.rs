//! Strict YAML reading: parser errors keep their line, unknown keys are errors,
//! and every other error gets the line of the step and field it names.
//!
//! Resource types are shared with the wire crate, where unknown fields must be
//! ignored, so strictness for files comes from `serde_ignored` here rather than
//! `deny_unknown_fields` on the types.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::ConfigError;

/// Parse `text` as `T`. Returns the value and the dotted paths of keys `T`
/// does not have, so the caller can name the step they belong to.
pub(crate) fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<(T, Vec<String>), ConfigError> {
    check_nesting(file, text)?;
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

/// Deepest nesting of collections a file may have, block (`- - - x`) or flow
/// (`[[[x]]]`): the YAML deserializer recurses per level (thousands of levels
/// overflow its stack) and slows down quadratically, and no config needs more.
pub const MAX_NESTING: usize = 64;

/// Refuse text nested deeper than [`MAX_NESTING`] levels before the
/// deserializer sees it, walking yaml-rust2's events (an iterative parser)
/// only as deep as the limit. Text it cannot parse is left to the
/// deserializer, whose error names the line.
fn check_nesting(file: &Path, text: &str) -> Result<(), ConfigError> {
    use yaml_rust2::Event;
    let too_deep = |line: usize| {
        let mut err = ConfigError::file(
            file,
            format!("nested deeper than {MAX_NESTING} levels: refusing to parse it"),
        );
        err.line = Some(line);
        err
    };
    let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        match parser.next_token() {
            Ok((Event::SequenceStart(..) | Event::MappingStart(..), mark)) => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(too_deep(mark.line()));
                }
            }
            Ok((Event::SequenceEnd | Event::MappingEnd, _)) => depth = depth.saturating_sub(1),
            Ok((Event::StreamEnd, _)) => return Ok(()),
            Ok(_) => {}
            // The scanner's own flow-depth limit (256) comes before ours
            // would, as an error: it is the same refusal.
            Err(e) if e.info().contains("recursion limit") => return Err(too_deep(e.marker().line())),
            Err(_) => return Ok(()),
        }
    }
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
/// default is), or the step. Each file is read and walked once, whatever the
/// number of its errors.
pub(crate) fn add_lines(errors: &mut [ConfigError]) {
    let mut by_file: BTreeMap<PathBuf, Vec<usize>> = BTreeMap::new();
    for (i, err) in errors.iter().enumerate() {
        if err.line.is_none() && (err.step.is_some() || err.field.is_some()) {
            by_file.entry(err.file.clone()).or_default().push(i);
        }
    }
    for (file, indexes) in by_file {
        let Some(located) = Located::read(&file) else {
            continue;
        };
        // Each error's candidate paths, most precise last.
        let candidates: Vec<(usize, Vec<Vec<String>>)> = indexes
            .into_iter()
            .filter_map(|i| Some((i, located.candidates(&errors[i])?)))
            .collect();
        let wanted: BTreeSet<Vec<String>> = candidates.iter().flat_map(|(_, c)| c.iter().cloned()).collect();
        let lines = lines_of(&located.yaml, &wanted);
        for (i, paths) in candidates {
            errors[i].line = paths
                .iter()
                .rev()
                .find_map(|p| lines.get(p))
                .map(|line| line + located.offset);
        }
    }
}

/// A file read once for locating its errors.
struct Located {
    /// Its YAML: a workflow or model file whole, a Markdown file's front matter.
    yaml: String,
    /// Lines before the YAML (the front matter's `---`).
    offset: usize,
    /// The names of a workflow's steps, in order.
    steps: Vec<Option<String>>,
}

impl Located {
    fn read(file: &Path) -> Option<Self> {
        let text = crate::files::read_text(file).ok()?;
        let (yaml, offset) = if file.extension().is_some_and(|e| e == "md") {
            front_matter(&text).map(|(yaml, _)| (yaml.to_string(), 1))?
        } else {
            (text, 0)
        };
        let value: Option<serde_yaml_ng::Value> = serde_yaml_ng::from_str(&yaml).ok();
        let steps = value
            .as_ref()
            .and_then(|v| v.get("steps")?.as_sequence().cloned())
            .unwrap_or_default()
            .iter()
            .map(|s| s.get("name").and_then(|n| n.as_str()).map(String::from))
            .collect();
        Some(Self { yaml, offset, steps })
    }

    /// The paths an error may be placed at: its step, then ever longer
    /// prefixes of its field.
    fn candidates(&self, err: &ConfigError) -> Option<Vec<Vec<String>>> {
        let mut path: Vec<String> = Vec::new();
        if let Some(step) = &err.step {
            // An error about a step's name concerns the later of two steps so named.
            let named = |n: &Option<String>| n.as_deref() == Some(step.as_str());
            let index = if err.field.as_deref() == Some("name") {
                self.steps.iter().rposition(named)
            } else {
                self.steps.iter().position(named)
            }?;
            path.extend(["steps".to_string(), index.to_string()]);
        }
        let base = path.len();
        path.extend(err.field.iter().flat_map(|f| f.split('.')).map(String::from));
        Some((base.max(1)..=path.len()).map(|n| path[..n].to_vec()).collect())
    }
}

/// The line (1-based) where the value at each `wanted` path (map keys and
/// sequence indexes) starts in `yaml`, in one pass over its events.
fn lines_of(yaml: &str, wanted: &BTreeSet<Vec<String>>) -> BTreeMap<Vec<String>, usize> {
    let mut walk = Walk {
        wanted,
        found: BTreeMap::new(),
        frames: Vec::new(),
        skipping: 0,
    };
    // A file the walker cannot read gets no lines; the error itself came from
    // the real parser.
    let _ = yaml_rust2::parser::Parser::new_from_str(yaml).load(&mut walk, false);
    walk.found
}

/// A collection being walked, and where in it the walk is.
struct Frame {
    /// A mapping (`key` is the key of the value being read, `None` while
    /// reading a key) or a sequence (`index` of the item being read).
    mapping: bool,
    key: Option<String>,
    index: usize,
}

struct Walk<'w> {
    wanted: &'w BTreeSet<Vec<String>>,
    found: BTreeMap<Vec<String>, usize>,
    frames: Vec<Frame>,
    /// Depth inside a collection used as a mapping key (never sought).
    skipping: usize,
}

impl Walk<'_> {
    fn reading_key(&self) -> bool {
        self.frames.last().is_some_and(|f| f.mapping && f.key.is_none())
    }

    /// A value starts here: note its line if its path is wanted.
    fn value_at(&mut self, line: usize) {
        let path: Vec<String> = self
            .frames
            .iter()
            .map(|f| {
                if f.mapping {
                    f.key.clone().unwrap_or_default()
                } else {
                    f.index.to_string()
                }
            })
            .collect();
        if self.wanted.contains(&path) {
            self.found.entry(path).or_insert(line);
        }
    }

    /// A value ended: the next one is a key, or the next item.
    fn advance(&mut self) {
        if let Some(frame) = self.frames.last_mut() {
            if frame.mapping {
                frame.key = None;
            } else {
                frame.index += 1;
            }
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for Walk<'_> {
    fn on_event(&mut self, event: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        let start = matches!(event, Event::SequenceStart(..) | Event::MappingStart(..));
        let end = matches!(event, Event::SequenceEnd | Event::MappingEnd);
        if self.skipping > 0 {
            self.skipping = if start {
                self.skipping + 1
            } else {
                self.skipping - usize::from(end)
            };
            if self.skipping == 0 {
                // The complex key ended: its value is never sought.
                if let Some(frame) = self.frames.last_mut() {
                    frame.key = Some(String::new());
                }
            }
            return;
        }
        match event {
            Event::Scalar(text, ..) if self.reading_key() => {
                if let Some(frame) = self.frames.last_mut() {
                    frame.key = Some(text);
                }
            }
            Event::Alias(_) if self.reading_key() => {
                if let Some(frame) = self.frames.last_mut() {
                    frame.key = Some(String::new());
                }
            }
            Event::Scalar(..) | Event::Alias(_) => {
                self.value_at(mark.line());
                self.advance();
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.reading_key() => self.skipping = 1,
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                self.value_at(mark.line());
                self.frames.push(Frame {
                    mapping: matches!(event, Event::MappingStart(..)),
                    key: None,
                    index: 0,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.frames.pop();
                self.advance();
            }
            _ => {}
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
    use std::collections::BTreeSet;

    use super::{front_matter, lines_of};

    #[test]
    fn lines_of_finds_keys_items_and_flow_items() {
        let yaml = "name: x\nsteps:\n  - name: a\n    command: [echo]\n  - name: b\n    agent:\n      skills: [one,\n        two]\n      soul: s\n    ? [complex, key]\n    : value\n    after: 1\n";
        let line = |path: &[&str]| {
            let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            lines_of(yaml, &BTreeSet::from([path.clone()])).get(&path).copied()
        };
        assert_eq!(line(&["name"]), Some(1));
        assert_eq!(line(&["steps", "1"]), Some(5));
        assert_eq!(line(&["steps", "1", "agent", "soul"]), Some(9));
        assert_eq!(line(&["steps", "1", "agent", "skills", "1"]), Some(8));
        assert_eq!(line(&["steps", "0", "command"]), Some(4));
        assert_eq!(line(&["steps", "2"]), None);
        assert_eq!(line(&["steps", "0", "agent"]), None);
        assert_eq!(line(&["name", "deeper"]), None);
        assert_eq!(line(&["steps", "1", "after"]), Some(12));
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
