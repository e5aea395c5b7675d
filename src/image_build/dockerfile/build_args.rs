//! Build arguments (`--build-arg K=V`), carried in the Dockerfile itself.
//!
//! The platform's rootfs builder has no build-argument channel (the public
//! client refuses build args outside its CAS builds for that reason), but
//! every builder reads `ARG` defaults. So each `ARG` that declares a name
//! the build sets gets ` NAME="value"` appended on its last line: within one
//! `ARG` a later declaration of the same name wins, so the value replaces
//! the default exactly where Docker's `--build-arg` would, in the global
//! scope (FROM lookups) and in every stage that declares it. An `ARG` that
//! does not declare the name is left alone, as Docker leaves an undeclared
//! build argument unused. Lines keep their numbers, so errors still point
//! at the user's Dockerfile.

use super::{Vars, parse_args, spans};

/// Why build arguments cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildArgError {
    /// Not a name an `ARG` can declare.
    BadName(String),
    /// A value a Dockerfile line cannot hold (a line break or a NUL).
    BadValue(String),
    /// The Dockerfile changes its escape character (`# escape=`), which
    /// the quoting of values assumes is `\`.
    EscapeDirective,
}

impl std::fmt::Display for BuildArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildArgError::BadName(name) => {
                write!(f, "build argument '{name}' is not a valid ARG name (a letter or _, then letters, digits or _)")
            }
            BuildArgError::BadValue(name) => {
                write!(f, "build argument {name}: its value holds a line break or a NUL, which an ARG cannot carry")
            }
            BuildArgError::EscapeDirective => write!(
                f,
                "build arguments cannot be applied to a Dockerfile with an `# escape=` directive; \
                 give the ARGs defaults instead"
            ),
        }
    }
}

impl std::error::Error for BuildArgError {}

/// `text` with `args` applied to the `ARG`s that declare them, and the
/// names no `ARG` declares (unused, as Docker warns). With no arguments the
/// text is returned as it is.
pub fn apply_build_args(text: &str, args: &[(String, String)]) -> Result<(String, Vec<String>), BuildArgError> {
    for (name, value) in args {
        if !super::stages::valid_name(name) {
            return Err(BuildArgError::BadName(name.clone()));
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(BuildArgError::BadValue(name.clone()));
        }
    }
    if args.is_empty() {
        return Ok((text.to_owned(), Vec::new()));
    }
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    if has_escape_directive(body) {
        return Err(BuildArgError::EscapeDirective);
    }
    let mut lines: Vec<String> = body.lines().map(str::to_owned).collect();
    let mut used = vec![false; args.len()];
    for (instruction, last) in spans(body) {
        if instruction.keyword != "ARG" {
            continue;
        }
        // An ARG that does not parse is left for the planner to report.
        let Ok(declared) = parse_args(&instruction, &Vars::default()) else { continue };
        let mut appended = String::new();
        for (i, (name, value)) in args.iter().enumerate() {
            if declared.iter().any(|(declared, _)| declared == name) {
                used[i] = true;
                appended.push_str(&format!(" {name}={}", quoted(value)));
            }
        }
        if appended.is_empty() {
            continue;
        }
        let line = &mut lines[last];
        // At the end of the file a continuation may end the instruction: the value goes before it.
        match super::continuation(line) {
            Some(body) => *line = format!("{}{appended} \\", body.trim_end()),
            None => line.push_str(&appended),
        }
    }
    let mut rewritten = lines.join("\n");
    if body.ends_with('\n') {
        rewritten.push('\n');
    }
    let unused = args.iter().zip(used).filter(|(_, used)| !used).map(|((name, _), _)| name.clone()).collect();
    Ok((rewritten, unused))
}

/// Whether the parser directives at the top (comment lines of the form
/// `# name=value`, before anything else) set `escape`.
fn has_escape_directive(text: &str) -> bool {
    for line in text.lines() {
        let Some(directive) = line.trim().strip_prefix('#') else { return false };
        let Some((name, _)) = directive.split_once('=') else { return false };
        if name.trim().eq_ignore_ascii_case("escape") {
            return true;
        }
    }
    false
}

/// `value` in double quotes, with the three characters the lexer reads
/// inside them (`\`, `"`, `$`) escaped: the builder takes it literally,
/// as Docker takes a build argument.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Vars, parse, stages};
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_build_argument_replaces_the_default_of_every_arg_that_declares_it_and_lines_keep_their_numbers() {
        let text = "ARG BASE=old\nARG UNTOUCHED=1\nFROM $BASE AS build\n# comment\nARG GREETING=hi \\\n    OTHER\nRUN echo $GREETING\nFROM scratch\nARG GREETING\n";
        let (rewritten, unused) = apply_build_args(
            text,
            &args(&[("BASE", "team/base:2"), ("GREETING", "a \"b\" $HOME \\ c"), ("NOPE", "x")]),
        )
        .unwrap();
        assert_eq!(unused, ["NOPE"], "an argument no ARG declares is unused");
        assert_eq!(rewritten.lines().count(), text.lines().count());
        let parsed = parse(&rewritten);
        let original = parse(text);
        let lines: Vec<usize> = parsed.iter().map(|i| i.line).collect();
        assert_eq!(lines, original.iter().map(|i| i.line).collect::<Vec<_>>(), "{rewritten}");
        // The FROM sees the build argument.
        let found = stages(&parsed).unwrap();
        assert_eq!(found.froms[0].image, "team/base:2");
        assert_eq!(found.global_args["UNTOUCHED"].as_deref(), Some("1"));
        // Every stage's ARG takes the value literally: quotes, `$` and `\` included.
        for index in [3, 6] {
            let declared = parse_args(&parsed[index], &Vars::default()).unwrap();
            let last = declared.iter().rev().find(|(name, _)| name == "GREETING").unwrap();
            assert_eq!(last.1.as_deref(), Some("a \"b\" $HOME \\ c"), "{}", parsed[index].text);
        }
    }

    #[test]
    fn no_arguments_leave_the_text_as_it_is_and_bad_ones_are_refused_by_name() {
        let text = "\u{feff}FROM scratch\r\nARG A=1\r\n";
        assert_eq!(apply_build_args(text, &[]).unwrap(), (text.to_owned(), vec![]));
        assert_eq!(apply_build_args(text, &args(&[("1A", "x")])), Err(BuildArgError::BadName("1A".into())));
        assert_eq!(apply_build_args(text, &args(&[("A", "x\nRUN evil")])), Err(BuildArgError::BadValue("A".into())));
        assert!(BuildArgError::BadValue("A".into()).to_string().contains("line break"));
        // Another escape character would change what the quotes mean.
        let escaped = "# syntax=docker/dockerfile:1\n# escape=`\nFROM scratch\nARG A\n";
        assert_eq!(apply_build_args(escaped, &args(&[("A", "x")])), Err(BuildArgError::EscapeDirective));
        let commented = "FROM scratch\n# escape=`\nARG A\n";
        assert!(apply_build_args(commented, &args(&[("A", "x")])).is_ok(), "after an instruction it is a comment");
        // A CRLF file is read as the parser reads it.
        let (rewritten, unused) = apply_build_args(text, &args(&[("A", "2")])).unwrap();
        assert!(unused.is_empty());
        assert_eq!(rewritten, "FROM scratch\nARG A=1 A=\"2\"\n");
    }

    #[test]
    fn an_arg_ending_the_file_with_a_continuation_takes_the_value_before_it() {
        let (rewritten, _) = apply_build_args("FROM scratch\nARG A \\", &args(&[("A", "v")])).unwrap();
        assert_eq!(rewritten, "FROM scratch\nARG A A=\"v\" \\");
        let declared = parse_args(&parse(&rewritten)[1], &Vars::default()).unwrap();
        assert_eq!(declared.last().unwrap().1.as_deref(), Some("v"));
    }
}
