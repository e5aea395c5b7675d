//! Planning a Dockerfile before prepare (wit/protocol.md §2.2): which external
//! references to look up, and which one is the final stage's base.

use super::dockerfile::{self, DockerfileError, FromLine, unset_names};

/// What the build needs to know about a Dockerfile before prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The final stage's FROM reference, global ARGs substituted (as written
    /// when one of its variables has no value).
    pub base_image: String,
    /// The final FROM, when it may be a template (not `scratch`, not a stage
    /// alias, no `@`, no variable without a value): a template here makes a
    /// diff build.
    pub final_lookup: Option<String>,
    /// Other external references to look up (earlier FROMs, `COPY --from`,
    /// `RUN --mount=…,from=`), in order, without duplicates.
    pub other_lookups: Vec<String>,
    /// What the build log should say: FROMs skipped for want of a value.
    pub warnings: Vec<String>,
}

fn external(reference: &str, aliases: &[String]) -> bool {
    !reference.eq_ignore_ascii_case("scratch")
        && !reference.contains('$')
        && !reference.contains('@')
        && !aliases.iter().any(|a| a.eq_ignore_ascii_case(reference))
}

/// The warning for a FROM whose variables have no value: it is not looked up.
fn unset_warning(line: usize, from: &FromLine) -> String {
    format!(
        "Dockerfile line {line}: FROM {} is not looked up as a template: {} no value \
         (no default before the first FROM and no build argument)",
        from.written,
        unset_names(&from.unset)
    )
}

/// Plans `dockerfile`: the shared front end resolves global ARGs into every
/// FROM ([`dockerfile::stages`]); this picks what to look up.
pub fn plan(dockerfile: &str) -> Result<Plan, DockerfileError> {
    let instructions = dockerfile::parse(dockerfile);
    let stages = dockerfile::stages(&instructions)?;
    let mut warnings = Vec::new();
    let mut aliases: Vec<String> = Vec::new();
    let mut froms: Vec<(String, bool)> = Vec::new(); // (reference, whether to look it up)
    for from in &stages.froms {
        if from.unset.is_empty() {
            froms.push((from.image.clone(), external(&from.image, &aliases)));
        } else {
            warnings.push(unset_warning(instructions[from.index].line, from));
            // Kept as written so the final one still names the base image.
            froms.push((from.written.clone(), false));
        }
        aliases.extend(from.name.clone());
    }
    let mut others: Vec<String> = Vec::new();
    for ins in &instructions {
        let rest: Vec<&str> = ins.args.split_whitespace().collect();
        match ins.keyword.as_str() {
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
    let (base_image, final_external) = froms.pop().ok_or(DockerfileError::NoFrom)?;
    let final_lookup = final_external.then(|| base_image.clone());
    let mut other_lookups: Vec<String> = Vec::new();
    let earlier = froms.into_iter().filter(|(_, lookup)| *lookup).map(|(r, _)| r);
    for reference in earlier.chain(others.into_iter().filter(|r| external(r, &aliases))) {
        if !other_lookups.contains(&reference) && Some(&reference) != final_lookup.as_ref() {
            other_lookups.push(reference);
        }
    }
    Ok(Plan { base_image, final_lookup, other_lookups, warnings })
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
        assert_eq!(plan("FROM img@sha256:abc\n").unwrap().final_lookup, None);
        assert_eq!(plan("FROM --platform=linux/amd64 base\n").unwrap().final_lookup.as_deref(), Some("base"));
        let p = plan("FROM --platform=$BUILDPLATFORM golang:1.22 AS build\nFROM tensorlake/base\n").unwrap();
        assert_eq!((p.other_lookups.as_slice(), p.warnings.len()), (&["golang:1.22".to_owned()][..], 0));
    }

    #[test]
    fn continuations_and_comments_and_errors() {
        let p = plan("# syntax\nFROM \\\n  base AS b\n# note\nCOPY --from=other \\\n /a /b\n").unwrap();
        assert_eq!((p.base_image.as_str(), p.other_lookups.as_slice()), ("base", &["other".to_owned()][..]));
        assert_eq!(plan("COPY a b\n"), Err(DockerfileError::NoFrom));
        let err = plan("\nFROM\n").unwrap_err();
        assert_eq!(err.to_string(), "Dockerfile line 2: FROM: expected FROM <image> [AS <name>]");
    }

    #[test]
    fn a_global_arg_default_in_from_is_looked_up_like_the_name_itself() {
        let p = plan(
            "ARG BASE=tensorlake/base\nARG TOOLS=tensorlake/tools\nFROM $TOOLS AS tools\nFROM ${BASE}\n\
                      COPY --from=tools /t /t\n",
        )
        .unwrap();
        assert_eq!(p.base_image, "tensorlake/base");
        assert_eq!(p.final_lookup.as_deref(), Some("tensorlake/base"));
        assert_eq!(p.other_lookups, ["tensorlake/tools"]);
        assert!(p.warnings.is_empty(), "{p:?}");
        // A default that names a stage alias or scratch is not looked up either.
        assert_eq!(plan("ARG B=build\nFROM x AS build\nFROM $B\n").unwrap().final_lookup, None);
        assert_eq!(plan("ARG B=scratch\nFROM $B\n").unwrap().final_lookup, None);
    }

    #[test]
    fn an_arg_without_default_skips_the_lookup_with_a_warning() {
        let p = plan("ARG BASE\nFROM $BASE\nCOPY a /a\n").unwrap();
        assert_eq!((p.base_image.as_str(), p.final_lookup.as_deref()), ("$BASE", None));
        assert_eq!(
            p.warnings,
            ["Dockerfile line 2: FROM $BASE is not looked up as a template: ARG BASE has no value \
              (no default before the first FROM and no build argument)"]
        );
        // An ARG declared only inside a stage does not reach a later FROM, as in Docker.
        let p = plan("FROM a AS one\nARG T=b\nFROM ${T}x AS two\nFROM ${ORG}/c:$T\n").unwrap();
        assert_eq!((p.final_lookup.as_deref(), p.other_lookups.as_slice()), (None, &["a".to_owned()][..]));
        assert_eq!(p.warnings.len(), 2, "{p:?}");
        assert!(p.warnings[1].contains("line 4: FROM ${ORG}/c:$T") && p.warnings[1].contains("ARGs ORG, T have"));
    }

    #[test]
    fn a_byte_order_mark_and_crlf_plan_like_plain_text() {
        let plain = plan("ARG BASE=tensorlake/base\nFROM $BASE\nCOPY --from=tools \\\n /a /b\n").unwrap();
        let dos = plan("\u{feff}ARG BASE=tensorlake/base\r\nFROM $BASE\r\nCOPY --from=tools \\\r\n /a /b\r\n").unwrap();
        assert_eq!(dos, plain);
        assert_eq!(dos.final_lookup.as_deref(), Some("tensorlake/base"));
        assert_eq!(dos.other_lookups, ["tools"]);
        assert_eq!(plan("\u{feff}FROM scratch\r\n").unwrap().base_image, "scratch");
    }

    #[test]
    fn an_empty_from_flag_is_not_looked_up() {
        let p = plan("FROM tensorlake/a\nCOPY --from= /x /y\nRUN --mount=type=cache,from=,target=/c true\n").unwrap();
        assert_eq!(p.final_lookup.as_deref(), Some("tensorlake/a"));
        assert!(p.other_lookups.is_empty(), "{p:?}");
    }
}
