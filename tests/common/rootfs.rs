//! The RUN tests' base image: this machine's sh, bash and coreutils with
//! their libraries (`snapsign_rootfs_builder::host_rootfs`).

/// Writes the test rootfs under `dir`; panics naming what failed.
pub fn write(dir: &std::path::Path) {
    use snapsign_rootfs_builder::host_rootfs;
    host_rootfs::write(dir, &host_rootfs::TEST_PROGRAMS).expect("make the test rootfs from this machine's programs");
}
