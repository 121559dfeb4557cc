//! The tokio listener (feature `tokio`), and with feature `axum` its
//! `axum::serve::Listener` implementation.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use crate::listener::{Config, Shared};
use crate::peer::{PeerInfo, StatsSnapshot};

/// A tokio TCP listener whose `accept()` returns the original client.
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
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl ToaListener {
    /// Binds `addr` and prepares the socket for `config`.
    pub async fn bind(addr: impl ToSocketAddrs, config: Config) -> io::Result<Self> {
        Self::from_tokio(TcpListener::bind(addr).await?, config)
    }

    /// Wraps a tokio listener; see [`crate::ToaListener::from_std`].
    pub fn from_tokio(listener: TcpListener, config: Config) -> io::Result<Self> {
        let shared = Shared::new(listener.as_fd(), listener.local_addr()?, config)?;
        Ok(Self { inner: listener, shared })
    }

    /// Accepts a connection and tells who is behind it.
    pub async fn accept(&self) -> io::Result<(TcpStream, PeerInfo)> {
        let (stream, peer) = self.inner.accept().await?;
        let info = self.shared.peer_info(stream.as_fd(), peer);
        Ok((stream, info))
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
            *stream.remote_addr()
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
