//! Stages: the `ARG`s declared before the first `FROM` (the only ones a FROM
//! can read, as in Docker) and every `FROM` with them substituted.

use std::collections::BTreeMap;

use super::words::{Vars, words, words_noting_unset};
use super::{DockerfileError, Instruction, invalid};

/// One `FROM [--flag…] <image> [AS <name>]`, variables substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromLine {
    /// Index of the FROM in the instruction list.
    pub index: usize,
    /// The image after substitution (empty when only unset variables name it).
    pub image: String,
    /// The image word as written (`$BASE`), for messages and when `unset` is not empty.
    pub written: String,
    /// `AS name`, if given.
    pub name: Option<String>,
    /// Leading `--platform=…` style flags, as lexed.
    pub flags: Vec<String>,
    /// Variables the image names that have no value: no global ARG default
    /// sets them and the build passes no build arguments.
    pub unset: Vec<String>,
}

/// The global ARGs and every FROM, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stages {
    /// ARGs declared before the first FROM (value `None`: declared without default).
    pub global_args: BTreeMap<String, Option<String>>,
    pub froms: Vec<FromLine>,
}

impl Stages {
    /// The global ARGs that have a value, as substitution sees them.
    pub fn global_vars(&self) -> Vars {
        global_vars(&self.global_args)
    }
}

fn global_vars(global_args: &BTreeMap<String, Option<String>>) -> Vars {
    let args = global_args.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect();
    Vars { args, env: BTreeMap::new() }
}

/// Resolves the global ARGs into every FROM, as Docker does: an ARG before
/// the first FROM with a default is substituted; one without a default (or
/// a name never declared) is unset and listed in [`FromLine::unset`].
/// Instructions other than ARG and FROM are not looked at.
pub fn stages(instructions: &[Instruction]) -> Result<Stages, DockerfileError> {
    let mut stages = Stages::default();
    for (index, ins) in instructions.iter().enumerate() {
        match ins.keyword.as_str() {
            "FROM" => {
                let from = parse_from(index, ins, &stages.global_vars())?;
                stages.froms.push(from);
            }
            "ARG" if stages.froms.is_empty() => {
                for (name, value) in parse_args(ins, &stages.global_vars())? {
                    stages.global_args.insert(name, value);
                }
            }
            _ => {}
        }
    }
    Ok(stages)
}

fn parse_from(index: usize, ins: &Instruction, vars: &Vars) -> Result<FromLine, DockerfileError> {
    // Flags are split off first, so a variable only a flag reads (`--platform=$BUILDPLATFORM`)
    // never keeps the image from being looked up.
    let mut rest = ins.args.trim_start();
    let mut flags = Vec::new();
    while rest.starts_with("--") {
        let (flag, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        flags.push(words(flag, vars, false).map_err(|m| invalid(ins, m))?.concat());
        rest = after.trim_start();
    }
    let (tokens, unset) = words_noting_unset(rest, vars, true).map_err(|m| invalid(ins, m))?;
    let written = rest.split_whitespace().next().unwrap_or_default().to_owned();
    let (image, name) = match tokens.as_slice() {
        [image] => (image.clone(), None),
        [image, as_word, name] if as_word.eq_ignore_ascii_case("as") => (image.clone(), Some(name.clone())),
        _ => return Err(invalid(ins, "expected FROM <image> [AS <name>]".into())),
    };
    if image.is_empty() && unset.is_empty() {
        return Err(invalid(ins, "FROM names no image".into()));
    }
    Ok(FromLine { index, image, written, name, flags, unset })
}

/// `ARG NAME[=default] ...` → (name, default), defaults substituted with `vars`.
pub fn parse_args(ins: &Instruction, vars: &Vars) -> Result<Vec<(String, Option<String>)>, DockerfileError> {
    let tokens = words(&ins.args, vars, true).map_err(|m| invalid(ins, m))?;
    if tokens.is_empty() {
        return Err(invalid(ins, "ARG needs a name".into()));
    }
    tokens
        .into_iter()
        .map(|t| match t.split_once('=') {
            Some((name, value)) if valid_name(name) => Ok((name.to_owned(), Some(value.to_owned()))),
            None if valid_name(&t) => Ok((t, None)),
            _ => Err(invalid(ins, format!("'{t}' is not NAME or NAME=default"))),
        })
        .collect()
}

pub(super) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn froms(text: &str) -> Vec<FromLine> {
        stages(&parse(text)).unwrap().froms
    }

    #[test]
    fn a_global_arg_default_is_substituted_into_from() {
        let f = &froms("ARG BASE=tensorlake/base\nFROM $BASE AS app\n")[0];
        assert_eq!(
            (f.image.as_str(), f.written.as_str(), f.name.as_deref()),
            ("tensorlake/base", "$BASE", Some("app"))
        );
        assert!(f.unset.is_empty());
        // Later global ARGs see earlier ones; `${…:-…}` supplies its own default.
        let f = &froms("ARG ORG=acme\nARG BASE=${ORG}/base\nARG TAG\nFROM ${BASE}:${TAG:-1}\n")[0];
        assert_eq!((f.image.as_str(), f.unset.len()), ("acme/base:1", 0));
    }

    #[test]
    fn an_arg_without_default_or_undeclared_is_unset_in_from() {
        let f = &froms("ARG BASE\nFROM $BASE\n")[0];
        assert_eq!((f.image.as_str(), f.unset.as_slice()), ("", &["BASE".to_owned()][..]));
        let f = &froms("FROM ${NOPE}/x\n")[0];
        assert_eq!((f.image.as_str(), f.unset.as_slice()), ("/x", &["NOPE".to_owned()][..]));
    }

    #[test]
    fn only_args_before_the_first_from_reach_a_from() {
        let all = froms("ARG A=one\nFROM $A AS first\nARG B=two\nARG A=three\nFROM $A$B\n");
        assert_eq!(all[1].image, "one");
        assert_eq!(all[1].unset, ["B"]);
        assert_eq!(all[1].index, 4);
    }

    #[test]
    fn flags_and_bad_shapes() {
        let f = &froms("FROM --platform=linux/amd64 base\n")[0];
        assert_eq!((f.flags.as_slice(), f.image.as_str()), (&["--platform=linux/amd64".to_owned()][..], "base"));
        // A variable in a flag only is no reason to skip the image.
        let f = &froms("ARG P=linux/arm64\nFROM --platform=$BUILDPLATFORM  --x=$P  golang:1.22 AS build\n")[0];
        assert_eq!(f.flags, ["--platform=", "--x=linux/arm64"]);
        assert_eq!((f.image.as_str(), f.written.as_str(), f.unset.len()), ("golang:1.22", "golang:1.22", 0));
        for bad in ["FROM\n", "FROM a b\n", "FROM a AS\n", "FROM \"\"\n"] {
            let err = stages(&parse(bad)).unwrap_err();
            assert!(matches!(err, DockerfileError::Invalid { line: 1, .. }), "{bad:?}: {err}");
        }
        let err = stages(&parse("ARG 1X=a\nFROM x\n")).unwrap_err();
        assert_eq!(err.to_string(), "Dockerfile line 1: ARG: '1X=a' is not NAME or NAME=default");
    }
}
