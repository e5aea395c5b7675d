//! `snapsign`: the host CLI. The clap types are in `cli`, one function per
//! command in `commands`.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Servers allocate per request (hyper, wasmtime's lowering, answers):
/// mimalloc serves those small, short-lived blocks faster than glibc's
/// malloc (docs/figures.md, "Where the time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Installed in sandboxes as /usr/local/bin/tl-rootfs-build (and its `gzip`): be the reference builder.
    let argv0 = std::env::args().next().unwrap_or_default();
    if let Some(code) = snapsign_rootfs_builder::run_as(&argv0, std::env::args().skip(1).collect()) {
        return code;
    }
    let cli = Cli::parse();
    raise_open_files_limit();
    // Servers log requests by default; one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::ServeSigner(_) | Command::Store(_) | Command::Dev(_) => {
            "snapsign=info,snapsign_host=info,snapsign_runtime=info,warn"
        }
        _ => "warn",
    };
    // Colour only on a terminal, and never when NO_COLOR is set (no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, as Go
/// programs and nginx do: many shells and service managers start programs
/// at 1024 soft, below what a server's connection table admits
/// (`--max-connections`, default 1024, plus the store's and sandboxes'
/// files). The hard limit, set by the administrator, still bounds it.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
