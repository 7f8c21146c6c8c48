//! Structured outputs: an agent step's `output_schema` (JSON Schema),
//! checked at load, and the one check of an output against it, made on the
//! worker (the `output` tool answers a violation to the model) and again on
//! the scheduler (a result that does not match cannot succeed).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use jsonschema::Validator;
use serde_json::Value;

/// Largest schema accepted (it travels in every task of its step).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Violations named in an error; the rest are counted.
const SHOWN: usize = 3;
/// Compiled schemas kept, by their text (each at most [`MAX_SCHEMA_BYTES`]):
/// a step's schema is compiled once, not once per output checked. Past
/// this many, one makes room for the next.
const CACHED: usize = 64;

static VALIDATORS: LazyLock<Mutex<HashMap<String, Arc<Validator>>>> = LazyLock::new(Mutex::default);

/// The compiled `schema` (JSON text), from the cache or compiled and kept.
fn validator(schema: &str) -> Result<Arc<Validator>, String> {
    let cache = || VALIDATORS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = cache().get(schema) {
        return Ok(found.clone());
    }
    // Compiled outside the lock: other checks go on meanwhile.
    let json: Value = serde_json::from_str(schema).map_err(|e| format!("the output schema is not JSON: {e}"))?;
    let compiled =
        Arc::new(jsonschema::validator_for(&json).map_err(|e| format!("the output schema is invalid: {e}"))?);
    let mut cached = cache();
    if cached.len() >= CACHED
        && let Some(any) = cached.keys().next().cloned()
    {
        cached.remove(&any);
    }
    cached.insert(schema.to_string(), compiled.clone());
    Ok(compiled)
}

/// Check a schema as written in a workflow: valid JSON Schema, an object at
/// the top (it is the `output` tool's parameters), at most [`MAX_SCHEMA_BYTES`].
///
/// # Errors
/// A message naming what is wrong.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    let len = schema.to_string().len();
    if len > MAX_SCHEMA_BYTES {
        return Err(format!("the schema is {len} bytes; at most {MAX_SCHEMA_BYTES}"));
    }
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err("the schema must describe an object (type: object): it is the output tool's parameters".into());
    }
    jsonschema::validator_for(schema)
        .map(|_| ())
        .map_err(|e| format!("not a valid JSON Schema: {e}"))
}

/// Whether `output` (JSON text) matches `schema` (JSON text).
///
/// # Errors
/// A message for the model or the step's error: not JSON, or the first
/// violations with where they are.
pub fn validate(schema: &str, output: &str) -> Result<(), String> {
    let validator = validator(schema)?;
    let value: Value = serde_json::from_str(output)
        .map_err(|e| format!("the output is not JSON ({e}); the schema asks for an object"))?;
    // The first few only: a long output may break a rule a million times.
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .take(SHOWN + 1)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "the output does not match the step's output_schema: {}",
        errors[..errors.len().min(SHOWN)].join("; ")
    );
    if errors.len() > SHOWN {
        message.push_str(" (and more)");
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type": "object", "properties": {"severity": {"enum": ["low", "high"]}, "files": {"type": "array", "items": {"type": "string"}}}, "required": ["severity"]}"#;

    #[test]
    fn a_matching_output_passes_and_violations_are_named_with_their_place() {
        assert_eq!(validate(SCHEMA, r#"{"severity": "high", "files": ["a"]}"#), Ok(()));
        let e = validate(SCHEMA, r#"{"severity": "urgent", "files": [3]}"#).unwrap_err();
        assert!(
            e.starts_with("the output does not match the step's output_schema: "),
            "{e}"
        );
        assert!(e.contains("at /severity") && e.contains("at /files/0"), "{e}");
        let e = validate(SCHEMA, "{}").unwrap_err();
        assert!(e.contains("\"severity\" is a required property"), "{e}");
        assert!(
            validate(SCHEMA, "high")
                .unwrap_err()
                .starts_with("the output is not JSON")
        );
    }

    #[test]
    fn a_schema_is_compiled_once_and_the_cache_stays_bounded() {
        let schema = r#"{"type": "object", "required": ["cached"]}"#;
        let first = validator(schema).unwrap();
        assert!(
            Arc::ptr_eq(&first, &validator(schema).unwrap()),
            "the second check reuses the first's"
        );
        assert!(
            validate(schema, "{}")
                .unwrap_err()
                .contains("\"cached\" is a required property")
        );
        for i in 0..=CACHED {
            validate(&format!(r#"{{"type": "object", "required": ["k{i}"]}}"#), "{}").unwrap_err();
            assert!(VALIDATORS.lock().unwrap().len() <= CACHED);
        }
    }

    #[test]
    fn schemas_are_checked_at_load() {
        assert_eq!(check_schema(&serde_json::from_str(SCHEMA).unwrap()), Ok(()));
        assert!(
            check_schema(&serde_json::json!({"type": "string"}))
                .unwrap_err()
                .contains("must describe an object")
        );
        assert!(
            check_schema(&serde_json::json!({"type": "object", "properties": {"a": {"type": 12}}}))
                .unwrap_err()
                .starts_with("not a valid JSON Schema")
        );
        let huge = serde_json::json!({"type": "object", "description": "x".repeat(MAX_SCHEMA_BYTES)});
        assert!(check_schema(&huge).unwrap_err().contains("at most"));
    }

    #[test]
    fn a_schema_cannot_reach_files_or_the_network() {
        let schema = r#"{"type": "object", "properties": {"a": {"$ref": "file:///etc/passwd"}}}"#;
        assert!(check_schema(&serde_json::from_str(schema).unwrap()).is_err());
        let schema = r#"{"type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/s.json"}}}"#;
        assert!(check_schema(&serde_json::from_str(schema).unwrap()).is_err());
    }
}
