//! `tl-rootfs-build`: the snapsign reference rootfs builder (see the library docs).

fn main() -> std::process::ExitCode {
    let mut args = std::env::args();
    let name = args.next().unwrap_or_default();
    let args: Vec<String> = args.collect();
    // Linked as `gzip` in the builder sandbox: a fast `gzip -d` for the context's `tar -xzf`.
    snapsign_rootfs_builder::run_as(&name, args.clone()).unwrap_or_else(|| snapsign_rootfs_builder::run_cli(args))
}
