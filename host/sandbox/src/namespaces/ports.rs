//! Rootless forwarded ports: listening sockets made in a sandbox's network
//! namespace by a helper, and handed to the host.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

use super::child::{MAX_SENT_FDS, helpers};
use super::helper::run_helper;

/// Rootless: listening sockets on `127.0.0.1:port` for each port, made in
/// the network namespace `net` by a helper that joined `outer` (a thread of
/// this process may not enter a namespace owned by another user namespace).
pub(crate) fn listen_in(outer: &OwnedFd, net: &OwnedFd, ports: &[u16]) -> Result<Vec<std::net::TcpListener>> {
    if ports.len() > MAX_SENT_FDS {
        bail!("{} forwarded ports asked; at most {MAX_SENT_FDS} can be forwarded into one sandbox", ports.len());
    }
    let (outer, net) = (outer.as_raw_fd(), net.as_raw_fd());
    let addresses: Vec<libc::sockaddr_in> = ports
        .iter()
        .map(|port| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() },
            sin_zero: [0; 8],
        })
        .collect();
    let body = |sock: RawFd| helpers::listen(outer, net, &addresses, sock);
    let fds = run_helper(&format!("listen on 127.0.0.1:{ports:?}"), &helpers::LISTEN_STEPS, &body)?;
    if fds.len() != ports.len() {
        bail!("the helper listening on ports {ports:?} sent {} sockets", fds.len());
    }
    fds.into_iter()
        .map(|fd| {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true).context("make the listener non-blocking")?;
            Ok(listener)
        })
        .collect()
}
