//! Test support for the toa workspace (never shipped).
//!
//! - [`netns`]: network namespaces that clean up after themselves, and
//!   running code or programs inside them.
//! - [`rawtcp`]: a TCP client on an AF_PACKET socket that writes TOA
//!   options where a test asks (SYN, handshake ACK, both, malformed, several),
//!   as an LB would, for hundreds of connections at once.
//! - [`bed`]: the backend testbed those two make: one namespace, a veth pair
//!   whose LB end has no IP address (so its kernel never answers the backend:
//!   no RSTs to suppress) and whose backend end is the server.
//! - [`sys`]: the one socket option a test needs that no safe wrapper has.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bed;
pub mod cgroup;
pub mod netns;
pub mod rawtcp;
pub mod sys;

/// Whether the test runs as root; end-to-end tests skip otherwise.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Returns early from a test, with a message, when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("SKIP {}: needs root (network namespaces, AF_PACKET)", module_path!());
            return;
        }
    };
}

/// Serialises tests that attach the kernel helper: it lives at one global
/// place (/sys/fs/bpf/toa), and nextest runs test binaries in parallel.
/// Hold the returned lock for the whole test.
pub fn helper_lock() -> nix::fcntl::Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/toa-helper-test.lock")
        .expect("open /run/toa-helper-test.lock");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).expect("flock")
}
