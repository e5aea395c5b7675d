//! `.dockerignore` patterns with Docker's semantics (moby's patternmatcher
//! and buildkit's dockerignore reader), for what `upload-directory` leaves
//! out:
//!
//! - a line is trimmed; empty lines and lines starting with `#` are skipped;
//! - `!` makes an exception; the path is cleaned (`./`, `//`, `a/..`
//!   resolved lexically) and a leading `/` dropped;
//! - `*` matches within one path element, `?` one character but `/`,
//!   `[...]` a class, `\` escapes, and `**` any number of elements (none
//!   included; `**/` is `**`, a trailing `**` everything below);
//! - a path is left out when the last pattern that matches it or one of its
//!   parent directories is not an exception;
//! - a directory left out is not entered, unless an exception names a path
//!   inside it: then it is entered and only what matches is sent.

use regex::Regex;

/// One pattern, compiled.
#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned pattern, as written (without `!`).
    text: String,
    exception: bool,
    regex: Regex,
}

/// The patterns of one `.dockerignore`, in order.
#[derive(Debug, Clone, Default)]
pub struct Patterns {
    patterns: Vec<Pattern>,
}

impl Patterns {
    /// Reads `lines` as `.dockerignore` lines; an invalid pattern is an error naming it.
    pub fn new(lines: &[String]) -> Result<Patterns, String> {
        let mut patterns = Vec::new();
        for (i, raw) in lines.iter().enumerate() {
            let line = if i == 0 { raw.trim_start_matches('\u{feff}') } else { raw.as_str() };
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (exception, rest) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            if rest.is_empty() {
                return Err(format!("pattern {raw:?}: an exception (!) needs a pattern after it"));
            }
            let mut text = clean(rest);
            if text.len() > 1 && text.starts_with('/') {
                text.remove(0);
            }
            let regex = Regex::new(&to_regex(&text)).map_err(|e| format!("pattern {raw:?} is not valid: {e}"))?;
            patterns.push(Pattern { text, exception, regex });
        }
        Ok(Patterns { patterns })
    }

    /// No pattern at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (relative, `/`-separated, clean) is left out.
    pub fn excludes(&self, path: &str) -> bool {
        let parents: Vec<&str> = match path.rfind('/') {
            Some(at) => path[..at].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for pattern in &self.patterns {
            // An exception only matters once something matched, a pattern only until then.
            if pattern.exception != matched {
                continue;
            }
            let hit = pattern.regex.is_match(path)
                || (1..=parents.len()).any(|n| pattern.regex.is_match(&parents[..n].join("/")));
            if hit {
                matched = !pattern.exception;
            }
        }
        matched
    }

    /// Whether an exception names a path inside directory `dir` (so a left-out
    /// `dir` must still be entered).
    pub fn has_exception_below(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.patterns.iter().any(|p| p.exception && format!("{}/", p.text).starts_with(&prefix))
    }
}

/// Lexical cleaning, as Go's `filepath.Clean`: no empty or `.` elements,
/// `a/..` removed, no trailing `/`; `..` above the start kept (relative) or
/// dropped (absolute).
fn clean(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if absolute => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// The pattern as an anchored regex, as patternmatcher compiles it.
fn to_regex(pattern: &str) -> String {
    let mut out = String::from("^");
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    while let Some(ch) = chars.next() {
        if in_class {
            match ch {
                ']' => {
                    in_class = false;
                    out.push(']');
                }
                '\\' => {
                    if let Some(next) = chars.next() {
                        out.push_str(&regex::escape(&next.to_string()));
                    }
                }
                // Set operators in Rust's classes; plain characters in Go's.
                '&' | '~' => out.push_str(&regex::escape(&ch.to_string())),
                other => out.push(other),
            }
            continue;
        }
        match ch {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    out.push_str(".*");
                } else {
                    out.push_str("(.*/)?");
                }
            }
            '*' => out.push_str("[^/]*"),
            '?' => out.push_str("[^/]"),
            '[' => {
                in_class = true;
                out.push('[');
            }
            '\\' => match chars.next() {
                Some(next) => out.push_str(&regex::escape(&next.to_string())),
                None => out.push_str("\\\\"),
            },
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(lines: &[&str]) -> Patterns {
        Patterns::new(&lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn the_examples_of_dockers_reference() {
        // https://docs.docker.com/build/concepts/context/#dockerignore-files
        let p = patterns(&["# comment", "*/temp*", "*/*/temp*", "temp?"]);
        assert!(p.excludes("somedir/temporary.txt"));
        assert!(p.excludes("somedir/temp"));
        assert!(p.excludes("somedir/subdir/temporary.txt"));
        assert!(p.excludes("tempa"));
        assert!(p.excludes("tempb"));
        assert!(!p.excludes("temp"), "temp? needs one more character");
        assert!(!p.excludes("temporary.txt"), "*/temp* needs a directory above");
        assert!(!p.excludes("# comment"));

        let p = patterns(&["**/*.go"]);
        assert!(p.excludes("main.go") && p.excludes("a/b/c.go"));
        assert!(!p.excludes("a/b/c.gox"));

        let p = patterns(&["*.md", "!README.md"]);
        assert!(p.excludes("CHANGES.md"));
        assert!(!p.excludes("README.md"));

        let p = patterns(&["*.md", "!README*.md", "README-secret.md"]);
        assert!(p.excludes("README-secret.md"));
        assert!(!p.excludes("README-public.md"));
        assert!(p.excludes("notes.md"));

        let p = patterns(&["*.md", "README-secret.md", "!README*.md"]);
        assert!(!p.excludes("README-secret.md"), "the last match wins");
    }

    #[test]
    fn leading_slash_dot_slash_and_unclean_paths_are_normalised() {
        let p = patterns(&["/secret", "./build//out/", "a/b/../c", "  spaced  "]);
        assert!(p.excludes("secret"));
        assert!(p.excludes("build/out") && p.excludes("build/out/x.o"));
        assert!(p.excludes("a/c") && !p.excludes("a/b"));
        assert!(p.excludes("spaced"));
        assert!(patterns(&["\u{feff}bom"]).excludes("bom"));
    }

    #[test]
    fn a_directory_pattern_covers_what_is_below_it_and_exceptions_reopen_it() {
        let p = patterns(&["node_modules", "!node_modules/keep/me.js"]);
        assert!(p.excludes("node_modules"));
        assert!(p.excludes("node_modules/lib/x.js"), "a parent matched");
        assert!(!p.excludes("node_modules/keep/me.js"));
        assert!(p.has_exception_below("node_modules"));
        assert!(p.has_exception_below("node_modules/keep"));
        assert!(!p.has_exception_below("node_modules/lib"));
        let p = patterns(&["docs/**", "!docs/**/*.md"]);
        assert!(p.excludes("docs/img/a.png"));
        assert!(!p.excludes("docs/guide/intro.md"));
    }

    #[test]
    fn stars_stay_within_an_element_and_classes_and_escapes_work() {
        let p = patterns(&["a/*.txt"]);
        assert!(p.excludes("a/x.txt"));
        assert!(!p.excludes("a/b/x.txt"));
        let p = patterns(&["file[0-9].log", "x[^a]y", "q\\*"]);
        assert!(p.excludes("file7.log") && !p.excludes("filex.log"));
        assert!(p.excludes("xby") && !p.excludes("xay"));
        assert!(p.excludes("q*") && !p.excludes("qq"));
        let p = patterns(&["a+b(c).txt"]);
        assert!(p.excludes("a+b(c).txt") && !p.excludes("aab(c)xtxt"));
    }

    #[test]
    fn a_lone_exception_or_a_broken_class_is_an_error_naming_the_pattern() {
        let error = Patterns::new(&["!".to_owned()]).unwrap_err();
        assert!(error.contains("\"!\""), "{error}");
        let error = Patterns::new(&["[a-".to_owned()]).unwrap_err();
        assert!(error.contains("\"[a-\""), "{error}");
    }
}
