//! The loopback interface of a fresh network namespace, brought up without
//! allocating: safe in a forked child (the holder's private network, and a
//! builder's RUN step).

/// Sets IFF_UP on `lo` of the calling thread's network namespace; the errno on failure.
pub fn raise_loopback() -> Result<(), i32> {
    // SAFETY: a socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(super::errno());
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        let mut ok = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut request) == 0;
        if ok {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            ok = libc::ioctl(sock, libc::SIOCSIFFLAGS, &request) == 0;
        }
        let errno = super::errno();
        libc::close(sock);
        if ok { Ok(()) } else { Err(errno) }
    }
}
