//! The snapsign reference rootfs builder, `tl-rootfs-build`.
//!
//! The dev stack installs it in every local sandbox as
//! `/usr/local/bin/tl-rootfs-build`; a build client runs
//! `tl-rootfs-build [words…] --spec …/spec.json --metadata-out …/metadata.json`
//! (wit/protocol.md §5.5–§5.8). It builds the final stage of the Dockerfile
//! from the build context (COPY/ADD, WORKDIR, RUN in a confinement of its own,
//! [`step`], and the config instructions), writes a snapshot archive,
//! uploads it through `spec.upload` and writes metadata.json. Everything it
//! prints is the user's build log.
//!
//! # Snapshot archive format `snapsign_tar_zstd_v1`
//!
//! A tar stream (GNU headers) compressed with zstd, as one zstd frame per
//! 1 MiB of tar (compressed on every core; a block that looks random is a
//! frame of raw blocks, [`blocks`]), which zstd decoders read as one stream:
//! - the first entry is `snapshot.json`
//!   ([`snapshot::SnapshotManifest`]: `formatVersion`, `snapshotId`,
//!   `nodeKind`, `parentManifestUri`, `config`, `files`);
//! - then the rootfs as `rootfs/<path>` entries: directories (with a trailing
//!   `/`), regular files and symlinks only, depth first with the children of
//!   each directory sorted by name, `files` of them;
//! - deterministic: mtime 0, no user or group names, uid/gid 0 unless
//!   `COPY --chown` (or the parent) recorded otherwise, so the same inputs give
//!   the same bytes and the same sha256.
//!
//! A **base** archive (`FROM scratch`) holds the whole tree. A **diff**
//! archive (`FROM <template>`) holds only the entries this build added or
//! changed relative to the parent archive (compared by kind, mode, owner, size
//! and content or link target) plus `snapshot.json` with the merged config: it
//! is a layer to unpack over its parent. A parent entry the build deleted
//! (RUN `rm`) is recorded as a whiteout: an empty file `dir/.wh.name` (OCI's
//! convention), written only where `dir` itself is still there, so a deleted
//! directory takes one whiteout. A tree may not hold names starting `.wh.`.
//! When the parent is itself a diff, the layers below it
//! (`spec.parent.ancestors`, oldest first) are unpacked first and their
//! indexes merged, so the build sees the whole image and its archive holds
//! only what differs from it. Without their downloads, the parent's own
//! layer is all there is (a note says so).
//!
//! # Fault injection
//!
//! The `SNAPSIGN_BUILDER_FAULT` environment variable; see [`faults`].
//!
//! # Exit status
//!
//! 0 built, uploaded, metadata written; 1 the build failed (one `error: …`
//! line on stderr, presigned queries redacted); 2 usage error; 3 the
//! `exit_nonzero` fault.

use std::process::ExitCode;

pub mod archive;
pub mod blocks;
pub mod cli;
pub mod context;
/// The Dockerfile front end is the build client's, so both read a Dockerfile alike.
pub use snapsign::image_build::dockerfile;
pub mod download;
pub mod faults;
pub mod gunzip;
pub mod host_rootfs;
pub mod http;
pub mod image;
pub mod metadata;
pub mod multipart;
pub mod plan;
pub mod run;
pub mod sample;
pub mod snapshot;
pub mod step;
pub mod tree;
pub mod upload;

use cli::{Command, USAGE};
use faults::Faults;
use run::Outcome;

/// This process's peak resident memory (`VmHWM`), bytes; `None` where /proc does not say.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, "VmHWM").map(|kib| kib * 1024)
}

/// This process's resident memory now (`VmRSS`), bytes; `None` where /proc does not say.
pub fn rss_bytes() -> Option<u64> {
    status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS").map(|kib| kib * 1024)
}

/// A memory line (`VmRSS:   1234 kB`) of a `/proc/PID/status` text, in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Runs as the program `argv0` names, when this binary is that program:
/// `tl-rootfs-build`, or `gzip` (the builder sandbox's fast `gzip -d`,
/// [`gunzip`]). `None` for any other name.
pub fn run_as(argv0: &str, args: Vec<String>) -> Option<std::process::ExitCode> {
    match std::path::Path::new(argv0).file_name()?.to_str()? {
        "tl-rootfs-build" => Some(run_cli(args)),
        gunzip::NAME => Some(gunzip::main(args)),
        _ => None,
    }
}

/// Runs the builder with `args` (without argv[0]) and the fault switches of
/// `SNAPSIGN_BUILDER_FAULT`.
pub fn run_cli(args: Vec<String>) -> ExitCode {
    let faults = std::env::var(faults::ENV).ok();
    ExitCode::from(run(&args, faults.as_deref()))
}

/// [`run_cli`] with the fault value passed in; returns the exit status.
pub fn run(args: &[String], fault_env: Option<&str>) -> u8 {
    if args.first().map(String::as_str) == Some(step::INTERNAL_COMMAND) {
        return step::internal_main(&args[1..]);
    }
    let build_args = match cli::parse_args(args) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return 0;
        }
        Ok(Command::Build(build_args)) => build_args,
        Err(message) => {
            eprintln!("error: {message} (see tl-rootfs-build --help)");
            return 2;
        }
    };
    let faults = match Faults::parse(fault_env.unwrap_or_default()) {
        Ok(faults) => faults,
        Err(message) => {
            eprintln!("error: {message}");
            return 2;
        }
    };
    if faults.allocate {
        let held = faults::allocate();
        eprintln!(
            "injected fault: allocate: held {} MiB without being OOM-killed; the sandbox has no memory limit",
            held >> 20
        );
        return 4;
    }
    let outcome = if std::env::var(run::RESUME_ENV).is_ok_and(|v| v == "1") {
        run::resume(&build_args, &faults)
    } else {
        run::build(&build_args, &faults)
    };
    match outcome {
        Ok(Outcome::Done) => 0,
        Ok(Outcome::InjectedExit) => {
            eprintln!("injected fault: exit_nonzero");
            3
        }
        Ok(Outcome::Interrupted(what)) => {
            eprintln!("interrupted: {what}");
            EXIT_INTERRUPTED
        }
        Err(err) => {
            let message = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {}", http::scrub_urls(&message));
            1
        }
    }
}

/// Exit status of a resumable build whose part URLs expired (BSD's
/// EX_TEMPFAIL: try again): see [`run::RESUMABLE_ENV`].
pub const EXIT_INTERRUPTED: u8 = snapsign::image_build::command::BUILDER_EXIT_INTERRUPTED as u8;

/// `12.3 MiB`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(5 * 1024 * 1024 + 512 * 1024), "5.5 MiB");
    }

    #[test]
    fn status_memory_lines_are_read_by_their_exact_field() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nVmRSSx:\t 7 kB\n";
        assert_eq!(super::status_kib(status, "VmRSS"), Some(1024));
        assert_eq!(super::status_kib(status, "VmHWM"), Some(2048));
        assert_eq!(super::status_kib(status, "VmSwap"), None);
        assert_eq!(super::status_kib("VmRSS:\tlots kB\n", "VmRSS"), None);
        assert!(super::rss_bytes().unwrap() > 0 && super::peak_rss_bytes().unwrap() >= super::rss_bytes().unwrap() / 2);
    }
}
