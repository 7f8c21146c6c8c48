//! `when:` conditions: CEL expressions over a run's params and upstream
//! outputs, parsed and checked at load, evaluated by the scheduler when the
//! step becomes ready (false: the step is skipped).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cel::{Context, Program, Value};

/// Longest expression accepted: evaluation runs inside the scheduler's
/// transaction, so its size (and with it its cost) is bounded.
pub const MAX_CONDITION_LEN: usize = 2048;

/// A parsed condition and the names it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The expression as written.
    pub source: String,
    /// Steps it reads (`steps.NAME...`): only their outputs are given to it.
    pub steps: BTreeSet<String>,
    /// Params it reads (`params.NAME`).
    pub params: BTreeSet<String>,
}

impl Condition {
    /// Parse `source` and list what it reads.
    ///
    /// # Errors
    /// A message: too long, a syntax error, or a name other than `params`
    /// and `steps`, or `params`/`steps` used other than as `params.NAME` /
    /// `steps.NAME.output|json`.
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.len() > MAX_CONDITION_LEN {
            return Err(format!("a condition may be at most {MAX_CONDITION_LEN} bytes"));
        }
        if source.trim().is_empty() {
            return Err("the condition is empty".into());
        }
        let program = Program::compile(source).map_err(|e| {
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            format!("not a CEL expression: {}", first.trim_start_matches("ERROR: <input>:"))
        })?;
        if nested_macros(source) {
            return Err("comprehensions (all, exists, exists_one, map, filter) may not nest: \
                        their cost would grow with the square of an output's size"
                .into());
        }
        let references = program.references();
        let bound = macro_variables(source);
        for name in references.variables() {
            if !["params", "steps"].contains(&name) && !bound.contains(&name) {
                return Err(format!(
                    "unknown name \"{name}\": a condition reads params.NAME, steps.NAME.output and steps.NAME.json"
                ));
            }
        }
        let mut steps = BTreeSet::new();
        let mut params = BTreeSet::new();
        for (root, rest) in selections(source) {
            let mut parts = rest.split('.');
            let name = parts.next().unwrap_or_default().to_string();
            if root == "steps" {
                match parts.next() {
                    Some("output" | "json") => {}
                    _ => {
                        return Err(format!(
                            "\"steps.{name}\" must be followed by .output (text) or .json (the output as JSON)"
                        ));
                    }
                }
                steps.insert(name);
            } else {
                params.insert(name);
            }
        }
        Ok(Self {
            source: source.to_string(),
            steps,
            params,
        })
    }

    /// Evaluate over the run's params and the outputs of the steps it reads
    /// (a step without output, skipped say, reads as `""` and `null`).
    ///
    /// # Errors
    /// The expression failed (a missing key, a type mismatch) or its value
    /// is not a boolean.
    pub fn eval(&self, params: &BTreeMap<String, String>, outputs: &BTreeMap<String, String>) -> Result<bool, String> {
        let program = Program::compile(&self.source).map_err(|e| format!("not a CEL expression: {e}"))?;
        let mut context = Context::default();
        let params: HashMap<String, Value> = params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(Arc::new(v.clone()))))
            .collect();
        context.add_variable_from_value("params", params);
        let steps: HashMap<String, Value> = self
            .steps
            .iter()
            .map(|name| {
                let output = outputs.get(name).cloned().unwrap_or_default();
                let json = serde_json::from_str::<serde_json::Value>(&output).map_or(Value::Null, |v| cel_value(&v));
                let step = HashMap::from([
                    ("output".to_string(), Value::String(Arc::new(output))),
                    ("json".to_string(), json),
                ]);
                (name.clone(), Value::from(step))
            })
            .collect();
        context.add_variable_from_value("steps", steps);
        match program.execute(&context) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "the condition \"{}\" gave {other:?}, not true or false",
                self.source
            )),
            Err(e) => Err(format!("the condition \"{}\" failed: {e}", self.source)),
        }
    }
}

/// `params.X` and `steps.X.Y` selections in the source, outside string
/// literals: (root, the dotted rest).
fn selections(source: &str) -> Vec<(&'static str, String)> {
    let bytes = source.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == b'\\' {
                i += 1;
            } else if b == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if b == b'"' || b == b'\'' {
            quote = Some(b);
            i += 1;
            continue;
        }
        let word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b'.');
        for root in ["params", "steps"] {
            if word_start && source[i..].starts_with(root) && bytes.get(i + root.len()) == Some(&b'.') {
                let start = i + root.len() + 1;
                let end = source[start..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
                    .map_or(source.len(), |n| start + n);
                found.push((root, source[start..end].to_string()));
            }
        }
        i += 1;
    }
    found
}

/// Names bound by macros (`list.exists(x, ...)`, `all`, `exists_one`,
/// `map`, `filter`): the macro's own variable, not an input.
fn macro_variables(source: &str) -> Vec<&str> {
    let mut bound = Vec::new();
    for m in [".all(", ".exists(", ".exists_one(", ".map(", ".filter("] {
        let mut rest = source;
        while let Some(at) = rest.find(m) {
            rest = &rest[at + m.len()..];
            let name = rest.trim_start();
            let end = name
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(name.len());
            if name[end..].trim_start().starts_with(',') && end > 0 {
                bound.push(&name[..end]);
            }
        }
    }
    bound
}

/// Whether a comprehension's parentheses hold another comprehension
/// (string literals aside).
fn nested_macros(source: &str) -> bool {
    const MACROS: [&str; 5] = [".all(", ".exists(", ".exists_one(", ".map(", ".filter("];
    let bytes = source.as_bytes();
    // Depth of parentheses at which each open comprehension started.
    let mut open: Vec<usize> = Vec::new();
    let (mut depth, mut quote, mut i) = (0usize, None, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == b'\\' {
                i += 1;
            } else if b == q {
                quote = None;
            }
        } else if b == b'"' || b == b'\'' {
            quote = Some(b);
        } else if let Some(m) = MACROS.iter().find(|m| source[i..].starts_with(**m)) {
            if !open.is_empty() {
                return true;
            }
            depth += 1;
            open.push(depth);
            i += m.len();
            continue;
        } else if b == b'(' {
            depth += 1;
        } else if b == b')' {
            if open.last() == Some(&depth) {
                open.pop();
            }
            depth = depth.saturating_sub(1);
        }
        i += 1;
    }
    false
}

/// A JSON value as a CEL value: integers as `int` (so `x > 3` compares
/// like with like), other numbers as `double`.
fn cel_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => Value::List(Arc::new(items.iter().map(cel_value).collect())),
        serde_json::Value::Object(map) => Value::from(
            map.iter()
                .map(|(k, v)| (k.clone(), cel_value(v)))
                .collect::<HashMap<String, Value>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(source: &str, outputs: &[(&str, &str)]) -> Result<bool, String> {
        let params = BTreeMap::from([("mode".to_string(), "fast".to_string())]);
        let outputs = outputs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        Condition::parse(source)?.eval(&params, &outputs)
    }

    #[test]
    fn reads_params_and_outputs_as_text_and_json() {
        let plan = r#"{"risky": true, "files": ["a", "b", "c"], "score": 0.5}"#;
        assert_eq!(eval("params.mode == 'fast'", &[]), Ok(true));
        assert_eq!(eval("steps.plan.json.risky", &[("plan", plan)]), Ok(true));
        assert_eq!(eval("size(steps.plan.json.files) > 2", &[("plan", plan)]), Ok(true));
        assert_eq!(eval("steps.plan.json.score < 0.4", &[("plan", plan)]), Ok(false));
        assert_eq!(eval("steps.plan.output.contains('risky')", &[("plan", plan)]), Ok(true));
        assert_eq!(eval("steps.plan.json == null", &[("plan", "plain text")]), Ok(true));
        assert_eq!(eval("steps.plan.output == ''", &[]), Ok(true));
        assert_eq!(
            eval(
                "steps.plan.json.files.exists(f, f == 'b') && steps.plan.json.files.all(x, size(x) == 1)",
                &[("plan", plan)]
            ),
            Ok(true)
        );
        assert_eq!(
            eval("[null, {'s': 'high'}].exists(r, r != null && r.s == 'high')", &[]),
            Ok(true)
        );
    }

    #[test]
    fn lists_what_it_reads() {
        let c = Condition::parse("params.mode == 'x' && steps.plan.json.n > 1 && 'steps.fake.json' != ''").unwrap();
        assert_eq!(c.steps, BTreeSet::from(["plan".to_string()]));
        assert_eq!(c.params, BTreeSet::from(["mode".to_string()]));
    }

    #[test]
    fn rejects_bad_expressions_at_parse() {
        assert!(
            Condition::parse("params.mode ==")
                .unwrap_err()
                .contains("not a CEL expression")
        );
        assert!(
            Condition::parse("env.HOME == ''")
                .unwrap_err()
                .contains("unknown name \"env\"")
        );
        assert!(
            Condition::parse("steps.plan.stdout == ''")
                .unwrap_err()
                .contains(".output")
        );
        assert!(
            Condition::parse(&"true && ".repeat(400))
                .unwrap_err()
                .contains("at most")
        );
        let nested = "steps.a.json.all(x, steps.a.json.exists(y, x == y))";
        assert!(Condition::parse(nested).unwrap_err().contains("may not nest"));
        let side_by_side = "steps.a.json.all(x, x > 0) && steps.a.json.exists(y, y == '(')";
        assert!(Condition::parse(side_by_side).is_ok());
    }

    #[test]
    fn a_non_boolean_or_failing_condition_is_an_error() {
        assert!(eval("params.mode", &[]).unwrap_err().contains("not true or false"));
        assert!(
            eval("steps.plan.json.nope", &[("plan", "{}")])
                .unwrap_err()
                .contains("failed")
        );
    }
}
