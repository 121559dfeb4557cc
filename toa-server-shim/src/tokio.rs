//! The tokio listener (feature `tokio`), and with feature `axum` its
//! `axum::serve::Listener` implementation.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::listener::{Config, Shared};
use crate::peer::{PeerInfo, StatsSnapshot};
use crate::proxy::{self, ProxyError, ProxyHeader, ProxyProtocol, Step};

/// Connections whose PROXY header is being read at once; more wait to be accepted.
const MAX_PENDING: usize = 4096;

/// A tokio TCP listener whose `accept()` returns the original client.
///
/// With [`Config::proxy_protocol`] on, every connection's header is read in a
/// task of its own (bounded in size and time), so a peer that sends half a
/// header delays nobody else; refused connections are closed and counted
/// ([`ToaListener::stats`]) and never returned.
///
/// ```no_run
/// use toa_server_shim::tokio::ToaListener;
/// use toa_server_shim::{Config, TrustPolicy};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = TrustPolicy::new("huawei-elb".parse()?)?;
/// let listener = ToaListener::bind("0.0.0.0:8080", Config::new(policy)).await?;
/// loop {
///     let (stream, peer) = listener.accept().await?;
///     tokio::spawn(async move { println!("{peer}"); drop(stream) });
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct ToaListener {
    inner: Arc<TcpListener>,
    shared: Arc<Shared>,
    /// With the PROXY protocol: connections whose header was read.
    ready: Option<Mutex<Ready>>,
}

type Accepted = io::Result<(TcpStream, PeerInfo)>;

#[derive(Debug)]
struct Ready {
    rx: mpsc::Receiver<Accepted>,
    tx: Option<mpsc::Sender<Accepted>>,
    task: Option<JoinHandle<()>>,
}

impl ToaListener {
    /// Binds `addr` and prepares the socket for `config`.
    pub async fn bind(addr: impl ToSocketAddrs, config: Config) -> io::Result<Self> {
        Self::from_tokio(TcpListener::bind(addr).await?, config)
    }

    /// Wraps a tokio listener; see [`crate::ToaListener::from_std`].
    pub fn from_tokio(listener: TcpListener, config: Config) -> io::Result<Self> {
        let shared = Shared::new(listener.as_fd(), listener.local_addr()?, config)?;
        let ready = (shared.proxy != ProxyProtocol::Off).then(|| {
            let (tx, rx) = mpsc::channel(64);
            Mutex::new(Ready { rx, tx: Some(tx), task: None })
        });
        Ok(Self { inner: Arc::new(listener), shared, ready })
    }

    /// Accepts a connection and tells who is behind it.
    pub async fn accept(&self) -> io::Result<(TcpStream, PeerInfo)> {
        let Some(ready) = &self.ready else {
            let (stream, peer) = self.inner.accept().await?;
            let info = self.shared.peer_info(stream.as_fd(), peer, || stream.local_addr().ok());
            return Ok((stream, info));
        };
        let mut ready = ready.lock().await;
        if let Some(tx) = ready.tx.take() {
            // Started here, inside the runtime, on the first accept.
            ready.task = Some(tokio::spawn(acceptor(self.inner.clone(), self.shared.clone(), tx)));
        }
        ready.rx.recv().await.unwrap_or_else(|| Err(io::Error::other("the accept task ended")))
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats()
    }
}

impl Drop for ToaListener {
    fn drop(&mut self) {
        if let Some(task) = self.ready.as_mut().and_then(|r| r.get_mut().task.take()) {
            task.abort();
        }
    }
}

/// Accepts connections and reads each one's PROXY header in a task of its own.
async fn acceptor(listener: Arc<TcpListener>, shared: Arc<Shared>, tx: mpsc::Sender<Accepted>) {
    let limit = Arc::new(Semaphore::new(MAX_PENDING));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((mut stream, peer)) => {
                let info = shared.peer_info(stream.as_fd(), peer, || stream.local_addr().ok());
                let (shared, tx) = (shared.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let read = read_proxy_header(&mut stream, &shared, &info).await;
                    // A refused connection is counted there and closed here.
                    if let Ok(info) = shared.with_proxy(info, read) {
                        let _ = tx.send(Ok((stream, info))).await;
                    }
                });
            }
            Err(e) => {
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads the PROXY header at the start of `stream`, consuming exactly it.
async fn read_proxy_header(
    stream: &mut TcpStream,
    shared: &Shared,
    info: &PeerInfo,
) -> Result<Option<ProxyHeader>, ProxyError> {
    let peer = info.lb;
    let trusted = shared.trusts(info);
    let work = async {
        let mut buf = vec![0u8; proxy::MAX_HEADER];
        let mut last = usize::MAX;
        loop {
            let seen = if shared.proxy == ProxyProtocol::Required && !trusted {
                0
            } else {
                stream.peek(&mut buf).await.map_err(|e| ProxyError::Io(peer, e))?
            };
            match proxy::step(shared.proxy, trusted, peer, &buf[..seen], seen == 0) {
                Step::Absent => return Ok(None),
                Step::Refuse(e) => return Err(e),
                Step::Consume(len) => {
                    stream.read_exact(&mut buf[..len]).await.map_err(|e| ProxyError::Io(peer, e))?;
                    return proxy::parse(&buf[..len])
                        .map(Some)
                        .map_err(|why| ProxyError::Malformed(peer, why));
                }
                // As the std listener: a peek returns at once while data is queued.
                Step::Wait => {
                    if seen == last {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    last = seen;
                }
            }
        }
    };
    tokio::time::timeout(shared.proxy_timeout, work)
        .await
        .unwrap_or(Err(ProxyError::Timeout(peer, shared.proxy_timeout)))
}

#[cfg(feature = "axum")]
mod axum_listener {
    use std::io;
    use std::time::Duration;

    use axum::extract::connect_info::Connected;
    use axum::serve::{IncomingStream, Listener};
    use tokio::net::TcpStream;

    use super::ToaListener;
    use crate::peer::PeerInfo;

    /// `axum::serve(listener, app.into_make_service_with_connect_info::<PeerInfo>())`
    /// hands every handler the [`PeerInfo`] through `ConnectInfo`.
    impl Listener for ToaListener {
        type Io = TcpStream;
        type Addr = PeerInfo;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                match ToaListener::accept(self).await {
                    Ok(accepted) => return accepted,
                    // As axum's own TcpListener: errors of one connection are skipped,
                    // others (e.g. out of file descriptors) are waited out.
                    Err(e) if is_connection_error(&e) => continue,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }

        /// The local address, as a [`PeerInfo`] whose client and LB are both local.
        fn local_addr(&self) -> io::Result<Self::Addr> {
            ToaListener::local_addr(self).map(PeerInfo::direct)
        }
    }

    impl Connected<IncomingStream<'_, ToaListener>> for PeerInfo {
        fn connect_info(stream: IncomingStream<'_, ToaListener>) -> Self {
            stream.remote_addr().clone()
        }
    }

    fn is_connection_error(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
        )
    }
}
