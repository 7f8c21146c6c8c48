//! `when:` conditions: CEL expressions over a run's params and upstream
//! outputs, parsed and checked at load, evaluated by the scheduler when the
//! step becomes ready (false: the step is skipped).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, IdedEntryExpr};
use cel::{Context, IdedExpr, Program, Value};

/// Longest expression accepted: evaluation runs inside the scheduler's
/// transaction, so its size (and with it its cost) is bounded.
pub const MAX_CONDITION_LEN: usize = 2048;
/// Largest output a condition reads (bounding what an expression over it
/// costs; a larger one fails the condition).
pub const MAX_CONDITION_INPUT: usize = 64 * 1024;

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
        let mut reads = Reads::default();
        reads.walk(program.expression())?;
        Ok(Self {
            source: source.to_string(),
            steps: reads.steps,
            params: reads.params,
        })
    }

    /// Evaluate over the run's params and the outputs of the steps it reads
    /// (a step without output, skipped say, reads as `""` and `null`).
    ///
    /// # Errors
    /// The expression failed (a missing key, a type mismatch) or its value
    /// is not a boolean.
    pub fn eval(&self, params: &BTreeMap<String, String>, outputs: &BTreeMap<String, String>) -> Result<bool, String> {
        for name in &self.params {
            let len = params.get(name).map_or(0, String::len);
            if len > MAX_CONDITION_INPUT {
                return Err(format!(
                    "param \"{name}\" is {len} bytes: a condition reads at most {MAX_CONDITION_INPUT} bytes of a param"
                ));
            }
        }
        for name in &self.steps {
            let len = outputs.get(name).map_or(0, String::len);
            if len > MAX_CONDITION_INPUT {
                return Err(format!(
                    "the output of step \"{name}\" is {len} bytes: a condition reads at most {MAX_CONDITION_INPUT} bytes of an output"
                ));
            }
        }
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

/// What a condition reads, found by walking its syntax tree: `params.NAME`
/// and `steps.NAME.output|json`, with a comprehension's own variables in
/// scope inside it, and comprehensions never nested (their cost would grow
/// with the square of an output's size).
#[derive(Default)]
struct Reads<'a> {
    steps: BTreeSet<String>,
    params: BTreeSet<String>,
    scope: Vec<&'a str>,
    depth: usize,
}

impl<'a> Reads<'a> {
    fn walk(&mut self, e: &'a IdedExpr) -> Result<(), String> {
        match &e.expr {
            Expr::Select(select) => {
                let path = qualified(e);
                match path.first().copied() {
                    Some(root @ ("params" | "steps")) if !self.scope.contains(&root) => self.input(&path),
                    _ => self.walk(&select.operand),
                }
            }
            Expr::Ident(name) if self.scope.contains(&name.as_str()) => Ok(()),
            Expr::Ident(name) if name == "params" || name == "steps" => Err(format!(
                "read {name} as params.NAME, steps.NAME.output or steps.NAME.json"
            )),
            Expr::Ident(name) => Err(format!(
                "unknown name \"{name}\": a condition reads params.NAME, steps.NAME.output and steps.NAME.json"
            )),
            Expr::Comprehension(c) => {
                if self.depth > 0 {
                    return Err("comprehensions (all, exists, exists_one, map, filter) may not nest: \
                                their cost would grow with the square of an output's size"
                        .into());
                }
                self.walk(&c.iter_range)?;
                self.walk(&c.accu_init)?;
                let before = self.scope.len();
                self.scope.push(&c.iter_var);
                self.scope.extend(c.iter_var2.as_deref());
                self.scope.push(&c.accu_var);
                self.depth += 1;
                let body = [&c.loop_cond, &c.loop_step, &c.result]
                    .into_iter()
                    .try_for_each(|part| self.walk(part));
                self.depth -= 1;
                self.scope.truncate(before);
                body
            }
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.walk(target)?;
                }
                call.args.iter().try_for_each(|a| self.walk(a))
            }
            Expr::List(list) => list.elements.iter().try_for_each(|a| self.walk(a)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| self.entry(entry)),
            Expr::Struct(st) => st.entries.iter().try_for_each(|entry| self.entry(entry)),
            Expr::Literal(_) | Expr::Unspecified => Ok(()),
        }
    }

    fn entry(&mut self, entry: &'a IdedEntryExpr) -> Result<(), String> {
        match &entry.expr {
            EntryExpr::MapEntry(m) => {
                self.walk(&m.key)?;
                self.walk(&m.value)
            }
            EntryExpr::StructField(f) => self.walk(&f.value),
        }
    }

    /// `params.NAME...` or `steps.NAME.output|json...`.
    fn input(&mut self, path: &[&str]) -> Result<(), String> {
        // Read once per element, an input inside a comprehension's body
        // would cost its size times the other's (`r in steps.b.json` for
        // every `r` of steps.a.json): only the comprehension's own
        // variables may be read there.
        if self.depth > 0 {
            return Err(format!(
                "\"{}\" is read inside a comprehension (all, exists, exists_one, map, filter), whose cost would \
                 grow with the product of the inputs' sizes: read only its own variables there, and compare \
                 outside it (`params.level in steps.review.json.map(r, r.severity)`, not \
                 `steps.review.json.exists(r, r.severity == params.level)`)",
                path.join(".")
            ));
        }
        match path {
            ["params", name, ..] => {
                self.params.insert((*name).to_string());
                Ok(())
            }
            ["steps", name, "output" | "json", ..] => {
                self.steps.insert((*name).to_string());
                Ok(())
            }
            ["steps", name, ..] => Err(format!(
                "\"steps.{name}\" must be followed by .output (text) or .json (the output as JSON)"
            )),
            _ => Err("read params.NAME, steps.NAME.output or steps.NAME.json".into()),
        }
    }
}

/// The names of a chain of field selections from an identifier
/// (`a.b.c`: `[a, b, c]`); empty when it does not start at one.
fn qualified(e: &IdedExpr) -> Vec<&str> {
    let mut names = Vec::new();
    let mut e = e;
    loop {
        match &e.expr {
            Expr::Select(select) => {
                names.push(select.field.as_str());
                e = &select.operand;
            }
            Expr::Ident(name) => {
                names.push(name.as_str());
                names.reverse();
                return names;
            }
            _ => return Vec::new(),
        }
    }
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
        for nested in [
            "steps.a.json.all(x, steps.a.json.exists(y, x == y))",
            "steps.a.json.all(x, steps.a.json.exists (x, x == 0))",
            "steps.a.json.all(x, steps.a.json.existsOne(y, x == y)) // a comment's ' quote",
            "steps.a.json.map(x, steps.a.json.filter(y, y == x))",
        ] {
            assert!(
                Condition::parse(nested).unwrap_err().contains("may not nest"),
                "{nested}"
            );
        }
        for reading in [
            "steps.a.json.exists(r, r in steps.b.json)",
            "steps.a.json.exists(x, x == params.wanted)",
            "steps.a.json.all(x, size(steps.a.output + x) > 0)",
        ] {
            let e = Condition::parse(reading).unwrap_err();
            assert!(e.contains("is read inside a comprehension"), "{reading}: {e}");
        }
        assert!(Condition::parse("params.wanted in steps.a.json").is_ok());
        let side_by_side = "steps.a.json.all(x, x > 0) && steps.a.json.exists(y, y == '(')";
        assert!(Condition::parse(side_by_side).is_ok());
        // A macro's variable is known only inside it.
        assert!(
            Condition::parse("[1].all(env, true) && env.HOME == ''")
                .unwrap_err()
                .contains("unknown name \"env\"")
        );
        assert!(
            Condition::parse("steps['plan'].json == null")
                .unwrap_err()
                .contains("read steps as")
        );
        assert!(Condition::parse("params.mode == 'x' // naïve, ünïcode").is_ok());
    }

    #[test]
    fn an_output_over_the_bound_is_not_read() {
        let big = format!("[{}]", vec!["0"; MAX_CONDITION_INPUT].join(","));
        let e = eval("size(steps.plan.json) > 0", &[("plan", &big)]).unwrap_err();
        assert!(e.contains("a condition reads at most 65536 bytes"), "{e}");
        let c = Condition::parse("params.big == ''").unwrap();
        let params = BTreeMap::from([("big".to_string(), "x".repeat(MAX_CONDITION_INPUT + 1))]);
        let e = c.eval(&params, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            e,
            "param \"big\" is 65537 bytes: a condition reads at most 65536 bytes of a param"
        );
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
