//! Kernel pacing of the pacer's own connections.
//!
//! Request-level pacing decides *when* a request leaves; it does not decide how fast its bytes
//! do. A 100 KB prompt written to a fresh socket leaves at line rate and sits in the bottleneck's
//! queue as a burst — every neighbour's RTT jumps by the burst's drain time. Each socket this
//! connector opens is registered, and [`SocketPacing::set_rate`] sets `SO_MAX_PACING_RATE` on all
//! of them (and on every later one), so a long prompt leaves as a paced stream: TCP's internal
//! pacing (or the fq qdisc where one is installed) spreads it at the allowed rate.
//!
//! The registry holds raw descriptors only while their [`PacedStream`] lives: a stream
//! deregisters under the same lock before its socket closes, so `setsockopt` never reaches a
//! descriptor that was closed and reused.

use std::{
    collections::BTreeSet,
    future::Future,
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use hyper::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use tokio::net::TcpStream;

/// Requests whose body is on its way to a backend — sent, the response's head not yet back (the
/// backend answers a stream's head once it has read the request) — which share the allowed byte
/// rate between their sockets.
#[derive(Default)]
pub struct Uploads {
    n: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Uploads {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn count(&self) -> usize {
        self.n.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One upload starts; it ends when the guard drops.
    pub fn start(&self) -> Upload<'_> {
        self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_one();
        Upload(self)
    }

    /// Resolves after the count changed (at once if it changed since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// An upload in progress (see [`Uploads::start`]).
pub struct Upload<'a>(&'a Uploads);

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.changed.notify_one();
    }
}

/// The kernel's "no cap" value for `SO_MAX_PACING_RATE`.
const UNLIMITED: u64 = u64::MAX;

#[derive(Default)]
struct State {
    /// Bytes per second; `None` or [`UNLIMITED`]: no cap.
    rate: Option<u64>,
    fds: BTreeSet<RawFd>,
}

/// The pacer's open sockets and the byte rate each may send at.
#[derive(Default)]
pub struct SocketPacing {
    state: Mutex<State>,
}

impl SocketPacing {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Caps every open socket, and every later one, at `bytes_per_s` (`None`: no cap). Returns
    /// how many sockets were updated.
    pub fn set_rate(&self, bytes_per_s: Option<u64>) -> usize {
        let mut st = self.lock();
        if st.rate == bytes_per_s {
            return 0;
        }
        st.rate = bytes_per_s;
        let rate = bytes_per_s.unwrap_or(UNLIMITED).max(1);
        let mut n = 0;
        for &fd in &st.fds {
            match set_max_pacing_rate(fd, rate) {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!("SO_MAX_PACING_RATE on fd {fd}: {e}"),
            }
        }
        n
    }

    pub fn rate(&self) -> Option<u64> {
        self.lock().rate
    }

    /// Open sockets it paces.
    pub fn sockets(&self) -> usize {
        self.lock().fds.len()
    }

    fn register(&self, fd: RawFd) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(rate) = st.rate {
            set_max_pacing_rate(fd, rate.max(1))?;
        }
        st.fds.insert(fd);
        Ok(())
    }

    fn deregister(&self, fd: RawFd) {
        self.lock().fds.remove(&fd);
    }
}

/// `setsockopt(SOL_SOCKET, SO_MAX_PACING_RATE)` in bytes per second.
pub fn set_max_pacing_rate(fd: RawFd, bytes_per_s: u64) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by a live `PacedStream` (the registry's invariant) or
    // by the caller; the option value is a u64 the kernel reads `size_of::<u64>()` bytes of.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&raw const bytes_per_s).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's current `SO_MAX_PACING_RATE` of `fd` (for tests and diagnostics).
pub fn max_pacing_rate(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` and `len` outlive the call; the kernel writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A hyper connector whose sockets [`SocketPacing`] caps.
#[derive(Clone)]
pub struct PacedConnector {
    pacing: Arc<SocketPacing>,
}

impl PacedConnector {
    pub fn new(pacing: Arc<SocketPacing>) -> Self {
        Self { pacing }
    }
}

impl tower_service::Service<Uri> for PacedConnector {
    type Response = PacedStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PacedStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let pacing = self.pacing.clone();
        Box::pin(async move {
            if uri.scheme_str().is_some_and(|s| s != "http") {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{uri}: only http:// targets are supported"),
                ));
            }
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL without a host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        let fd = s.as_raw_fd();
                        pacing.register(fd)?;
                        return Ok(PacedStream {
                            io: TokioIo::new(s),
                            fd,
                            pacing,
                        });
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"))
            }))
        })
    }
}

/// A connection registered with [`SocketPacing`] for as long as it is open.
pub struct PacedStream {
    io: TokioIo<TcpStream>,
    fd: RawFd,
    pacing: Arc<SocketPacing>,
}

impl Drop for PacedStream {
    fn drop(&mut self) {
        // Before `io` (and with it the descriptor) is dropped: fields drop after this body.
        self.pacing.deregister(self.fd);
    }
}

impl Connection for PacedStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for PacedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PacedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// The HTTP client the pacer sends prompts with.
pub type HttpClient =
    hyper_util::client::legacy::Client<PacedConnector, http_body_util::Full<bytes::Bytes>>;

pub fn http_client(pacing: Arc<SocketPacing>) -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(PacedConnector::new(pacing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_get_the_cap_before_and_after_they_open() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let pacing = SocketPacing::new();
        pacing.set_rate(Some(250_000));
        let mut conn = PacedConnector::new(pacing.clone());
        let uri: Uri = format!("http://{addr}").parse()?;
        let a = tower_service::Service::call(&mut conn, uri.clone()).await?;
        assert_eq!(max_pacing_rate(a.fd)?, 250_000, "cap set at connect");
        let b = tower_service::Service::call(&mut conn, uri).await?;
        assert_eq!(pacing.sockets(), 2);
        assert_eq!(
            pacing.set_rate(Some(1_000_000)),
            2,
            "both open sockets updated"
        );
        assert_eq!(max_pacing_rate(a.fd)?, 1_000_000);
        assert_eq!(max_pacing_rate(b.fd)?, 1_000_000);
        drop(a);
        assert_eq!(pacing.sockets(), 1, "a closed socket leaves the registry");
        pacing.set_rate(None);
        assert_eq!(max_pacing_rate(b.fd)?, u64::MAX, "no cap");
        Ok(())
    }
}
