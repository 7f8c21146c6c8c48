//! `${param}` and `${step.output}` substitution in step fields.
//!
//! `$$` stands for a literal `$`. References are checked at load time, so
//! rendering at dispatch only fails if the caller passes incomplete inputs.

use std::collections::BTreeMap;

/// A reference inside a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ref<'a> {
    /// `${name}`: a workflow parameter.
    Param(&'a str),
    /// `${step.output}`: an upstream step's output.
    Output(&'a str),
}

enum Piece<'a> {
    Text(&'a str),
    Ref(Ref<'a>),
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
            let name = &inner[..end];
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !valid {
                return Err(format!(
                    "\"${{{name}}}\" is not a reference: use ${{param}} or ${{step.output}}"
                ));
            }
            let reference = match name.strip_suffix(".output") {
                Some(step) if !step.contains('.') => Ref::Output(step),
                None if !name.contains('.') => Ref::Param(name),
                _ => {
                    return Err(format!(
                        "\"${{{name}}}\" is not a reference: use ${{param}} or ${{step.output}}"
                    ));
                }
            };
            pieces.push(Piece::Ref(reference));
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

/// Substitute params and upstream outputs into `template`, spending from
/// `budget`: a template that would render past it fails before anything is
/// allocated, so a short file that repeats a large value cannot expand
/// without bound.
///
/// # Errors
/// A message naming a malformed reference, a value that was not given, or
/// the budget.
pub fn render(
    template: &str,
    params: &BTreeMap<String, String>,
    outputs: &BTreeMap<String, String>,
    budget: &mut Budget,
) -> Result<String, String> {
    let pieces: Vec<&str> = parse(template)?
        .into_iter()
        .map(|piece| match piece {
            Piece::Text(t) => Ok(t),
            Piece::Ref(Ref::Param(p)) => params
                .get(p)
                .map(String::as_str)
                .ok_or_else(|| format!("no value for parameter \"{p}\"")),
            Piece::Ref(Ref::Output(s)) => outputs
                .get(s)
                .map(String::as_str)
                .ok_or_else(|| format!("no output from step \"{s}\"")),
        })
        .collect::<Result<_, String>>()?;
    let len = pieces.iter().map(|p| p.len()).fold(0usize, usize::saturating_add);
    budget.left = budget.left.checked_sub(len).ok_or_else(|| {
        format!(
            "the step's fields, with their values substituted, exceed {} bytes",
            budget.limit
        )
    })?;
    Ok(pieces.concat())
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
        assert!(refs("${a.stdout}").unwrap_err().contains("is not a reference"));
    }

    #[test]
    fn renders_values() {
        let params = BTreeMap::from([("topic".to_string(), "queues".to_string())]);
        let outputs = BTreeMap::from([("fetch".to_string(), "3 docs".to_string())]);
        let mut budget = Budget::new(1000);
        assert_eq!(
            render("On ${topic}: ${fetch.output} ($$1)", &params, &outputs, &mut budget).unwrap(),
            "On queues: 3 docs ($1)"
        );
        assert_eq!(budget.left, 1000 - 22);
        assert_eq!(
            render("${nope}", &params, &outputs, &mut budget).unwrap_err(),
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
            render(&template, &params, &BTreeMap::new(), &mut budget).unwrap_err(),
            "the step's fields, with their values substituted, exceed 16777216 bytes"
        );
    }
}
