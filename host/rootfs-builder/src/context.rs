//! The build context COPY reads from: sources resolve inside it or not at
//! all, and `*`, `?`, `[…]` match within one path component.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use globset::{GlobBuilder, GlobMatcher};

/// The build context: COPY sources resolve inside it or not at all.
#[derive(Debug, Clone)]
pub struct Context {
    root: PathBuf,
}

/// A COPY source found in the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Context-relative path as matched (`.` for the whole context).
    pub display: String,
    /// Last path component as matched: the name a file gets in a directory destination.
    pub name: String,
    /// The real path, symlinks resolved (inside the context).
    pub path: PathBuf,
}

impl Context {
    pub fn open(dir: &Path) -> Result<Context> {
        let root = fs::canonicalize(dir).with_context(|| format!("open the build context {}", dir.display()))?;
        if !root.is_dir() {
            bail!("the build context {} is not a directory", dir.display());
        }
        Ok(Context { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves one COPY source: `/` or no prefix both mean the context root,
    /// `..` may not climb out of it, `*`/`?`/`[…]` match within one component,
    /// and the real path (symlinks followed) must stay inside the context.
    pub fn resolve(&self, source: &str) -> Result<Vec<Source>> {
        let mut parts: Vec<&str> = Vec::new();
        for part in source.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        bail!("source {source} is outside the build context (.. climbs above it)");
                    }
                }
                p => parts.push(p),
            }
        }
        let mut matches = vec![(self.root.clone(), Vec::<String>::new())];
        for part in &parts {
            let matcher = if is_pattern(part) { Some(component_matcher(part)?) } else { None };
            let mut next = Vec::new();
            for (dir, rel) in matches {
                if let Some(matcher) = &matcher {
                    let Ok(listing) = fs::read_dir(&dir) else { continue };
                    let mut names: Vec<String> =
                        listing.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
                    names.sort();
                    for name in names.into_iter().filter(|n| matcher.is_match(n)) {
                        let mut rel = rel.clone();
                        rel.push(name.clone());
                        next.push((dir.join(&name), rel));
                    }
                } else {
                    let mut rel = rel.clone();
                    rel.push((*part).to_owned());
                    next.push((dir.join(part), rel));
                }
            }
            matches = next;
        }
        let mut sources = Vec::new();
        for (path, rel) in matches {
            let display = if rel.is_empty() { ".".to_owned() } else { rel.join("/") };
            let real = match fs::canonicalize(&path) {
                Ok(real) => real,
                Err(_) if fs::symlink_metadata(&path).is_ok() => {
                    bail!("source {display} is a symlink that points to nothing in the build context")
                }
                Err(_) if parts.iter().any(|p| is_pattern(p)) => continue,
                Err(_) => bail!("source {display} does not exist in the build context"),
            };
            if !real.starts_with(&self.root) {
                bail!("source {display} resolves outside the build context (through a symlink); it is refused");
            }
            sources.push(Source { name: rel.last().cloned().unwrap_or_default(), display, path: real });
        }
        if sources.is_empty() {
            bail!("source {source} matches no file in the build context");
        }
        Ok(sources)
    }
}

fn is_pattern(part: &str) -> bool {
    part.contains(['*', '?', '['])
}

/// Docker's pattern for one path component (`*`, `?`, `[abc]`, `[a-z]`,
/// `[!x]`, `\` escapes) as a globset matcher. globset compiles it to a
/// regex automaton, so matching is linear in the name whatever the pattern.
fn component_matcher(pattern: &str) -> Result<GlobMatcher> {
    // `{a,b}` is globset syntax, not Docker's: escaped, braces match themselves.
    let docker = pattern.replace('{', "\\{").replace('}', "\\}");
    let glob = GlobBuilder::new(&docker)
        .literal_separator(true)
        .backslash_escape(true)
        .allow_unclosed_class(true)
        .build()
        .with_context(|| format!("source pattern {pattern} is not a valid pattern"))?;
    Ok(glob.compile_matcher())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    pub(crate) fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// A context (`app/main.py`, `app/lib/util.py`, `README.md`, `a.txt`, `b.txt`)
    /// in a temporary directory that also holds `secret`, outside it.
    pub(crate) fn setup() -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("context");
        write(&ctx.join("app/main.py"), "print(1)\n");
        write(&ctx.join("app/lib/util.py"), "x = 1\n");
        write(&ctx.join("README.md"), "readme\n");
        write(&ctx.join("a.txt"), "a\n");
        write(&ctx.join("b.txt"), "bb\n");
        write(&dir.path().join("secret"), "top secret\n");
        (dir, Context::open(&ctx).unwrap())
    }

    #[test]
    fn sources_may_not_escape_the_context() {
        let (dir, context) = setup();
        let err = context.resolve("../secret").unwrap_err().to_string();
        assert!(err.contains("outside the build context"), "{err}");
        let err = context.resolve("app/../../secret").unwrap_err().to_string();
        assert!(err.contains("outside the build context"), "{err}");
        symlink(dir.path().join("secret"), context.root().join("leak")).unwrap();
        let err = context.resolve("leak").unwrap_err().to_string();
        assert!(err.contains("resolves outside the build context"), "{err}");
        symlink("/etc", context.root().join("etc-link")).unwrap();
        assert!(context.resolve("etc-link/passwd").unwrap_err().to_string().contains("outside"));
        // An absolute source means the context root, as in Docker.
        assert_eq!(context.resolve("/a.txt").unwrap()[0].path, context.root().join("a.txt"));
        // A symlink that stays inside is followed.
        symlink("app/main.py", context.root().join("main-link")).unwrap();
        assert_eq!(context.resolve("main-link").unwrap()[0].path, context.root().join("app/main.py"));
        let err = context.resolve("missing.txt").unwrap_err().to_string();
        assert!(err.contains("does not exist in the build context"), "{err}");
    }

    #[test]
    fn globs_expand_within_a_component() {
        let (_dir, context) = setup();
        let names: Vec<String> = context.resolve("*.txt").unwrap().into_iter().map(|s| s.display).collect();
        assert_eq!(names, ["a.txt", "b.txt"]);
        assert!(context.resolve("*.rs").unwrap_err().to_string().contains("matches no file"));
        let matches = |pattern: &str, name: &str| component_matcher(pattern).unwrap().is_match(name);
        assert!(matches("[a-c]?.t*", "b1.txt"));
        assert!(!matches("[!a]*", "abc"));
        assert!(matches("*", ".hidden"));
        assert!(!matches("*", "a/b"), "one component only");
        assert!(matches("{a,b}", "{a,b}") && !matches("{a,b}*", "a"), "braces are literal, as in Docker");
        assert!(matches("[ab", "[ab"), "an unclosed class is literal");
        assert!(matches("\\*x", "*x") && !matches("\\*x", "ax"), "a backslash escapes");
        assert!(component_matcher("[z-a]").unwrap_err().to_string().contains("source pattern [z-a] is not a valid"));
    }

    #[test]
    fn a_hostile_pattern_against_a_long_name_finishes() {
        // A backtracking matcher tries ~C(250, 12) splits here and never ends.
        let (_dir, context) = setup();
        let long = "a".repeat(250);
        write(&context.root().join(&long), "x");
        let hostile = "a*a*a*a*a*a*a*a*a*a*a*a*b";
        let err = context.resolve(hostile).unwrap_err().to_string();
        assert_eq!(err, format!("source {hostile} matches no file in the build context"));
        assert!(!component_matcher(hostile).unwrap().is_match("a".repeat(100_000)));
        assert_eq!(context.resolve("a*a*a*a*a*a*a*a*a*a*a*a*a").unwrap()[0].name, long);
    }
}
