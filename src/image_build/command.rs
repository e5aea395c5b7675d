//! The builder invocation (wit/protocol.md §5.5): shell words of the prepared
//! command, with the well-known builder name made absolute.

/// Where the builder's files live in the sandbox.
pub const BUILD_DIR: &str = "/var/lib/tensorlake/rootfs-builder/build";
/// `PATH` of the builder process.
pub const BUILDER_PATH_ENV: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Set to `1` in the builder's environment by a client that signs fresh URLs
/// for an open upload (wit/protocol.md §5.12): the reference builder then
/// answers expired part URLs with [`BUILDER_EXIT_INTERRUPTED`], keeping the
/// upload open and its archive, instead of aborting. A builder that does
/// not know it ignores it.
pub const BUILDER_RESUMABLE_ENV: &str = "TL_ROOTFS_BUILD_RESUMABLE";
/// Set to `1` (with fresh URLs in spec.json) to resume an interrupted upload.
pub const BUILDER_RESUME_ENV: &str = "TL_ROOTFS_BUILD_RESUME";
/// The reference builder's exit status when part URLs expired (EX_TEMPFAIL).
pub const BUILDER_EXIT_INTERRUPTED: i64 = 75;

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
