//! Patterns users select with: cgroup paths and globs, executable name globs.

use globset::{Glob, GlobBuilder, GlobMatcher};

/// True when `s` contains a glob metacharacter.
fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

fn glob(text: &str, pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g: Glob| g.compile_matcher())
        .map_err(|e| format!("{text:?} is not a valid glob: {}", e.kind()))
}

/// A cgroup v2 path or glob as the user wrote it. Paths are relative to the cgroup2 mount (a
/// leading mount prefix is stripped when the pattern is applied to a mount). `*`, `?`, `[..]`
/// stay within one path component; `**` spans any number of components.
#[derive(Clone, Debug)]
pub struct CgroupPattern {
    text: String,
    /// Normalized components (no empty ones).
    components: Vec<Component>,
}

#[derive(Clone, Debug)]
enum Component {
    Literal(String),
    Glob(GlobMatcher),
    /// `**`
    Any,
}

impl PartialEq for CgroupPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl CgroupPattern {
    pub fn parse(text: &str) -> Result<CgroupPattern, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("empty cgroup path".into());
        }
        let mut components = Vec::new();
        for c in trimmed.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if c == ".." {
                return Err(format!("{text:?}: `..` is not allowed in a cgroup path"));
            }
            components.push(if c == "**" {
                Component::Any
            } else if c.contains("**") {
                return Err(format!("{text:?}: `**` must be a whole path component (`/a/**/b`)"));
            } else if is_glob(c) {
                Component::Glob(glob(text, c)?)
            } else {
                Component::Literal(c.to_owned())
            });
        }
        Ok(CgroupPattern { text: trimmed.to_owned(), components })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// No glob at all: one directory (which must exist).
    pub fn is_literal(&self) -> bool {
        self.components.iter().all(|c| matches!(c, Component::Literal(_)))
    }

    /// The pattern with `mount` removed from its front when it was written as an absolute path
    /// inside the mount (`/sys/fs/cgroup/unified/kubepods/*` -> `/kubepods/*`).
    pub fn relative_to(&self, mount: &std::path::Path) -> CgroupPattern {
        let mount_parts: Vec<String> = mount
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let n = mount_parts.len();
        let prefixed = self.components.len() >= n
            && n > 0
            && self.components[..n].iter().zip(&mount_parts).all(|(c, m)| matches!(c, Component::Literal(l) if l == m));
        if !prefixed {
            return self.clone();
        }
        CgroupPattern { text: self.text.clone(), components: self.components[n..].to_vec() }
    }

    /// The literal directories before the first glob component (`/kubepods` for
    /// `/kubepods/**/pod*`): where watching has to start.
    pub fn static_prefix(&self) -> Vec<&str> {
        self.components
            .iter()
            .map_while(|c| match c {
                Component::Literal(l) => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the cgroup at `path` (components relative to the mount) matches exactly.
    pub fn matches(&self, path: &[&str]) -> bool {
        match_from(&self.components, path)
    }

    /// Whether some descendant of `path` could match: the directories to keep watching.
    pub fn may_match_below(&self, path: &[&str]) -> bool {
        prefix_may_match(&self.components, path)
    }
}

fn component_matches(c: &Component, s: &str) -> bool {
    match c {
        Component::Literal(l) => l == s,
        Component::Glob(g) => g.is_match(s),
        Component::Any => true,
    }
}

fn match_from(pattern: &[Component], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((Component::Any, rest)) => (0..=path.len()).any(|skip| match_from(rest, &path[skip..])),
        Some((c, rest)) => path.split_first().is_some_and(|(p, tail)| component_matches(c, p) && match_from(rest, tail)),
    }
}

/// True when `path` is a proper prefix of something the pattern matches.
fn prefix_may_match(pattern: &[Component], path: &[&str]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (Some((Component::Any, _)), _) => true,
        (Some(_), None) => true,
        (None, _) => false,
        (Some((c, rest)), Some((p, tail))) => component_matches(c, p) && prefix_may_match(rest, tail),
    }
}

impl std::fmt::Display for CgroupPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for CgroupPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CgroupPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An executable name glob (`python3*`), matched against the executable's file name.
#[derive(Clone, Debug)]
pub struct ExeGlob {
    text: String,
    matcher: GlobMatcher,
}

impl PartialEq for ExeGlob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl ExeGlob {
    pub fn parse(text: &str) -> Result<ExeGlob, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty executable name".into());
        }
        if t.contains('/') {
            return Err(format!("{text:?}: give an executable file name, not a path"));
        }
        Ok(ExeGlob { text: t.to_owned(), matcher: glob(text, t)? })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }
}

impl std::fmt::Display for ExeGlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for ExeGlob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ExeGlob::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(p: &str) -> Vec<&str> {
        p.split('/').filter(|c| !c.is_empty()).collect()
    }

    #[test]
    fn globs_match_per_component() {
        let p = CgroupPattern::parse("/kubepods/**/pod*").unwrap();
        assert!(p.matches(&parts("/kubepods/podabc")));
        assert!(p.matches(&parts("/kubepods/burstable/pod0f3c")));
        assert!(!p.matches(&parts("/kubepods/burstable/pod0f3c/cafe")));
        assert!(!p.matches(&parts("/system.slice/pod1")));
        assert!(p.may_match_below(&parts("/kubepods/burstable/pod0f3c")));
        assert!(!p.may_match_below(&parts("/system.slice")));
        assert_eq!(p.static_prefix(), vec!["kubepods"]);

        let one = CgroupPattern::parse("svc-*").unwrap();
        assert!(one.matches(&parts("/svc-a")) && !one.matches(&parts("/x/svc-a")) && !one.matches(&parts("/svc-a/b")));
        assert!(one.may_match_below(&[]) && !one.may_match_below(&parts("/svc-a")));
        assert!(!CgroupPattern::parse("/a/b").unwrap().may_match_below(&parts("/c")));
        assert!(CgroupPattern::parse("/a/b").unwrap().is_literal());
        assert!(!one.is_literal());
    }

    #[test]
    fn absolute_patterns_lose_the_mount() {
        let p = CgroupPattern::parse("/sys/fs/cgroup/unified/svc-*").unwrap();
        let rel = p.relative_to(std::path::Path::new("/sys/fs/cgroup/unified"));
        assert!(rel.matches(&["svc-1"]));
        assert!(!p.relative_to(std::path::Path::new("/sys/fs/cgroup")).matches(&["svc-1"]));
    }

    #[test]
    fn bad_patterns_are_named() {
        for (p, want) in [("/a/../b", "`..`"), ("/a/x**/b", "whole path component"), ("/a/[b", "not a valid glob"), ("  ", "empty")] {
            let e = CgroupPattern::parse(p).unwrap_err();
            assert!(e.contains(want), "{p}: {e}");
        }
        assert!(ExeGlob::parse("/usr/bin/python3").unwrap_err().contains("not a path"));
        let g = ExeGlob::parse("python3*").unwrap();
        assert!(g.matches("python3.11") && !g.matches("node"));
    }
}
