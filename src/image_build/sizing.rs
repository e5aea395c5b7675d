//! Rootfs size, builder resources and the multipart hint (wit/protocol.md §5.7).

use serde::Serialize;

use crate::wire::sign::{MAX_PARTS, MultipartHint};

/// Rootfs size of base builds without `--disk-mb`: 10 GiB.
pub const DEFAULT_ROOTFS_DISK_MB: u64 = 10_240;
/// Part size of the snapshot upload: 64 MiB.
pub const PART_SIZE_BYTES: u64 = 64 * MIB;
const MIB: u64 = 1024 * 1024;

/// Why no size could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// `--disk-mb` overflows bytes.
    DiskMbTooLarge(u64),
    /// A diff build whose prepared parent has no `rootfsDiskBytes`.
    MissingParentSize,
}

impl std::fmt::Display for SizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeError::DiskMbTooLarge(mb) => write!(f, "--disk-mb {mb} is too large (it overflows a byte count)"),
            SizeError::MissingParentSize => write!(
                f,
                "platform API did not return parent rootfsDiskBytes for diff build; pass --disk-mb explicitly or update Platform API"
            ),
        }
    }
}

impl std::error::Error for SizeError {}

/// Rootfs disk bytes: `--disk-mb`, else the parent's size (diff), else 10 GiB.
pub fn rootfs_disk_bytes(disk_mb: Option<u64>, is_diff: bool, parent_bytes: Option<u64>) -> Result<u64, SizeError> {
    match (disk_mb, is_diff, parent_bytes) {
        (Some(mb), _, _) => mb.checked_mul(MIB).ok_or(SizeError::DiskMbTooLarge(mb)),
        (None, true, Some(bytes)) => Ok(bytes),
        (None, true, None) => Err(SizeError::MissingParentSize),
        (None, false, _) => Ok(DEFAULT_ROOTFS_DISK_MB * MIB),
    }
}

/// The multipart hint for a rootfs of `rootfs_bytes`: ceil(MiB / 64) parts of 64 MiB, clamped to 1..=10000.
pub fn multipart_hint(rootfs_bytes: u64) -> MultipartHint {
    let disk_mb = rootfs_bytes.div_ceil(MIB);
    let parts = disk_mb.div_ceil(PART_SIZE_BYTES / MIB).clamp(1, u64::from(MAX_PARTS));
    MultipartHint { max_parts: parts as u32, part_size_bytes: PART_SIZE_BYTES }
}

/// Builder sandbox resources.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Resources {
    /// CPUs.
    pub cpus: f64,
    /// Memory, MiB.
    pub memory_mb: i64,
    /// Disk, MiB: max(rootfs size, builder disk).
    pub disk_mb: u64,
}

/// Resources: overrides, else the prepared builder's; disk never below the rootfs size.
pub fn resources(
    rootfs_bytes: u64,
    prepared: (f64, i64, u64),
    cpus: Option<f64>,
    memory_mb: Option<i64>,
    builder_disk_mb: Option<u64>,
) -> Resources {
    let (p_cpus, p_memory, p_disk) = prepared;
    Resources {
        cpus: cpus.unwrap_or(p_cpus),
        memory_mb: memory_mb.unwrap_or(p_memory),
        disk_mb: rootfs_bytes.div_ceil(MIB).max(builder_disk_mb.unwrap_or(p_disk)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_count_for_0_64_65_mib_the_default_and_huge_disks() {
        assert_eq!(multipart_hint(0).max_parts, 1);
        assert_eq!(multipart_hint(64 * MIB).max_parts, 1);
        assert_eq!(multipart_hint(64 * MIB + 1).max_parts, 2, "64 MiB + 1 byte is 65 MiB");
        assert_eq!(multipart_hint(65 * MIB).max_parts, 2);
        assert_eq!(multipart_hint(DEFAULT_ROOTFS_DISK_MB * MIB).max_parts, 160);
        assert_eq!(multipart_hint(10_000 * 64 * MIB).max_parts, 10_000);
        assert_eq!(multipart_hint(u64::MAX).max_parts, 10_000);
        assert_eq!(multipart_hint(1).part_size_bytes, 67_108_864);
    }

    #[test]
    fn size_precedence_flag_parent_default_and_missing_parent() {
        assert_eq!(rootfs_disk_bytes(Some(100), true, Some(5)), Ok(100 * MIB));
        assert_eq!(rootfs_disk_bytes(None, true, Some(21_474_836_480)), Ok(21_474_836_480));
        assert_eq!(rootfs_disk_bytes(None, false, Some(5)), Ok(10_737_418_240));
        assert_eq!(rootfs_disk_bytes(None, true, None), Err(SizeError::MissingParentSize));
        assert!(rootfs_disk_bytes(None, true, None).unwrap_err().to_string().contains("pass --disk-mb"));
        assert_eq!(rootfs_disk_bytes(Some(u64::MAX), false, None), Err(SizeError::DiskMbTooLarge(u64::MAX)));
    }

    #[test]
    fn builder_disk_is_at_least_the_rootfs() {
        let r = resources(10 * 1024 * MIB, (2.0, 4096, 30_720), None, None, None);
        assert_eq!((r.cpus, r.memory_mb, r.disk_mb), (2.0, 4096, 30_720));
        let r = resources(40 * 1024 * MIB, (2.0, 4096, 30_720), Some(4.0), Some(8192), None);
        assert_eq!((r.cpus, r.memory_mb, r.disk_mb), (4.0, 8192, 40_960));
        assert_eq!(resources(MIB, (1.0, 1, 10), None, None, Some(50)).disk_mb, 50);
    }
}
