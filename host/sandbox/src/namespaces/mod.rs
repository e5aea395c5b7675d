//! In-process confinement with Linux namespaces: no helper binary.
//!
//! Each sandbox has a *holder*: a process cloned from this one into a new
//! pid namespace (it is pid 1 there and reaps orphans) and a new mount
//! namespace, both owned by the host's user namespace, so that nothing in
//! the sandbox can change a mount. The holder builds the sandbox's root
//! (read-only `/usr`, `/etc`, a fresh `/proc`, a minimal `/dev`, the
//! writable areas, everything else read-only), pivots into it, then makes
//! the sandbox's user namespace (host uids `range.base..+65536` as 0..65535;
//! the host writes the maps), and in it the network, uts and ipc
//! namespaces, raises `lo`, and forbids further user namespaces
//! (`user.max_user_namespaces = 0`, which sandbox root cannot raise: its
//! processes lack CAP_SYS_RESOURCE).
//!
//! A process of the sandbox is started by a *launcher* forked from this
//! process (what Tokio sees as the child): it joins the holder's
//! namespaces except the user one, moves itself into the process's cgroups,
//! and forks the process, which joins the user namespace, takes its uid,
//! closes every descriptor but 0, 1 and 2, and executes the command. The
//! launcher waits and exits with the process's status (128 + signal when
//! it was killed). Killing the holder ends every process of the sandbox.
//!
//! Rootless (an ordinary user), the holder is cloned into a new *outer*
//! user namespace too, which owns the pid and mount namespaces. Its maps:
//! with subordinate ids, `newuidmap`/`newgidmap` write this user's uid and
//! gid as 0 and the subordinate range as 1..65535; with one uid, the host
//! writes only 0. The sandbox's user namespace is made below it and mapped
//! by a helper forked from the host that joined the outer namespace (only a
//! process there may write those maps): every outer id one to one (`0 0 1`,
//! `1 1 65535`), or with one uid `0 0 1`, and then the same helper makes,
//! below the sandbox's namespace, the sandbox user's (`1000 0 1`). The
//! holder chowns the sandbox user's `/home` (with subordinate ids). The holder mounts
//! the disk itself and hands it over through `/proc/{holder}/fd`, then
//! makes itself non-dumpable (sandbox root is the same host uid). A
//! launcher joins the outer namespace first (its capabilities over the
//! others come from there) and is non-dumpable; forwarded ports are opened
//! in the sandbox's network namespace by such a helper too.
//!
//! The host process cannot chown to, read the 0600 files of, nor empty the
//! directories of subordinate uids: rootless, those file operations run in a
//! helper forked from it that joined a *keeper* user namespace, mapped as
//! every sandbox's outer one and held by a descriptor (`in_keeper`), and a
//! sandbox's directory is removed by `rm -rf` run as root there (`remove_tree`).
//!
//! The parts, host side (before a fork, or in this process), each importing
//! only those above it:
//! - [`spec`]: what the host asks, as plain values (a holder's spec with this
//!   host's root layout, a process's launch);
//! - [`os`]: pipes, namespace descriptors, a guard that kills a half-started
//!   child, paths as C strings;
//! - [`root`]: the steps that build a sandbox's root from a spec;
//! - [`plan`]: the data a forked child reads ([`plan::HolderPlan`],
//!   [`plan::LaunchPlan`]): C strings, pointer arrays, raw descriptors and
//!   integers, all made before the fork;
//! - [`holder`]: starting a holder, talking to it until its namespaces are
//!   ready, holding them by descriptors, killing it;
//! - [`launcher`]: a [`std::process::Command`] that starts one process in a sandbox;
//! - [`ids`]: rootless uid and gid maps, the keeper namespace, removing a tree;
//! - [`helper`]: forking a short-lived helper and taking its answer and descriptors;
//! - [`ports`]: forwarded ports, listened on in a sandbox's network namespace.
//!
//! And [`child`], the only code that runs in a forked child (the holder's
//! whole life, the launcher and the process until exec, a helper): its
//! functions take only prepared data and make only system calls on it, no
//! allocation and no locks (a test checks its source for either).

mod child;
mod helper;
mod holder;
mod ids;
mod launcher;
mod os;
mod plan;
mod ports;
mod root;
mod spec;

use anyhow::{Result, bail};

pub use child::net::raise_loopback;
pub(crate) use child::send_fds;
pub(crate) use holder::Holder;
pub(crate) use ids::{in_keeper, keeper_namespace, remove_tree};
pub(crate) use ports::listen_in;
pub(crate) use spec::{HolderSpec, Launch, RootEntry, host_layout};

/// Whether this process may make sandboxes here (root, with namespaces).
pub(crate) fn check_privileges() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "local sandboxes are confined with Linux namespaces, uid ranges and cgroups, which need root; run as \
             root, or pass --allow-unconfined to run sandbox processes directly on this host without any confinement"
        );
    }
    Ok(())
}
