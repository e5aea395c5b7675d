//! `tl-rootfs-build`: the snapsign reference rootfs builder (see the library docs).

fn main() -> std::process::ExitCode {
    snapsign_rootfs_builder::run_cli(std::env::args().skip(1).collect())
}
