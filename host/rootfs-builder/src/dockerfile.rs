//! Dockerfile text → instructions, and the word lexer with `$VAR` substitution.
//! No I/O and no build semantics: what each instruction means is `plan`'s job.

use std::collections::BTreeMap;
use std::fmt;

/// Every instruction Docker knows. Anything else is refused at parse time, in
/// any stage, as Docker does; which of these the reference builder supports is
/// decided when the final stage is planned.
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

/// Why a Dockerfile cannot be built. Every message names the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerfileError {
    /// An instruction Docker does not know either.
    UnknownInstruction { line: usize, instruction: String },
    /// A known instruction the reference builder cannot carry out.
    Unsupported { line: usize, instruction: String, reason: String, text: String },
    /// The instruction's arguments do not parse.
    Invalid { line: usize, instruction: String, message: String },
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
            Self::NoFrom => write!(f, "the Dockerfile has no FROM instruction"),
        }
    }
}

impl std::error::Error for DockerfileError {}

/// Splits Dockerfile text into instructions: `\` at the end of a line continues
/// it, comment lines (`#` first) and blank lines are skipped, also inside a
/// continuation, as Docker does.
pub fn parse(text: &str) -> Result<Vec<Instruction>, DockerfileError> {
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
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
        let (start, mut joined) = pending.take().unwrap_or((number, String::new()));
        joined.push_str(if joined.is_empty() { body.trim_start() } else { body });
        if continues {
            pending = Some((start, joined));
        } else {
            instructions.push(instruction(start, &joined)?);
        }
    }
    if let Some((start, joined)) = pending
        && !joined.trim().is_empty()
    {
        instructions.push(instruction(start, &joined)?);
    }
    Ok(instructions)
}

/// The line without its continuation backslash (and the blanks after it), if it has one.
fn continuation(line: &str) -> Option<&str> {
    line.trim_end_matches([' ', '\t']).strip_suffix('\\')
}

fn instruction(line: usize, joined: &str) -> Result<Instruction, DockerfileError> {
    let text = joined.trim().to_owned();
    let (word, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
    let keyword = word.to_ascii_uppercase();
    if !KNOWN.contains(&keyword.as_str()) {
        return Err(DockerfileError::UnknownInstruction { line, instruction: word.to_owned() });
    }
    Ok(Instruction { line, keyword, args: args.trim().to_owned(), text })
}

/// Parses the exec (JSON array) form: `["a", "b"]`. `None` means shell form.
pub fn exec_form(args: &str) -> Option<Vec<String>> {
    if !args.trim_start().starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args.trim()).ok()
}

/// Variables visible to substitution: ARG values, overridden by ENV.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars {
    pub args: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

impl Vars {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.env.get(name).or_else(|| self.args.get(name)).map(String::as_str)
    }
}

/// Lexes `input` as Docker does for COPY, ENV, LABEL, WORKDIR...: quotes are
/// removed (`'…'` literal, `"…"` with `\"`, `\\`, `\$` escapes), a backslash
/// outside quotes escapes the next character, and `$VAR`, `${VAR}`,
/// `${VAR:-default}`, `${VAR:+alt}` are substituted (unset = empty). With
/// `split`, unquoted blanks separate words; without, the result is one word.
pub fn words(input: &str, vars: &Vars, split: bool) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut started = false;
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() && split => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            '\'' => {
                started = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated single quote in {input}")),
                    }
                }
            }
            '"' => {
                started = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.peek() {
                            Some(&next @ ('"' | '\\' | '$')) => {
                                word.push(next);
                                chars.next();
                            }
                            _ => word.push('\\'),
                        },
                        Some('$') => substitute(&mut chars, vars, &mut word)?,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated double quote in {input}")),
                    }
                }
            }
            '\\' => {
                started = true;
                word.push(chars.next().unwrap_or('\\'));
            }
            '$' => {
                started = true;
                substitute(&mut chars, vars, &mut word)?;
            }
            c => {
                started = true;
                word.push(c);
            }
        }
    }
    if started || !split {
        out.push(word);
    }
    Ok(out)
}

/// Substitutes variables only, leaving quotes and other backslashes alone
/// (for the elements of an exec-form array).
pub fn expand(input: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' => substitute(&mut chars, vars, &mut out)?,
            c => out.push(c),
        }
    }
    Ok(out)
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

/// Called just after a `$`: appends the substitution to `out`.
fn substitute(chars: &mut Chars<'_>, vars: &Vars, out: &mut String) -> Result<(), String> {
    if chars.peek() == Some(&'{') {
        chars.next();
        let mut inner = String::new();
        let mut depth = 1;
        loop {
            match chars.next() {
                Some('{') => {
                    depth += 1;
                    inner.push('{');
                }
                Some('}') => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                    inner.push('}');
                }
                Some(c) => inner.push(c),
                None => return Err(format!("unterminated ${{{inner}")),
            }
        }
        let name_end = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
        let (name, rest) = inner.split_at(name_end);
        if name.is_empty() {
            return Err(format!("bad substitution ${{{inner}}}"));
        }
        let value = vars.get(name).filter(|v| !v.is_empty());
        if rest.is_empty() {
            out.push_str(value.unwrap_or(""));
        } else if let Some(default) = rest.strip_prefix(":-") {
            match value {
                Some(v) => out.push_str(v),
                None => out.push_str(&expand(default, vars)?),
            }
        } else if let Some(alternative) = rest.strip_prefix(":+") {
            if value.is_some() {
                out.push_str(&expand(alternative, vars)?);
            }
        } else {
            return Err(format!(
                "unsupported substitution ${{{inner}}} (use ${{NAME}}, ${{NAME:-default}} or ${{NAME:+alt}})"
            ));
        }
        return Ok(());
    }
    let mut name = String::new();
    while let Some(&c) = chars.peek() {
        let fits =
            if name.is_empty() { c.is_ascii_alphabetic() || c == '_' } else { c.is_ascii_alphanumeric() || c == '_' };
        if !fits {
            break;
        }
        name.push(c);
        chars.next();
    }
    if name.is_empty() {
        out.push('$');
    } else {
        out.push_str(vars.get(&name).unwrap_or(""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        Vars { args: BTreeMap::new(), env: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn joins_continuations_and_skips_comments_and_blank_lines() {
        let text = "# syntax comment\n\nFROM scratch\nCOPY a \\\n  # a comment inside\n\n  b \\  \n  /dest/\n  # trailing\nENV A=1\n";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!((parsed[0].line, parsed[0].keyword.as_str()), (3, "FROM"));
        assert_eq!(parsed[1].line, 4);
        assert_eq!(parsed[1].keyword, "COPY");
        assert_eq!(parsed[1].args, "a   b   /dest/");
        assert_eq!((parsed[2].line, parsed[2].args.as_str()), (10, "A=1"));
    }

    #[test]
    fn keywords_are_case_insensitive_and_text_keeps_what_was_written() {
        let parsed = parse("from scratch as final\ncopy x /y").unwrap();
        assert_eq!(parsed[0].keyword, "FROM");
        assert_eq!(parsed[0].text, "from scratch as final");
        assert_eq!(parsed[1].keyword, "COPY");
    }

    #[test]
    fn unknown_instruction_names_line_and_word() {
        let err = parse("FROM scratch\n\nFETCH http://x /y\n").unwrap_err();
        assert_eq!(err, DockerfileError::UnknownInstruction { line: 3, instruction: "FETCH".into() });
        assert_eq!(err.to_string(), "Dockerfile line 3: unknown instruction FETCH");
    }

    #[test]
    fn continuation_at_end_of_file_still_ends_the_instruction() {
        let parsed = parse("FROM scratch\nCMD echo \\").unwrap();
        assert_eq!(parsed[1].args, "echo");
        // A byte-order mark and CRLF line ends are tolerated.
        let parsed = parse("\u{feff}FROM scratch\r\nCOPY a \\\r\n  b /c\r\n").unwrap();
        assert_eq!((parsed[0].keyword.as_str(), parsed[1].args.as_str()), ("FROM", "a   b /c"));
    }

    #[test]
    fn exec_form_is_a_json_string_array_and_anything_else_is_shell_form() {
        assert_eq!(exec_form(r#"["/bin/app", "--flag"]"#), Some(vec!["/bin/app".into(), "--flag".into()]));
        assert_eq!(exec_form("/bin/app --flag"), None);
        assert_eq!(exec_form("[not json"), None);
        assert_eq!(exec_form("[1, 2]"), None);
    }

    #[test]
    fn words_handle_quotes_escapes_and_substitution() {
        let v = vars(&[("HOME", "/root"), ("EMPTY", "")]);
        assert_eq!(words(r#"a "b c" 'd $HOME' e\ f"#, &v, true).unwrap(), ["a", "b c", "d $HOME", "e f"]);
        assert_eq!(words("$HOME/x ${HOME}y", &v, true).unwrap(), ["/root/x", "/rooty"]);
        assert_eq!(
            words(r#"${MISSING:-/opt} ${HOME:+set} ${EMPTY:-dflt} \$HOME "\$HOME""#, &v, true).unwrap(),
            ["/opt", "set", "dflt", "$HOME", "$HOME"]
        );
        assert_eq!(words("a  b", &v, false).unwrap(), ["a  b"]);
        assert_eq!(words(r#""""#, &v, true).unwrap(), [""]);
        assert_eq!(words("cost $5", &v, true).unwrap(), ["cost", "$5"]);
        assert!(words("'open", &v, true).unwrap_err().contains("unterminated"));
        assert!(words("${HOME", &v, true).unwrap_err().contains("unterminated"));
        assert!(words("${HOME/x/y}", &v, true).unwrap_err().contains("unsupported substitution"));
    }

    #[test]
    fn env_overrides_arg_in_substitution() {
        let mut v = vars(&[("V", "env")]);
        v.args.insert("V".into(), "arg".into());
        v.args.insert("ONLY_ARG".into(), "a".into());
        assert_eq!(expand("$V-$ONLY_ARG", &v).unwrap(), "env-a");
    }
}
