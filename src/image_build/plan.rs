//! Planning a Dockerfile before prepare (wit/protocol.md §2.2): which external
//! references to look up, and which one is the final stage's base.

/// What the build needs to know about a Dockerfile before prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The final stage's FROM reference, as written.
    pub base_image: String,
    /// The final FROM, when it may be a template (not `scratch`, not a
    /// stage alias, no `$` or `@`): a template here makes a diff build.
    pub final_lookup: Option<String>,
    /// Other external references to look up (earlier FROMs, `COPY --from`,
    /// `RUN --mount=…,from=`), in order, without duplicates.
    pub other_lookups: Vec<String>,
}

/// Why a Dockerfile cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// No FROM line at all.
    NoFrom,
    /// A FROM line without an image.
    EmptyFrom { line: usize },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::NoFrom => write!(f, "the Dockerfile has no FROM instruction"),
            PlanError::EmptyFrom { line } => write!(f, "Dockerfile line {line}: FROM names no image"),
        }
    }
}

impl std::error::Error for PlanError {}

/// Joins continuation lines; yields (first line number, instruction text).
fn instructions(dockerfile: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in dockerfile.lines().enumerate() {
        let line = raw.trim();
        if current.is_none() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        let (start, mut text) = current.take().unwrap_or((i + 1, String::new()));
        if line.starts_with('#') {
            current = Some((start, text));
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                text.push_str(head);
                text.push(' ');
                current = Some((start, text));
            }
            None => {
                text.push_str(line);
                out.push((start, text));
            }
        }
    }
    if let Some((start, text)) = current {
        out.push((start, text));
    }
    out
}

fn external(reference: &str, aliases: &[String]) -> bool {
    !reference.eq_ignore_ascii_case("scratch")
        && !reference.contains('$')
        && !reference.contains('@')
        && !aliases.iter().any(|a| a.eq_ignore_ascii_case(reference))
}

/// Plans `dockerfile`.
pub fn plan(dockerfile: &str) -> Result<Plan, PlanError> {
    let mut aliases: Vec<String> = Vec::new();
    let mut froms: Vec<(String, Vec<String>)> = Vec::new(); // (reference, aliases known before it)
    let mut others: Vec<String> = Vec::new();
    for (line, text) in instructions(dockerfile) {
        let mut words = text.split_whitespace();
        let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
        let rest: Vec<&str> = words.collect();
        match keyword.as_str() {
            "FROM" => {
                let args: Vec<&str> = rest.iter().copied().filter(|w| !w.starts_with("--")).collect();
                let reference = args.first().ok_or(PlanError::EmptyFrom { line })?.to_string();
                froms.push((reference, aliases.clone()));
                if let (Some(as_kw), Some(alias)) = (args.get(1), args.get(2))
                    && as_kw.eq_ignore_ascii_case("as")
                {
                    aliases.push(alias.to_string());
                }
            }
            "COPY" | "ADD" => {
                // An empty `--from=` names nothing to look up (found by fuzzing: it was looked up as "").
                for flag in rest.iter().filter_map(|w| w.strip_prefix("--from=")).filter(|f| !f.is_empty()) {
                    others.push(flag.to_owned());
                }
            }
            "RUN" => {
                for mount in rest.iter().filter_map(|w| w.strip_prefix("--mount=")) {
                    for option in mount.split(',') {
                        if let Some(from) = option.strip_prefix("from=").filter(|f| !f.is_empty()) {
                            others.push(from.to_owned());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let (base_image, final_aliases) = froms.pop().ok_or(PlanError::NoFrom)?;
    let final_lookup = external(&base_image, &final_aliases).then(|| base_image.clone());
    let mut other_lookups: Vec<String> = Vec::new();
    let earlier = froms.into_iter().filter(|(r, known)| external(r, known)).map(|(r, _)| r);
    for reference in earlier.chain(others.into_iter().filter(|r| external(r, &aliases))) {
        if !other_lookups.contains(&reference) && Some(&reference) != final_lookup.as_ref() {
            other_lookups.push(reference);
        }
    }
    Ok(Plan { base_image, final_lookup, other_lookups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_from_a_template_name_is_looked_up_for_a_diff_build() {
        let p =
            plan("FROM tensorlake/ubuntu-minimal\nCOPY --from=tensorlake/utility:1.0 /bin/foo /usr/local/bin/foo\n")
                .unwrap();
        assert_eq!(p.base_image, "tensorlake/ubuntu-minimal");
        assert_eq!(p.final_lookup.as_deref(), Some("tensorlake/ubuntu-minimal"));
        assert_eq!(p.other_lookups, ["tensorlake/utility:1.0"]);
    }

    #[test]
    fn scratch_aliases_variables_and_digests_are_not_looked_up() {
        assert_eq!(plan("FROM scratch\nCOPY a /a\n").unwrap().final_lookup, None);
        let staged = plan("FROM golang:1.22 AS build\nRUN --mount=type=cache,from=cachebase,target=/c go build\nFROM build\nCOPY --from=build /x /x\n").unwrap();
        assert_eq!(staged.base_image, "build");
        assert_eq!(staged.final_lookup, None, "final FROM is a stage alias");
        assert_eq!(staged.other_lookups, ["golang:1.22", "cachebase"]);
        assert_eq!(plan("ARG BASE=x\nFROM $BASE\n").unwrap().final_lookup, None);
        assert_eq!(plan("FROM img@sha256:abc\n").unwrap().final_lookup, None);
        assert_eq!(plan("FROM --platform=linux/amd64 base\n").unwrap().final_lookup.as_deref(), Some("base"));
    }

    #[test]
    fn continuations_and_comments_and_errors() {
        let p = plan("# syntax\nFROM \\\n  base AS b\n# note\nCOPY --from=other \\\n /a /b\n").unwrap();
        assert_eq!((p.base_image.as_str(), p.other_lookups.as_slice()), ("base", &["other".to_owned()][..]));
        assert_eq!(plan("COPY a b\n"), Err(PlanError::NoFrom));
        assert_eq!(plan("\nFROM\n"), Err(PlanError::EmptyFrom { line: 2 }));
    }

    #[test]
    fn an_empty_from_flag_is_not_looked_up() {
        let p = plan("FROM tensorlake/a\nCOPY --from= /x /y\nRUN --mount=type=cache,from=,target=/c true\n").unwrap();
        assert_eq!(p.final_lookup.as_deref(), Some("tensorlake/a"));
        assert!(p.other_lookups.is_empty(), "{p:?}");
    }
}
