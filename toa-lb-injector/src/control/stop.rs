//! A run's stop: set once (a signal, an interface gone, the datapath's
//! end), seen by every thread of the run, which waits on it instead of
//! napping and looking. An idle `toa-lb` wakes only for work it has to do:
//! on the 2-core test VM, one thread waking 60 times a second beside the
//! kernel's own FULLNAT took about 5% of a bulk stream's throughput (the
//! first kernel datapath had its threads nap 50-100 ms between looks).

use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// The stop of a run; clones share it.
#[derive(Clone, Debug)]
pub struct Stop(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    set: AtomicBool,
    /// Readable once the stop is set (a byte is written to `tx` and never
    /// read): what the waits poll.
    rx: UnixStream,
    tx: UnixStream,
}

impl Stop {
    /// A stop not set.
    pub fn new() -> std::io::Result<Self> {
        let (rx, tx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        Ok(Stop(Arc::new(Inner { set: AtomicBool::new(false), rx, tx })))
    }

    /// Sets it and wakes every thread waiting on it.
    pub fn set(&self) {
        self.0.set.store(true, Ordering::SeqCst);
        // A second set finds the byte there already (or a full buffer): fine.
        let _ = (&self.0.tx).write(&[1]);
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::SeqCst)
    }

    /// Waits `time`, or less once the stop is set; returns whether it is.
    pub fn sleep(&self, time: Duration) -> bool {
        let until = Instant::now() + time;
        while !self.is_set() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Whole milliseconds, rounded up (else the last one would spin),
            // an hour at most. An interrupted poll looks again.
            let ms = u32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u32::MAX).min(3_600_000);
            let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            let _ = nix::poll::poll(&mut [PollFd::new(self.0.rx.as_fd(), PollFlags::POLLIN)], timeout);
        }
        self.is_set()
    }

    /// Waits until the stop is set.
    pub fn wait(&self) {
        while !self.sleep(Duration::from_secs(3600)) {}
    }

    /// Waits until `fd` is readable (a listener has a connection to accept)
    /// or the stop is set; returns `false` once it is set.
    pub fn readable(&self, fd: BorrowedFd<'_>) -> bool {
        while !self.is_set() {
            let mut fds =
                [PollFd::new(fd, PollFlags::POLLIN), PollFd::new(self.0.rx.as_fd(), PollFlags::POLLIN)];
            if nix::poll::poll(&mut fds, PollTimeout::NONE).is_ok()
                && fds[0].revents().is_some_and(|r| !r.is_empty())
            {
                return !self.is_set();
            }
        }
        false
    }

    /// Runs `accept` each time `listener` is readable, handing what it
    /// accepts to `serve`, until the stop is set. `listener` must be
    /// non-blocking. After an error other than "nothing to accept" (out of
    /// file descriptors, say) it waits 50 ms: the listener stays readable,
    /// and looking again at once would spin.
    pub fn accept_loop<L: AsFd, S>(
        &self,
        listener: &L,
        mut accept: impl FnMut(&L) -> std::io::Result<S>,
        mut serve: impl FnMut(S),
    ) {
        while self.readable(listener.as_fd()) {
            match accept(listener) {
                Ok(stream) => serve(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn sleep_runs_its_time_unless_stopped() {
        let stop = Stop::new().unwrap();
        let start = Instant::now();
        assert!(!stop.sleep(Duration::from_millis(30)));
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(!stop.is_set());
    }

    #[test]
    fn a_set_wakes_every_waiter_at_once() {
        let stop = Stop::new().unwrap();
        let start = Instant::now();
        let sleepers: Vec<_> = (0..3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || stop.sleep(Duration::from_secs(60)))
            })
            .collect();
        let waiter = {
            let stop = stop.clone();
            std::thread::spawn(move || stop.wait())
        };
        std::thread::sleep(Duration::from_millis(20));
        stop.set();
        stop.set(); // twice is fine
        for s in sleepers {
            assert!(s.join().unwrap());
        }
        waiter.join().unwrap();
        // Not the 60 s they were asked to sleep (no timing bound: the machine is shared).
        assert!(start.elapsed() < Duration::from_secs(30));
        // Once set, it stays set: later sleeps end at once.
        assert!(stop.sleep(Duration::from_secs(60)));
    }

    #[test]
    fn the_accept_loop_serves_connections_and_ends_at_the_stop() {
        let dir = std::env::temp_dir().join(format!("toa-lb-stop-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Stop::new().unwrap();
        let (served_tx, served_rx) = std::sync::mpsc::channel();
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                stop.accept_loop(&listener, UnixListener::accept, |(stream, _)| {
                    served_tx.send(stream.peer_addr().is_ok()).unwrap();
                });
            })
        };
        for _ in 0..3 {
            let _client = UnixStream::connect(&dir).unwrap();
            assert!(served_rx.recv().unwrap());
        }
        stop.set();
        server.join().unwrap();
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn readable_says_false_once_stopped_even_with_a_connection_waiting() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"x").unwrap();
        let stop = Stop::new().unwrap();
        assert!(stop.readable(a.as_fd()));
        stop.set();
        assert!(!stop.readable(a.as_fd()));
    }
}
