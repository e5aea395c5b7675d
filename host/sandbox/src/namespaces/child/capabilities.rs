//! Capabilities of a sandbox process, dropped after the fork: sandbox root
//! keeps all of its namespace's but CAP_SYS_RESOURCE, the user none.

pub(in crate::namespaces) const CAP_SYS_RESOURCE: u32 = 24;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Keeps only the capabilities in the mask `keep` in the effective,
/// permitted and inheritable sets.
pub(in crate::namespaces) fn limit_capabilities(keep: u64) -> bool {
    let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return false;
        }
        for (word, mask) in data.iter_mut().zip([keep as u32, (keep >> 32) as u32]) {
            word.effective &= mask;
            word.permitted &= mask;
            word.inheritable &= mask;
        }
        libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0
    }
}
