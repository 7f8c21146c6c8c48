//! `${param}`, `${step.output}`, `${step.json.path}`, and in a `foreach`
//! step `${item}`, `${item.path}` and `${index}`: substitution in step fields.
//!
//! `$$` stands for a literal `$`. References are checked at load time, so
//! rendering at dispatch only fails if the caller passes incomplete inputs,
//! or if an output is not the JSON a `.json` reference selects into.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// A reference inside a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ref<'a> {
    /// `${name}`: a workflow parameter (or, in a `foreach` step, `${item}`
    /// and `${index}`).
    Param(&'a str),
    /// `${step.output}`: an upstream step's output.
    Output(&'a str),
    /// `${step.json}` or `${step.json.a.0.b}`: a value inside an upstream
    /// step's output parsed as JSON (the path may be empty).
    Json(&'a str, &'a str),
    /// `${item.a.b}`: a value inside the current `foreach` item.
    Item(&'a str),
}

/// Names a `foreach` step gives meaning to: no parameter or step may take them.
pub const ITEM: &str = "item";
/// See [`ITEM`].
pub const INDEX: &str = "index";

enum Piece<'a> {
    Text(&'a str),
    Ref(Ref<'a>),
}

fn not_a_reference(name: &str) -> String {
    format!("\"${{{name}}}\" is not a reference: use ${{param}}, ${{step.output}} or ${{step.json.path}}")
}

fn reference(name: &str) -> Result<Ref<'_>, String> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !valid || name.split('.').any(str::is_empty) {
        return Err(not_a_reference(name));
    }
    let (head, rest) = name.split_once('.').unwrap_or((name, ""));
    if rest.is_empty() {
        return Ok(Ref::Param(head));
    }
    if head == ITEM {
        return Ok(Ref::Item(rest));
    }
    match rest.split_once('.').unwrap_or((rest, "")) {
        ("output", "") => Ok(Ref::Output(head)),
        ("json", path) => Ok(Ref::Json(head, path)),
        _ => Err(not_a_reference(name)),
    }
}

fn parse(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        pieces.push(Piece::Text(&rest[..at]));
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            pieces.push(Piece::Text("$"));
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unterminated \"${{\" in \"{template}\""))?;
            pieces.push(Piece::Ref(reference(&inner[..end])?));
            rest = &inner[end + 1..];
        } else {
            pieces.push(Piece::Text("$"));
            rest = after;
        }
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

/// Every reference in `template`.
///
/// # Errors
/// A message naming a malformed reference.
pub fn refs(template: &str) -> Result<Vec<Ref<'_>>, String> {
    Ok(parse(template)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Ref(r) => Some(r),
            Piece::Text(_) => None,
        })
        .collect())
}

/// Bytes a set of renderings may produce together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The total allowed.
    pub limit: usize,
    /// What is left of it.
    pub left: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, left: limit }
    }
}

/// The current item of a `foreach` step: its position and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Position in the array, from 0.
    pub index: usize,
    /// The item.
    pub value: Value,
}

/// What templates are rendered with: params, upstream outputs (each parsed
/// as JSON at most once, whatever the number of references to it) and the
/// current `foreach` item.
#[derive(Debug)]
pub struct Values<'a> {
    params: &'a BTreeMap<String, String>,
    outputs: &'a BTreeMap<String, String>,
    item: Option<&'a Item>,
    parsed: RefCell<HashMap<&'a str, Result<Value, String>>>,
    lenient: bool,
}

impl<'a> Values<'a> {
    /// Values for one step (or one item of a `foreach` step).
    pub fn new(
        params: &'a BTreeMap<String, String>,
        outputs: &'a BTreeMap<String, String>,
        item: Option<&'a Item>,
    ) -> Self {
        Self {
            params,
            outputs,
            item,
            parsed: RefCell::new(HashMap::new()),
            lenient: false,
        }
    }

    /// Values for checking a step before any run: params as given, every
    /// output, `.json` selection and item reference rendered as `""`.
    pub fn lenient(params: &'a BTreeMap<String, String>, outputs: &'a BTreeMap<String, String>) -> Self {
        Self {
            lenient: true,
            ..Self::new(params, outputs, None)
        }
    }

    fn output(&self, step: &str) -> Result<&'a str, String> {
        self.outputs
            .get(step)
            .map(String::as_str)
            .ok_or_else(|| format!("no output from step \"{step}\""))
    }

    /// Step `step`'s output parsed as JSON, then `path` selected in it.
    fn json(&self, step: &str, path: &str) -> Result<Cow<'a, str>, String> {
        let (key, text) = self
            .outputs
            .get_key_value(step)
            .ok_or_else(|| format!("no output from step \"{step}\""))?;
        let mut parsed = self.parsed.borrow_mut();
        let value = parsed.entry(key.as_str()).or_insert_with(|| {
            serde_json::from_str::<Value>(text).map_err(|e| {
                format!("the output of step \"{step}\" is not JSON ({e}), so \"${{{step}.json}}\" has no value")
            })
        });
        let value = value.as_ref().map_err(Clone::clone)?;
        let picked = select(value, path).ok_or_else(|| format!("the output of step \"{step}\" has no \"{path}\""))?;
        Ok(Cow::Owned(shown(picked)))
    }

    fn item(&self, path: &str) -> Result<Cow<'a, str>, String> {
        let item = self.item.ok_or("\"${item}\" is only known in a foreach step")?;
        let picked = select(&item.value, path).ok_or_else(|| format!("item {} has no \"{path}\"", item.index))?;
        Ok(Cow::Owned(shown(picked)))
    }
}

/// `path` (`a.0.b`: object keys and array positions) inside `value`.
pub fn select<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() {
        return Some(value);
    }
    path.split('.').try_fold(value, |v, key| match v {
        Value::Object(map) => map.get(key),
        Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

/// A JSON value as template text: a string as itself, anything else as
/// compact JSON.
pub fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Substitute values into `template`, spending from `budget`: each value
/// is charged before the next is looked up, so a short file that repeats a
/// large value cannot expand without bound.
///
/// # Errors
/// A message naming a malformed reference, a value that was not given, a
/// `.json` reference into an output that is not JSON, or the budget.
pub fn render(template: &str, values: &Values<'_>, budget: &mut Budget) -> Result<String, String> {
    let mut out: Vec<Cow<'_, str>> = Vec::new();
    for piece in parse(template)? {
        let text: Cow<'_, str> = match piece {
            Piece::Text(t) => Cow::Borrowed(t),
            Piece::Ref(Ref::Json(..) | Ref::Item(_) | Ref::Output(_)) if values.lenient => Cow::Borrowed(""),
            Piece::Ref(Ref::Param(ITEM | INDEX)) if values.lenient => Cow::Borrowed(""),
            Piece::Ref(Ref::Param(ITEM)) if values.item.is_some() => values.item("")?,
            Piece::Ref(Ref::Param(INDEX)) if values.item.is_some() => {
                Cow::Owned(values.item.map_or(0, |i| i.index).to_string())
            }
            Piece::Ref(Ref::Param(p)) => values
                .params
                .get(p)
                .map(|v| Cow::Borrowed(v.as_str()))
                .ok_or_else(|| format!("no value for parameter \"{p}\""))?,
            Piece::Ref(Ref::Output(s)) => Cow::Borrowed(values.output(s)?),
            Piece::Ref(Ref::Json(s, path)) => values.json(s, path)?,
            Piece::Ref(Ref::Item(path)) => values.item(path)?,
        };
        budget.left = budget.left.checked_sub(text.len()).ok_or_else(|| {
            format!(
                "the step's fields, with their values substituted, exceed {} bytes",
                budget.limit
            )
        })?;
        out.push(text);
    }
    Ok(out.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_params_and_outputs() {
        assert_eq!(
            refs("a ${topic} b ${fetch.output}").unwrap(),
            vec![Ref::Param("topic"), Ref::Output("fetch")]
        );
        assert_eq!(refs("cost: $$5 and $ alone").unwrap(), vec![]);
    }

    #[test]
    fn rejects_malformed_references() {
        assert_eq!(refs("x ${topic").unwrap_err(), "unterminated \"${\" in \"x ${topic\"");
        assert!(refs("${}").unwrap_err().contains("is not a reference"));
        assert!(refs("${a b}").unwrap_err().contains("is not a reference"));
        assert!(refs("${a.b.output}").unwrap_err().contains("is not a reference"));
        assert!(refs("${a..json}").unwrap_err().contains("is not a reference"));
        assert!(refs("${a.stdout}").unwrap_err().contains("is not a reference"));
    }

    #[test]
    fn renders_values() {
        let params = BTreeMap::from([("topic".to_string(), "queues".to_string())]);
        let outputs = BTreeMap::from([("fetch".to_string(), "3 docs".to_string())]);
        let mut budget = Budget::new(1000);
        assert_eq!(
            render(
                "On ${topic}: ${fetch.output} ($$1)",
                &Values::new(&params, &outputs, None),
                &mut budget
            )
            .unwrap(),
            "On queues: 3 docs ($1)"
        );
        assert_eq!(budget.left, 1000 - 22);
        assert_eq!(
            render("${nope}", &Values::new(&params, &outputs, None), &mut budget).unwrap_err(),
            "no value for parameter \"nope\""
        );
    }

    #[test]
    fn a_render_over_the_budget_fails_before_allocating() {
        // 100,000 references to a 1 MB value would be 100 GB.
        let params = BTreeMap::from([("p".to_string(), "x".repeat(1_000_000))]);
        let template = "${p}".repeat(100_000);
        let mut budget = Budget::new(16 * 1024 * 1024);
        assert_eq!(
            render(&template, &Values::new(&params, &BTreeMap::new(), None), &mut budget).unwrap_err(),
            "the step's fields, with their values substituted, exceed 16777216 bytes"
        );
    }

    #[test]
    fn selects_into_json_outputs_and_items() {
        let params = BTreeMap::new();
        let outputs = BTreeMap::from([
            (
                "plan".to_string(),
                r#"{"files": [{"path": "a.rs"}, {"path": "b.rs"}], "n": 2}"#.to_string(),
            ),
            ("text".to_string(), "not json".to_string()),
        ]);
        let item = Item {
            index: 1,
            value: serde_json::json!({"path": "b.rs", "lines": [3, 4]}),
        };
        let values = Values::new(&params, &outputs, Some(&item));
        let mut budget = Budget::new(1000);
        let r = |t: &str, b: &mut Budget| render(t, &values, b);
        assert_eq!(
            r("${plan.json.files.1.path} ${plan.json.n}", &mut budget).unwrap(),
            "b.rs 2"
        );
        assert_eq!(r("${plan.json.files.0}", &mut budget).unwrap(), r#"{"path":"a.rs"}"#);
        assert_eq!(
            r("${index}: ${item.path} ${item.lines.1}", &mut budget).unwrap(),
            "1: b.rs 4"
        );
        assert_eq!(r("${item}", &mut budget).unwrap(), r#"{"lines":[3,4],"path":"b.rs"}"#);
        assert_eq!(
            r("${plan.json.files.9}", &mut budget).unwrap_err(),
            "the output of step \"plan\" has no \"files.9\""
        );
        assert!(r("${text.json}", &mut budget).unwrap_err().contains("is not JSON"));
        assert_eq!(r("${item.nope}", &mut budget).unwrap_err(), "item 1 has no \"nope\"");
        assert_eq!(refs("${plan.json}").unwrap(), vec![Ref::Json("plan", "")]);
        assert_eq!(refs("${item.a.b}").unwrap(), vec![Ref::Item("a.b")]);
    }

    #[test]
    fn repeated_json_references_are_parsed_once_and_charged_each_time() {
        // 10,000 references into a 1.6 MB output: parsed each time, that
        // would be 16 GB of JSON; parsed once, it is quick.
        let big = format!("[{}]", vec!["1"; 800_000].join(","));
        let outputs = BTreeMap::from([("p".to_string(), big)]);
        let params = BTreeMap::new();
        let values = Values::new(&params, &outputs, None);
        let started = std::time::Instant::now();
        let rendered = render(&"${p.json.7}".repeat(10_000), &values, &mut Budget::new(1 << 20)).unwrap();
        assert_eq!(rendered.len(), 10_000);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // And each reference is charged: a large one repeated hits the budget.
        let mut budget = Budget::new(16 * 1024 * 1024);
        assert!(
            render(&"${p.json}".repeat(100), &values, &mut budget)
                .unwrap_err()
                .contains("exceed")
        );
    }
}
