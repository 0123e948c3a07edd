//! Kubernetes label selectors (`app=web,tier in (front,api),!canary`), as `kubectl -l` reads
//! them: every requirement of a selector must hold.

use std::collections::BTreeMap;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    /// `key=value`, `key==value`, `key in (a,b)`
    In(String, Vec<String>),
    /// `key!=value`, `key notin (a,b)`: also true when the label is absent.
    NotIn(String, Vec<String>),
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
}

/// A parsed label selector; an empty string selects every pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    text: String,
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses `kubectl -l` syntax; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("label selector {text:?}: empty requirement"));
            }
            requirements.push(parse_requirement(part).map_err(|e| format!("label selector {text:?}: {e}"))?);
        }
        Ok(LabelSelector { text: text.trim().to_owned(), requirements })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl TryFrom<String> for LabelSelector {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        LabelSelector::parse(&s)
    }
}

impl<'de> serde::Deserialize<'de> for LabelSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LabelSelector::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("label selector {text:?}: unbalanced ')'"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("label selector {text:?}: unbalanced '('"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::NotExists(check_key(key.trim())?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotIn(check_key(k.trim())?, vec![check_value(v.trim())?]));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::In(check_key(k.trim())?, vec![check_value(v.trim())?]));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let list = part[open + 1..].strip_suffix(')').ok_or_else(|| format!("{part:?}: expected ')' at the end"))?;
        let values = list.split(',').map(|v| check_value(v.trim())).collect::<Result<Vec<_>, _>>()?;
        let (key, op) = head.rsplit_once(char::is_whitespace).ok_or_else(|| format!("{part:?}: expected `KEY in (...)` or `KEY notin (...)`"))?;
        let key = check_key(key.trim())?;
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            other => Err(format!("{part:?}: unknown operator {other:?}, expected `in` or `notin`")),
        };
    }
    Ok(Requirement::Exists(check_key(part)?))
}

/// Label keys: an optional DNS prefix and `/`, then a name of [A-Za-z0-9._-] (at most 63).
fn check_key(key: &str) -> Result<String, String> {
    let name = key.rsplit_once('/').map_or(key, |(_, n)| n);
    let ok = !name.is_empty()
        && name.len() <= 63
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    if ok { Ok(key.to_owned()) } else { Err(format!("{key:?} is not a valid label key")) }
}

fn check_value(v: &str) -> Result<String, String> {
    let ok = v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok { Ok(v.to_owned()) } else { Err(format!("{v:?} is not a valid label value")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_operator() {
        let pod = labels(&[("app", "web"), ("tier", "front"), ("app.kubernetes.io/name", "shop")]);
        let yes = ["app=web", "app==web", "app!=db", "tier in (front, api)", "tier notin (db)", "app", "!canary",
                   "app=web,tier in (front),!canary", "app.kubernetes.io/name=shop", "missing!=x", ""];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&pod), "{s} should match");
        }
        let no = ["app=db", "app!=web", "tier in (db,api)", "tier notin (front)", "canary", "!app", "app=web,canary"];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&pod), "{s} should not match");
        }
    }

    #[test]
    fn errors_name_the_selector() {
        for (s, want) in [("app in (a,b", "unbalanced '('"), ("a b c", "not a valid label key"),
                          ("x in (a)b", "expected ')'"), ("x within (a)", "unknown operator"),
                          ("app=we b", "not a valid label value"), ("a,,b", "empty requirement")] {
            let err = LabelSelector::parse(s).unwrap_err();
            assert!(err.contains(want) && err.contains(s), "{s}: {err}");
        }
    }
}
