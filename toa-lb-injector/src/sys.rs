//! The system calls no safe crate wraps: for the ring datapath a
//! PACKET_MMAP (TPACKET_V2) receive ring, fanout groups with a classic BPF
//! steering program and batched sends with `sendmmsg`; for every user-space
//! datapath the interface's MTU and offload settings (ethtool ioctls).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// The ring's frame header (`struct tpacket2_hdr`).
#[repr(C)]
struct Tpacket2Hdr {
    status: u32,
    len: u32,
    snaplen: u32,
    mac: u16,
    net: u16,
    sec: u32,
    nsec: u32,
    vlan_tci: u16,
    vlan_tpid: u16,
    padding: [u8; 4],
}

/// `enum tpacket_versions { TPACKET_V1, TPACKET_V2, TPACKET_V3 }`.
const TPACKET_V2: libc::c_int = 1;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// `setsockopt(fd, level, name, value)`.
fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; `value` is a live T and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc).map(drop)
}

/// `setsockopt(fd, SOL_PACKET, name, value)`.
fn set_packet_option<T>(fd: &OwnedFd, name: libc::c_int, value: &T) -> io::Result<()> {
    set_option(fd, libc::SOL_PACKET, name, value)
}

/// An AF_PACKET raw socket for `protocol` (host order; converted here).
/// Protocol 0 receives nothing: a send-only socket. It is bound later
/// ([`bind`]), once the ring options are set.
fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    let protocol = libc::c_int::from(protocol.to_be());
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a packet socket to interface `ifindex` for `protocol` (host order).
fn bind(fd: &OwnedFd, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a live sockaddr_ll and its exact size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc).map(drop)
}

/// A TPACKET_V2 receive ring on one interface: the kernel copies each frame
/// into the next free slot and flips its status; reading costs no system
/// call while frames are waiting.
pub(crate) struct RxRing {
    fd: OwnedFd,
    map: NonNull<u8>,
    map_len: usize,
    frame_size: usize,
    frames: usize,
    next: usize,
}

// SAFETY: the mapping belongs to this value alone (no aliases are handed out
// beyond a `&mut self` borrow), so moving it to another thread is sound.
unsafe impl Send for RxRing {}

/// A frame taken from an [`RxRing`].
pub(crate) enum RxFrame<'a> {
    /// The whole frame.
    Frame(&'a [u8]),
    /// Cut short: longer than a ring slot (a GSO super-packet: offloads on).
    Truncated(usize),
    /// Carried a VLAN tag, which toa-lb does not handle.
    Vlan,
}

impl RxRing {
    /// A ring of `frames` slots of `frame_size` bytes (a power of two, at
    /// least 2048) receiving every frame of `ifindex`, outgoing ones excepted.
    ///
    /// The ring takes no frame until [`RxRing::admit`]: a group of rings sets
    /// its steering up first, or the frames that arrive meanwhile would land
    /// on workers whose engines do not own their flows.
    pub(crate) fn open(ifindex: u32, frame_size: usize, frames: usize) -> io::Result<RxRing> {
        // Protocol 0: no frames at all until the bind below; by then the filter drops them.
        let fd = packet_socket(0)?;
        let reject_all =
            [libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: 0 }];
        let prog = libc::sock_fprog { len: 1, filter: reject_all.as_ptr().cast_mut() };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)?;
        set_packet_option(&fd, libc::PACKET_VERSION, &TPACKET_V2)?;
        // Our own transmissions would come back to every tap on the interface.
        set_packet_option(&fd, libc::PACKET_IGNORE_OUTGOING, &(1 as libc::c_int))?;
        let block_size = frame_size.max(1 << 16);
        let blocks = (frames * frame_size).div_ceil(block_size);
        let frames = blocks * (block_size / frame_size);
        let req = libc::tpacket_req {
            tp_block_size: block_size as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: frame_size as u32,
            tp_frame_nr: frames as u32,
        };
        set_packet_option(&fd, libc::PACKET_RX_RING, &req)?;
        let map_len = block_size * blocks;
        // SAFETY: maps the ring the kernel just allocated for `fd`, at its exact
        // size; the result is checked before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(map.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let ring = RxRing { fd, map, map_len, frame_size, frames, next: 0 };
        bind(&ring.fd, ifindex, libc::ETH_P_ALL as u16)?;
        Ok(ring)
    }

    /// Lets frames in: removes the filter that [`RxRing::open`] set up to drop
    /// every frame.
    pub(crate) fn admit(&self) -> io::Result<()> {
        set_option(&self.fd, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, &(0 as libc::c_int))
    }

    /// The socket, for `poll`.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn header(&self, slot: usize) -> *mut Tpacket2Hdr {
        // SAFETY: slot < frames, so the offset stays inside the mapping;
        // frames never straddle blocks since block_size is a multiple of frame_size.
        unsafe { self.map.as_ptr().add(slot * self.frame_size).cast() }
    }

    fn status(&self, slot: usize) -> &AtomicU32 {
        // SAFETY: the status word is the first, 4-aligned field of a slot
        // header inside the mapping; the kernel writes it concurrently, which
        // is what the atomic is for. The mapping outlives the borrow of self.
        unsafe { AtomicU32::from_ptr(self.header(slot).cast::<u32>()) }
    }

    /// Whether a frame is waiting.
    pub(crate) fn ready(&self) -> bool {
        self.status(self.next).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// Hands the next waiting frame to `f`, then gives its slot back to the
    /// kernel. Returns false when no frame is waiting.
    pub(crate) fn next_frame(&mut self, f: impl FnOnce(RxFrame<'_>)) -> bool {
        let slot = self.next;
        let status = self.status(slot).load(Ordering::Acquire);
        if status & libc::TP_STATUS_USER == 0 {
            return false;
        }
        let header = self.header(slot);
        // SAFETY: the slot is ours until its status goes back to KERNEL (the
        // Acquire load above orders these reads after the kernel's writes);
        // mac + snaplen lies inside the slot, as the kernel wrote it.
        let (frame, len) = unsafe {
            let (mac, snaplen, len) =
                (usize::from((*header).mac), (*header).snaplen as usize, (*header).len as usize);
            let end = (mac + snaplen).min(self.frame_size);
            let start = mac.min(end);
            (std::slice::from_raw_parts(header.cast::<u8>().add(start), end - start), len)
        };
        if status & libc::TP_STATUS_VLAN_VALID != 0 {
            f(RxFrame::Vlan);
        } else if frame.len() < len {
            f(RxFrame::Truncated(len));
        } else {
            f(RxFrame::Frame(frame));
        }
        self.status(slot).store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.next = (slot + 1) % self.frames;
        true
    }

    /// Joins fanout group `id` (0: ask the kernel for a free one) as the next
    /// member; the group's steering program is set with [`RxRing::set_steering`].
    /// Returns the group id.
    pub(crate) fn join_fanout(&self, id: u16) -> io::Result<u16> {
        // The group's hook replaces the member's own, so the member's
        // PACKET_IGNORE_OUTGOING must be said again for the group.
        let mut mode = libc::PACKET_FANOUT_CBPF | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
        if id == 0 {
            mode |= libc::PACKET_FANOUT_FLAG_UNIQUEID;
        }
        let arg: u32 = u32::from(id) | (mode << 16);
        set_packet_option(&self.fd, libc::PACKET_FANOUT, &arg)?;
        let mut value: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: `value` is a live u32 and `len` says so; the kernel writes at most that.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                (&mut value as *mut u32).cast(),
                &mut len,
            )
        };
        check(rc)?;
        Ok(value as u16)
    }

    /// Sets the fanout group's classic BPF program: its return value, modulo
    /// the members, picks the socket a frame goes to.
    pub(crate) fn set_steering(&self, program: &[libc::sock_filter]) -> io::Result<()> {
        let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr().cast_mut() };
        set_packet_option(&self.fd, libc::PACKET_FANOUT_DATA, &prog)
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`; no borrow of it
        // outlives `&mut self`.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// A send-only AF_PACKET socket that sends frames in batches, one
/// `sendmmsg` per batch (the kernel copies each frame: no buffer is pinned).
pub(crate) struct TxBatch {
    fd: OwnedFd,
    slot: usize,
    buf: Vec<u8>,
    lens: Vec<usize>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Frames dropped since the last flush (too long, or refused by the kernel).
    dropped: u64,
}

// SAFETY: the iovec/mmsghdr pointers are rebuilt from `buf` on every flush and
// never used outside it, so the value can move between threads.
unsafe impl Send for TxBatch {}

impl TxBatch {
    /// A batch of up to `capacity` frames of at most `slot` bytes on `ifindex`.
    pub(crate) fn open(ifindex: u32, slot: usize, capacity: usize) -> io::Result<TxBatch> {
        let fd = packet_socket(0)?;
        // Straight to the driver: no qdisc between toa-lb and the wire.
        set_packet_option(&fd, libc::PACKET_QDISC_BYPASS, &(1 as libc::c_int))?;
        bind(&fd, ifindex, 0)?;
        // SAFETY: iovec is a plain C struct; all-zero (null, 0) is a valid value.
        let iov: libc::iovec = unsafe { std::mem::zeroed() };
        // SAFETY: mmsghdr is a plain C struct; all-zero (null pointers, zero lengths) is valid.
        let msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Ok(TxBatch {
            fd,
            slot,
            buf: vec![0; slot * capacity],
            lens: Vec::with_capacity(capacity),
            iov: vec![iov; capacity],
            msgs: vec![msg; capacity],
            dropped: 0,
        })
    }

    /// Queues a copy of `frame` (longer than a slot: dropped); sends the
    /// batch first if it is full.
    pub(crate) fn push(&mut self, frame: &[u8]) {
        if frame.len() > self.slot {
            self.dropped += 1;
            return;
        }
        if self.lens.len() == self.msgs.len() {
            // The count stays for the caller's next flush.
            let dropped = self.flush();
            self.dropped += dropped;
        }
        let at = self.lens.len() * self.slot;
        self.buf[at..at + frame.len()].copy_from_slice(frame);
        self.lens.push(frame.len());
    }

    /// Sends what is queued; returns how many frames were dropped since the
    /// last flush (longer than a slot, or refused: the device queue is full).
    pub(crate) fn flush(&mut self) -> u64 {
        let mut sent = 0;
        while sent < self.lens.len() {
            let n = self.lens.len() - sent;
            for i in 0..n {
                let k = sent + i;
                self.iov[i] = libc::iovec {
                    iov_base: self.buf[k * self.slot..].as_mut_ptr().cast(),
                    iov_len: self.lens[k],
                };
                // SAFETY: all-zero is a valid msghdr (no name, no control).
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_iov = &mut self.iov[i];
                hdr.msg_iovlen = 1;
                self.msgs[i] = libc::mmsghdr { msg_hdr: hdr, msg_len: 0 };
            }
            // SAFETY: `msgs[..n]` point at `iov[..n]`, which point into `buf`;
            // all of them stay alive and unmoved for the call.
            let rc = unsafe {
                libc::sendmmsg(self.fd.as_raw_fd(), self.msgs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT)
            };
            if rc <= 0 {
                // The device queue is full (or gone): drop this frame, go on.
                self.dropped += 1;
                sent += 1;
            } else {
                sent += rc as usize;
            }
        }
        self.lens.clear();
        std::mem::take(&mut self.dropped)
    }
}

/// An ifreq naming `name`, and a socket to ask about it: the two halves of
/// every interface ioctl.
fn interface_request(name: &str) -> io::Result<(libc::ifreq, OwnedFd)> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::other(format!("interface name {name} is too long")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok((req, unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The MTU of interface `name` (SIOCGIFMTU), in this network namespace
/// whatever `/sys` shows.
pub(crate) fn mtu(name: &str) -> io::Result<usize> {
    let (mut req, fd) = interface_request(name)?;
    // SAFETY: `req` is a live ifreq with a NUL-terminated name; SIOCGIFMTU
    // writes only its ifru_mtu member.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFMTU, &mut req) })?;
    // SAFETY: the kernel filled in ifru_mtu, the member SIOCGIFMTU writes.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    usize::try_from(mtu).map_err(|_| io::Error::other(format!("{name} has MTU {mtu}")))
}

/// The link-layer type (`ARPHRD_*`) of interface `name` (SIOCGIFHWADDR), in
/// this network namespace whatever `/sys` shows.
pub(crate) fn link_type(name: &str) -> io::Result<u16> {
    let (mut req, fd) = interface_request(name)?;
    // SAFETY: `req` is a live ifreq with a NUL-terminated name; SIOCGIFHWADDR
    // writes only its ifru_hwaddr member.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
    // SAFETY: the kernel filled in ifru_hwaddr, the member SIOCGIFHWADDR writes.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// `struct ethtool_value`: a command and its 32-bit value.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Runs the legacy ethtool command `cmd` (ETHTOOL_G* or ETHTOOL_S*) on
/// interface `name` with `data`, and returns the value the kernel left.
pub(crate) fn ethtool(name: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let (mut req, fd) = interface_request(name)?;
    let mut value = EthtoolValue { cmd, data };
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: `req` names the interface and points at `value`, a live
    // ethtool_value that the legacy get/set commands read and write whole.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut req) })?;
    Ok(value.data)
}

/// Waits until one of `fds` is readable or `timeout_ms` passes. A socket in
/// error (its interface went down, say) is reported once: its pending error
/// is read, which clears it; otherwise `poll` would return at once forever.
pub(crate) fn poll_readable(fds: &[&OwnedFd], timeout_ms: i32) -> Option<io::Error> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc <= 0 {
        return None;
    }
    let failed = fds.iter().zip(&pfds).find(|(_, p)| p.revents & libc::POLLERR != 0)?.0;
    let mut error: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `error` is a live c_int and `len` says so; SO_ERROR writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            failed.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut error as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    Some(if rc < 0 { io::Error::last_os_error() } else { io::Error::from_raw_os_error(error) })
}

/// The map layouts shared with `bpf/inject.bpf.c`, and the one `bpf(2)`
/// command aya lacks.
pub(crate) mod bpf {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;

    /// The `BPF_OBJ_GET` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// Detaches the pinned link at `path` now, with `BPF_LINK_DETACH`; the
    /// pin itself stays for the caller to remove.
    ///
    /// Removing the last pin of a link releases it too, but later: the
    /// kernel frees a bpffs inode after an RCU grace period and puts the
    /// link from a workqueue, so for a moment after `unlink` returns the
    /// program still runs. An explicit detach takes effect before it returns.
    pub(crate) fn detach_pinned_link(path: &Path) -> io::Result<()> {
        let path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
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
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        let link = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
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
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `struct listener_key`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub(crate) struct ListenerKey {
        /// The VIP, network order; IPv4 in the first word, the rest zero.
        pub(crate) addr: [u8; 16],
        /// Network order.
        pub(crate) port: [u8; 2],
        pub(crate) family: u8,
        pub(crate) proto: u8,
    }

    /// `struct listener`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub(crate) struct Listener {
        pub(crate) slot: u32,
        pub(crate) mode: u8,
        pub(crate) placement: u8,
        pub(crate) kind4: u8,
        pub(crate) kind6: u8,
    }

    /// `struct config`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Config {
        pub(crate) transparent_mark: u32,
        pub(crate) flags: u32,
        pub(crate) udp_timeout_ns: u64,
        pub(crate) flow_mask: u32,
        pub(crate) tcp_flow_mask: u32,
        pub(crate) kind_formats: [u8; 256],
        pub(crate) mtu_ifindex: u32,
        pub(crate) gate_mark: u32,
    }

    // SAFETY: plain `repr(C)` structs of integers and byte arrays without
    // padding: every bit pattern is a valid value, and the layouts match the
    // C structs byte for byte (checked in the injector's tests).
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Listener {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
}
