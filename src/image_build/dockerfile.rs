//! The Dockerfile front end shared by the build client's planner
//! ([`super::plan`]) and the reference builder (`host/rootfs-builder`): text →
//! instructions ([`parse`]), the word lexer with `$VAR` substitution
//! ([`words`]), and the global `ARG`s resolved into every `FROM`
//! ([`stages`]). No I/O and no build semantics: what an instruction does is
//! the caller's business.
//!
//! Both callers see the same text: a leading byte-order mark is dropped, CRLF
//! line ends read as LF, `\` at the end of a line continues it, and comment
//! and blank lines are skipped, also inside a continuation, as Docker does.

mod build_args;
mod stages;
mod words;

pub use build_args::{BuildArgError, apply_build_args};
pub use stages::{FromLine, Stages, parse_args, stages};
pub use words::{Vars, expand, words};

use std::fmt;

/// Every instruction Docker knows. Anything else is refused by
/// [`check_known`], in any stage, as Docker does.
const KNOWN: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// One logical instruction (continuation lines joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based number of the physical line the instruction starts on.
    pub line: usize,
    /// The instruction name, upper case (`COPY`).
    pub keyword: String,
    /// Everything after the keyword, trimmed, continuations joined.
    pub args: String,
    /// The instruction as written (keyword case kept), for logs and errors.
    pub text: String,
}

/// Why a Dockerfile cannot be planned or built. Every message names the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerfileError {
    /// An instruction Docker does not know either.
    UnknownInstruction { line: usize, instruction: String },
    /// A known instruction the reference builder cannot carry out.
    Unsupported { line: usize, instruction: String, reason: String, text: String },
    /// The instruction's arguments do not parse.
    Invalid { line: usize, instruction: String, message: String },
    /// A FROM names a variable that no global `ARG` default sets.
    UnsetInFrom { line: usize, names: Vec<String>, text: String },
    /// No `FROM` at all.
    NoFrom,
}

impl fmt::Display for DockerfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownInstruction { line, instruction } => {
                write!(f, "Dockerfile line {line}: unknown instruction {instruction}")
            }
            Self::Unsupported { line, instruction, reason, text } => {
                write!(f, "line {line}: {instruction} is not supported by the reference builder ({reason}): {text}")
            }
            Self::Invalid { line, instruction, message } => {
                write!(f, "Dockerfile line {line}: {instruction}: {message}")
            }
            Self::UnsetInFrom { line, names, text } => write!(
                f,
                "Dockerfile line {line}: {text}: {} no value (declared without a default before the first FROM, \
                 or not declared, and no build argument sets it); give it a default, e.g. ARG {}=<template>",
                unset_names(names),
                names.first().map(String::as_str).unwrap_or("NAME")
            ),
            Self::NoFrom => write!(f, "the Dockerfile has no FROM instruction"),
        }
    }
}

impl std::error::Error for DockerfileError {}

/// `ARG BASE has` / `ARGs A, B have`, for messages about unset variables.
pub fn unset_names(names: &[String]) -> String {
    match names {
        [one] => format!("ARG {one} has"),
        many => format!("ARGs {} have", many.join(", ")),
    }
}

/// Splits Dockerfile text into instructions (see the module comment for
/// what is skipped). Never fails: [`check_known`] refuses unknown words.
pub fn parse(text: &str) -> Vec<Instruction> {
    spans(text).into_iter().map(|(instruction, _)| instruction).collect()
}

/// [`parse`], with the 0-based index of each instruction's last physical
/// line in `text.lines()` (after a leading byte-order mark is dropped).
fn spans(text: &str) -> Vec<(Instruction, usize)> {
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String, usize)> = None;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // `str::lines` also drops the `\r` of a CRLF line end.
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (body, continues) = match continuation(raw) {
            Some(body) => (body, true),
            None => (raw, false),
        };
        let (start, mut joined, _) = pending.take().unwrap_or((number, String::new(), index));
        joined.push_str(if joined.is_empty() { body.trim_start() } else { body });
        if continues {
            pending = Some((start, joined, index));
        } else {
            instructions.push((instruction(start, &joined), index));
        }
    }
    if let Some((start, joined, last)) = pending
        && !joined.trim().is_empty()
    {
        instructions.push((instruction(start, &joined), last));
    }
    instructions
}

/// Refuses the first instruction Docker does not know, naming its line.
pub fn check_known(instructions: &[Instruction]) -> Result<(), DockerfileError> {
    match instructions.iter().find(|i| !KNOWN.contains(&i.keyword.as_str())) {
        Some(unknown) => Err(DockerfileError::UnknownInstruction {
            line: unknown.line,
            instruction: unknown.text.split_whitespace().next().unwrap_or_default().to_owned(),
        }),
        None => Ok(()),
    }
}

/// The line without its continuation backslash (and the blanks after it), if it has one.
fn continuation(line: &str) -> Option<&str> {
    line.trim_end_matches([' ', '\t']).strip_suffix('\\')
}

fn instruction(line: usize, joined: &str) -> Instruction {
    let text = joined.trim().to_owned();
    let (word, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
    Instruction { line, keyword: word.to_ascii_uppercase(), args: args.trim().to_owned(), text: text.clone() }
}

/// Parses the exec (JSON array) form: `["a", "b"]`. `None` means shell form.
pub fn exec_form(args: &str) -> Option<Vec<String>> {
    if !args.trim_start().starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args.trim()).ok()
}

/// The error for an instruction whose arguments do not parse.
pub fn invalid(ins: &Instruction, message: String) -> DockerfileError {
    DockerfileError::Invalid { line: ins.line, instruction: ins.keyword.clone(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_continuations_and_skips_comments_and_blank_lines() {
        let text = "# syntax comment\n\nFROM scratch\nCOPY a \\\n  # a comment inside\n\n  b \\  \n  /dest/\n  # trailing\nENV A=1\n";
        let parsed = parse(text);
        assert_eq!(parsed.len(), 3);
        assert_eq!((parsed[0].line, parsed[0].keyword.as_str()), (3, "FROM"));
        assert_eq!(parsed[1].line, 4);
        assert_eq!(parsed[1].keyword, "COPY");
        assert_eq!(parsed[1].args, "a   b   /dest/");
        assert_eq!((parsed[2].line, parsed[2].args.as_str()), (10, "A=1"));
    }

    #[test]
    fn keywords_are_case_insensitive_and_text_keeps_what_was_written() {
        let parsed = parse("from scratch as final\ncopy x /y");
        assert_eq!(parsed[0].keyword, "FROM");
        assert_eq!(parsed[0].text, "from scratch as final");
        assert_eq!(parsed[1].keyword, "COPY");
    }

    #[test]
    fn unknown_instruction_names_line_and_word() {
        let parsed = parse("FROM scratch\n\nfetch http://x /y\n");
        let err = check_known(&parsed).unwrap_err();
        assert_eq!(err, DockerfileError::UnknownInstruction { line: 3, instruction: "fetch".into() });
        assert_eq!(err.to_string(), "Dockerfile line 3: unknown instruction fetch");
        assert_eq!(check_known(&parse("FROM scratch\nCOPY a /a\n")), Ok(()));
    }

    #[test]
    fn continuation_at_end_of_file_still_ends_the_instruction() {
        let parsed = parse("FROM scratch\nCMD echo \\");
        assert_eq!(parsed[1].args, "echo");
    }

    #[test]
    fn a_byte_order_mark_and_crlf_line_ends_read_as_plain_text() {
        let plain = parse("# c\nFROM scratch\nCOPY a \\\n  b /c\n\nENV A=1\n");
        let dos = parse("\u{feff}# c\r\nFROM scratch\r\nCOPY a \\\r\n  b /c\r\n\r\nENV A=1\r\n");
        assert_eq!(dos, plain);
        assert_eq!((dos[0].keyword.as_str(), dos[1].args.as_str()), ("FROM", "a   b /c"));
        // The mark only counts at the very start; `\r` never ends up in an instruction.
        assert!(dos.iter().all(|i| !i.text.contains(['\r', '\u{feff}'])), "{dos:?}");
        assert_eq!(parse("\u{feff}\u{feff}FROM x")[0].keyword, "\u{feff}FROM");
    }

    #[test]
    fn exec_form_is_a_json_string_array_and_anything_else_is_shell_form() {
        assert_eq!(exec_form(r#"["/bin/app", "--flag"]"#), Some(vec!["/bin/app".into(), "--flag".into()]));
        assert_eq!(exec_form("/bin/app --flag"), None);
        assert_eq!(exec_form("[not json"), None);
        assert_eq!(exec_form("[1, 2]"), None);
    }
}
