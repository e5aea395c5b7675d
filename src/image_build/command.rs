//! The builder invocation (wit/protocol.md §5.5): shell words of the prepared
//! command, with the well-known builder name made absolute.

/// Where the builder's files live in the sandbox.
pub const BUILD_DIR: &str = "/var/lib/tensorlake/rootfs-builder/build";
/// `PATH` of the builder process.
pub const BUILDER_PATH_ENV: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the command cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError(pub String);

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid/empty rootfs builder command returned by platform API: {}", self.0)
    }
}

impl std::error::Error for CommandError {}

/// POSIX shell word splitting (the `shlex` crate): blanks, single and double
/// quotes, backslash escapes; a word starting with `#` starts a comment.
pub fn split_words(input: &str) -> Result<Vec<String>, CommandError> {
    shlex::split(input).ok_or_else(|| CommandError(format!("unclosed quote or trailing backslash in {input:?}")))
}

/// (command, args) for the builder: `tl-rootfs-build` becomes
/// `/usr/local/bin/tl-rootfs-build`, and `--spec`/`--metadata-out` are appended.
pub fn builder_invocation(command: &str) -> Result<(String, Vec<String>), CommandError> {
    let mut words = split_words(command)?;
    if words.is_empty() {
        return Err(CommandError("(empty)".into()));
    }
    let mut program = words.remove(0);
    if program == "tl-rootfs-build" {
        program = "/usr/local/bin/tl-rootfs-build".into();
    }
    words.extend([
        "--spec".into(),
        format!("{BUILD_DIR}/spec.json"),
        "--metadata-out".into(),
        format!("{BUILD_DIR}/metadata.json"),
    ]);
    Ok((program, words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell_and_rewrites_the_builder_name() {
        assert_eq!(split_words(r#"a 'b c' "d \"e\"" f\ g"#).unwrap(), ["a", "b c", "d \"e\"", "f g"]);
        let (program, args) = builder_invocation("tl-rootfs-build --verbose").unwrap();
        assert_eq!(program, "/usr/local/bin/tl-rootfs-build");
        assert_eq!(
            args,
            [
                "--verbose",
                "--spec",
                "/var/lib/tensorlake/rootfs-builder/build/spec.json",
                "--metadata-out",
                "/var/lib/tensorlake/rootfs-builder/build/metadata.json"
            ]
        );
        assert_eq!(builder_invocation("/opt/b").unwrap().0, "/opt/b");
        assert!(builder_invocation("   ").is_err());
        for broken in ["a 'b", "a \"b", "a\\"] {
            let err = builder_invocation(broken).unwrap_err();
            assert_eq!(err.0, format!("unclosed quote or trailing backslash in {broken:?}"));
        }
        assert_eq!(split_words("run # a comment").unwrap(), ["run"]);
        assert_eq!(split_words("\t a\n\"b\\$c\"").unwrap(), ["a", "b$c"]);
    }
}
