//! The syscalls libc has no safe wrapper for: socket options, TCP_SAVED_SYN, bpf(2), packet sockets, recvmsg with IP options.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets the integer socket option `level`/`name` of `fd` to `value`.
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is a valid open socket for the borrow; the option value is a
    // live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Asks the kernel to keep the SYN of every connection accepted on the
/// listening socket `fd` (Linux >= 4.2, unprivileged).
pub(crate) fn set_save_syn(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_SAVE_SYN, 1)
}

/// Reads (and so releases) the saved SYN of the accepted socket `fd` into
/// `buf`: its IP and TCP headers. Returns 0 when none was saved (the listener
/// did not ask, SYN cookies were in use, or it was read already).
pub(crate) fn saved_syn(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `fd` is a valid open socket for the borrow; the kernel writes at
    // most `len` bytes into `buf`, which is valid for writes of that many, and
    // writes the used length back into `len`, a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(len as usize) } else { Err(io::Error::last_os_error()) }
}

/// The value layouts shared with `bpf/toa.bpf.c`.
pub(crate) mod bpf {
    /// `struct toa_peer`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct Peer {
        pub(crate) state: u8,
        pub(crate) source: u8,
        pub(crate) returned: u8,
        pub(crate) family: u8,
        pub(crate) segments: u8,
        pub(crate) pad: [u8; 1],
        pub(crate) port: u16,
        pub(crate) addr: [u32; 4],
        pub(crate) lb_addr: [u32; 4],
        pub(crate) lb_port: u16,
        pub(crate) pad2: u16,
    }

    /// `struct toa_config`.
    #[cfg(feature = "ebpf")]
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Config {
        pub(crate) enabled: u8,
        pub(crate) kinds: [u8; 5],
        pub(crate) trust_any: u8,
        pub(crate) pad: u8,
        pub(crate) kind_formats: [u8; 256],
    }

    #[cfg(feature = "ebpf")]
    impl Default for Config {
        fn default() -> Self {
            Config { enabled: 0, kinds: [0; 5], trust_any: 0, pad: 0, kind_formats: [0; 256] }
        }
    }

    /// `struct toa_meta`.
    #[cfg(feature = "ebpf")]
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Meta {
        pub(crate) cgroup: [u8; 256],
    }

    // SAFETY: plain `repr(C)` structs of integers and integer arrays, with the
    // padding spelt out as fields: every bit pattern is a valid value, and the
    // layouts match the C structs byte for byte (checked in ebpf.rs tests).
    #[cfg(feature = "ebpf")]
    unsafe impl aya::Pod for Peer {}
    // SAFETY: as above.
    #[cfg(feature = "ebpf")]
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    #[cfg(feature = "ebpf")]
    unsafe impl aya::Pod for Meta {}

    /// `BPF_OBJ_GET` and `BPF_MAP_LOOKUP_ELEM`, the two commands a listener
    /// needs to read the helper's socket storage, and `BPF_LINK_DETACH`.
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_OBJ_GET: libc::c_long = 7;
    #[cfg(feature = "ebpf")]
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// `file_flags` of `BPF_OBJ_GET`: read only.
    const BPF_F_RDONLY: u32 = 1 << 3;

    /// The `BPF_OBJ_GET` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
    #[repr(C)]
    struct MapElem {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    /// Opens a pinned object with `BPF_OBJ_GET` (`file_flags` 0: read and
    /// write, the only mode links allow).
    fn open_pinned(path: &std::path::Path, file_flags: u32) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags };
        // SAFETY: `attr` is a live, fully initialised prefix of `union bpf_attr`
        // for this command and its exact size is passed (the kernel zero-fills
        // the rest); `pathname` points to a NUL-terminated string that outlives
        // the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &attr as *const ObjGet,
                size_of::<ObjGet>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    /// Opens a pinned map, read only.
    pub(crate) fn open_pinned_read_only(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
        open_pinned(path, BPF_F_RDONLY)
    }

    /// Detaches the pinned link at `path` now, with `BPF_LINK_DETACH`; the
    /// pin itself stays for the caller to remove.
    ///
    /// Removing the last pin of a link releases it too, but later: the
    /// kernel frees a bpffs inode after an RCU grace period and puts the
    /// link from a workqueue, so for a moment after `unlink` returns the
    /// program still runs (a connection accepted then was still rewritten).
    /// An explicit detach takes effect before it returns.
    #[cfg(feature = "ebpf")]
    pub(crate) fn detach_pinned_link(path: &std::path::Path) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let link = open_pinned(path, 0)?;
        let attr: u32 = link.as_raw_fd() as u32;
        // SAFETY: the `link_detach` member of `union bpf_attr` is one u32,
        // the link's fd (live: `link` is dropped after the call); its exact
        // size is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_DETACH,
                &attr as *const u32,
                size_of::<u32>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `BPF_MAP_LOOKUP_ELEM` of `key` in `map` into `value`; whether it was there.
    ///
    /// # Safety
    ///
    /// `key` must point to as many readable bytes as the map's key size, and
    /// `value` to as many writable bytes as its value size: the kernel reads
    /// and writes exactly those.
    unsafe fn lookup(map: std::os::fd::BorrowedFd<'_>, key: *const u8, value: *mut u8) -> bool {
        use std::os::fd::AsRawFd;
        let attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            pad: 0,
            key: key as u64,
            value: value as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a live, fully initialised prefix of `union bpf_attr`
        // for this command and its exact size is passed; the pointers in it
        // are valid for the sizes the kernel uses (this function's contract).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const MapElem,
                size_of::<MapElem>() as libc::c_uint,
            )
        };
        rc == 0
    }

    /// The value of `key` in the hash map `map` (None: no value, or any
    /// error). `K` and `V` must be the map's key and value sizes (the
    /// helper's UDP maps: 20 bytes each, checked against the C structs).
    pub(crate) fn lookup_bytes<const K: usize, const V: usize>(
        map: std::os::fd::BorrowedFd<'_>,
        key: &[u8; K],
    ) -> Option<[u8; V]> {
        let mut value = [0u8; V];
        // SAFETY: K readable bytes at `key`, V writable at `value`: the
        // map's sizes, as the caller promises.
        unsafe { lookup(map, key.as_ptr(), value.as_mut_ptr()) }.then_some(value)
    }

    /// The socket storage's value for socket `sock` (None: no value, or any error).
    pub(crate) fn lookup_peer(map: std::os::fd::BorrowedFd<'_>, sock: libc::c_int) -> Option<Peer> {
        let mut value = Peer::default();
        // SAFETY: the key of a socket storage map is a socket fd (a live
        // c_int here); `value` is a live `Peer`, whose size is the map's value
        // size (44 bytes, checked against the C struct in the tests).
        let found =
            unsafe { lookup(map, (&sock as *const libc::c_int).cast(), (&mut value as *mut Peer).cast()) };
        found.then_some(value)
    }
}

/// The packet socket of capture mode (`crate::tap`).
pub(crate) mod tap {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use crate::tap::filter::Insn;

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
    }

    /// A `SOCK_DGRAM` packet socket (IP packets, no link header) on every
    /// interface of this network namespace, with `program` attached before it
    /// is bound, so that nothing unfiltered is ever queued. Needs CAP_NET_RAW.
    pub(crate) fn open(program: &[Insn]) -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = check(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut filter: Vec<libc::sock_filter> =
            program.iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
        let fprog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
        // SAFETY: fprog points to `len` live sock_filter entries for the call;
        // the kernel copies them.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        })?;
        // Room for bursts of handshakes between two accept() calls (capped by net.core.rmem_max).
        let _ =
            super::set_int_option(std::os::fd::AsFd::as_fd(&fd), libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = 0; // every interface
        // SAFETY: a live sockaddr_ll and its exact size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(fd)
    }

    /// One queued packet into `buf` (truncated to it), or None when none is queued.
    pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for writes of its length; the kernel writes at most that.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some((n as usize).min(buf.len())));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) }
    }

    /// Packets dropped for a full queue since the last call (PACKET_STATISTICS resets them).
    pub(crate) fn drops(fd: BorrowedFd<'_>) -> io::Result<u64> {
        let mut stats = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: a live tpacket_stats and its size; the kernel writes at most `len` bytes.
        check(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut stats as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        })?;
        Ok(u64::from(stats.tp_drops))
    }
}

/// `IP_RECVOPTS` and `recvmsg` for `crate::uoa::UoaSocket`.
pub(crate) mod udp {
    use std::io;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// Asks the kernel to hand over the IPv4 options of each datagram.
    pub(crate) fn set_recv_opts(fd: BorrowedFd<'_>) -> io::Result<()> {
        super::set_int_option(fd, libc::IPPROTO_IP, libc::IP_RECVOPTS, 1)
    }

    /// One datagram into `buf`: (its length, its source, its IPv4 options, up to 40 bytes).
    pub(crate) fn recv_with_opts(
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, [u8; 40], usize)> {
        // SAFETY: sockaddr_storage is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 16]; // 128 bytes, aligned for cmsghdr
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data; all-zero is valid, the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: every pointer in msg refers to a live local (addr, iov over
        // buf, control) of the size given; the kernel writes within them.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut opts = [0u8; 40];
        let mut opts_len = 0;
        // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk within
        // msg_controllen, and each header's data is read only up to its cmsg_len.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_RECVOPTS {
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    opts_len = len.min(40);
                    std::ptr::copy_nonoverlapping(libc::CMSG_DATA(cmsg), opts.as_mut_ptr(), opts_len);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let from = match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let a = unsafe { *(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                ))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let a = unsafe { *(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                ))
            }
            _ => return Err(io::Error::other("recvmsg: a source of an unknown family")),
        };
        Ok((n as usize, from, opts, opts_len))
    }
}

/// Interfaces, for the helper's tc program (`crate::ebpf`).
#[cfg(feature = "ebpf")]
pub(crate) mod link {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// The link type (`ARPHRD_*`) of interface `name` in this network
    /// namespace (SIOCGIFHWADDR), whatever `/sys` shows.
    pub(crate) fn link_type(name: &str) -> io::Result<u16> {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.as_bytes();
        if bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `req` is a live ifreq with a NUL-terminated name (zeroed
        // beyond it); SIOCGIFHWADDR writes only its ifru_hwaddr member.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel filled in ifru_hwaddr, the member SIOCGIFHWADDR writes.
        Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
    }
}
