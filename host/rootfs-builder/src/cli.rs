//! Command line: `tl-rootfs-build [words…] --spec <spec.json> --metadata-out <metadata.json>`.

use std::path::PathBuf;

pub const USAGE: &str = "\
usage: tl-rootfs-build [words…] --spec <spec.json> --metadata-out <metadata.json>

The snapsign reference rootfs builder. Reads the build spec (the platform's
prepared JSON with the client's additions), builds the Dockerfile's final
stage from the build context (COPY, ADD, WORKDIR, RUN, ENV, USER, CMD,
ENTRYPOINT, LABEL, EXPOSE, ARG, SHELL; RUN steps run confined in namespaces of
their own with the tree being built as /), writes the snapshot
archive (snapsign_tar_zstd_v1: tar + zstd), uploads it through spec.upload
(single_put or s3_multipart), then writes metadata.json.

options:
  --spec <path>           the build spec (JSON)
  --metadata-out <path>   where to write metadata.json after a successful upload
  -h, --help              print this help

Other words (the platform's builder.command may carry some) are ignored.
Environment: SNAPSIGN_BUILDER_FAULT=exit_nonzero,allocate,metadata_missing:<field>,
metadata_uri:<uri>,delay_parts_ms:<n> injects faults for tests.
TL_ROOTFS_BUILD_RESUMABLE=1: expired part URLs keep the upload open and the
archive (exit 75) instead of aborting; TL_ROOTFS_BUILD_RESUME=1 resumes it
with spec.json's fresh URLs for the same upload.
Exit status: 0 built and uploaded, 1 build failed, 2 usage error, 75 part URLs
expired (resumable).";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Build(BuildArgs),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildArgs {
    pub spec: PathBuf,
    pub metadata_out: PathBuf,
    /// Words that were not ours, reported in a note.
    pub ignored: Vec<String>,
}

/// Parses the arguments (without argv[0]). `Err` is a usage error message.
pub fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut spec = None;
    let mut metadata_out = None;
    let mut ignored = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let slot = match name {
            "-h" | "--help" => return Ok(Command::Help),
            "--spec" => &mut spec,
            "--metadata-out" => &mut metadata_out,
            _ => {
                ignored.push(arg.clone());
                continue;
            }
        };
        let value = match inline {
            Some(v) => v,
            None => iter.next().cloned().ok_or_else(|| format!("{name} needs a path"))?,
        };
        if value.is_empty() {
            return Err(format!("{name} needs a path"));
        }
        *slot = Some(PathBuf::from(value));
    }
    Ok(Command::Build(BuildArgs {
        spec: spec.ok_or("missing --spec <spec.json>")?,
        metadata_out: metadata_out.ok_or("missing --metadata-out <metadata.json>")?,
        ignored,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn platform_invocation_with_extra_words() {
        let parsed =
            parse_args(&args(&["--verbose", "build", "--spec", "/b/spec.json", "--metadata-out=/b/metadata.json"]))
                .unwrap();
        assert_eq!(
            parsed,
            Command::Build(BuildArgs {
                spec: "/b/spec.json".into(),
                metadata_out: "/b/metadata.json".into(),
                ignored: vec!["--verbose".into(), "build".into()],
            })
        );
    }

    #[test]
    fn help_and_usage_errors() {
        assert_eq!(parse_args(&args(&["x", "--help"])).unwrap(), Command::Help);
        assert_eq!(parse_args(&args(&["--spec", "s"])).unwrap_err(), "missing --metadata-out <metadata.json>");
        assert_eq!(parse_args(&args(&["--metadata-out", "m", "--spec"])).unwrap_err(), "--spec needs a path");
        assert_eq!(parse_args(&args(&[])).unwrap_err(), "missing --spec <spec.json>");
    }
}
