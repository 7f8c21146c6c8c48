//! Strict YAML reading: parser errors keep their line, unknown keys are errors.
//!
//! Resource types are shared with the wire crate, where unknown fields must be
//! ignored, so strictness for files comes from `serde_ignored` here rather than
//! `deny_unknown_fields` on the types.

use std::path::Path;

use serde::de::DeserializeOwned;

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
    use super::front_matter;

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
