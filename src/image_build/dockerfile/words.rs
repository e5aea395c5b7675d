//! Docker's word lexer: quotes, escapes and `$VAR` substitution, as used by
//! FROM, ARG, COPY, ENV, LABEL, WORKDIR…

use std::collections::BTreeMap;

/// Variables visible to substitution: ARG values, overridden by ENV. A name
/// in neither map is unset (an ARG declared without a default is not in `args`).
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
    Lexer::new(vars).words(input, split)
}

/// Substitutes variables only, leaving quotes and other backslashes alone
/// (for the elements of an exec-form array).
pub fn expand(input: &str, vars: &Vars) -> Result<String, String> {
    Lexer::new(vars).expand(input)
}

/// [`words`], plus the names that `$NAME` or `${NAME}` read while unset (a
/// `${NAME:-default}` or `${NAME:+alt}` says what an unset name means, so it
/// is not listed).
pub(super) fn words_noting_unset(input: &str, vars: &Vars, split: bool) -> Result<(Vec<String>, Vec<String>), String> {
    let mut lexer = Lexer::new(vars);
    let words = lexer.words(input, split)?;
    Ok((words, lexer.unset))
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

struct Lexer<'v> {
    vars: &'v Vars,
    unset: Vec<String>,
}

impl<'v> Lexer<'v> {
    fn new(vars: &'v Vars) -> Self {
        Lexer { vars, unset: Vec::new() }
    }

    fn words(&mut self, input: &str, split: bool) -> Result<Vec<String>, String> {
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
                            Some('$') => self.substitute(&mut chars, &mut word)?,
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
                    self.substitute(&mut chars, &mut word)?;
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

    fn expand(&mut self, input: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = input.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'$') => {
                    out.push('$');
                    chars.next();
                }
                '$' => self.substitute(&mut chars, &mut out)?,
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// The value of a plain `$NAME` / `${NAME}`; noted when unset.
    fn plain(&mut self, name: &str) -> &'v str {
        let value = self.vars.get(name);
        if value.is_none() && !self.unset.iter().any(|n| n == name) {
            self.unset.push(name.to_owned());
        }
        value.unwrap_or("")
    }

    /// Called just after a `$`: appends the substitution to `out`.
    fn substitute(&mut self, chars: &mut Chars<'_>, out: &mut String) -> Result<(), String> {
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
            let value = self.vars.get(name).filter(|v| !v.is_empty());
            if rest.is_empty() {
                out.push_str(self.plain(name));
            } else if let Some(default) = rest.strip_prefix(":-") {
                match value {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&self.expand(default)?),
                }
            } else if let Some(alternative) = rest.strip_prefix(":+") {
                if value.is_some() {
                    out.push_str(&self.expand(alternative)?);
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
            let fits = if name.is_empty() {
                c.is_ascii_alphabetic() || c == '_'
            } else {
                c.is_ascii_alphanumeric() || c == '_'
            };
            if !fits {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            out.push('$');
        } else {
            out.push_str(self.plain(&name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        Vars { args: BTreeMap::new(), env: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
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

    #[test]
    fn unset_names_are_noted_once_unless_a_default_or_alternative_covers_them() {
        let v = vars(&[("SET", "x"), ("EMPTY", "")]);
        let (w, unset) = words_noting_unset("$A ${A}${B} $SET $EMPTY ${C:-d} ${D:+alt} '$E' \\$F", &v, true).unwrap();
        assert_eq!(w, ["", "", "x", "", "d", "", "$E", "$F"]);
        assert_eq!(unset, ["A", "B"]);
        // A default naming an unset variable reads it.
        assert_eq!(words_noting_unset("${X:-$Y}", &v, true).unwrap().1, ["Y"]);
    }
}
