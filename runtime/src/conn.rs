//! Admission of TCP connections, the same on both ports (HTTP and gRPC): at most
//! [`Limits::max_connections`] open per port (one more is accepted and closed at once, so the
//! process never runs out of file descriptors and one port's clients cannot lock the other's
//! out), a deadline for a connection's first bytes and for any silence after them (reads and
//! writes alike: a client that neither sends nor reads its answer is closed), and an accept loop
//! that waits after an error (out of descriptors) instead of spinning.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// What a port admits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once on the port.
    pub max_connections: usize,
    /// Longest a new connection may stay silent before its first bytes (the HTTP/1 request line,
    /// the HTTP/2 preface, the TLS ClientHello).
    pub first_bytes: Duration,
    /// Longest a connection may go with nothing read and nothing written, once it has spoken:
    /// longer than a request may take (`--request-timeout-s`), so that only a client that has
    /// stopped reading or sending is closed.
    pub idle: Duration,
}

/// The connections a port admits: a permit each, held by the connection's [`Guarded`] stream.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    open: Arc<Semaphore>,
    port: &'static str,
    refused: prometheus_client::metrics::counter::Counter,
}

impl Admission {
    /// `refused` counts the connections closed for the cap (`Metrics::connections_refused`).
    pub fn new(port: &'static str, limits: Limits, refused: prometheus_client::metrics::counter::Counter) -> Self {
        Self { limits, open: Arc::new(Semaphore::new(limits.max_connections)), port, refused }
    }

    /// The accepted `stream` with its permit, or `None` (and the stream dropped, which closes it)
    /// when the port already has its most connections.
    pub fn admit(&self, stream: TcpStream) -> Option<Guarded<TcpStream>> {
        let Ok(permit) = self.open.clone().try_acquire_owned() else {
            // Logged at the 1st, 2nd, 4th, 8th, ... refusal: a flood of connections must not
            // become a flood of log lines.
            let before = self.refused.inc();
            if (before + 1).is_power_of_two() {
                tracing::warn!(
                    "{} port: {} connections open, the most allowed (--max-connections): closing new ones \
                     ({} so far)",
                    self.port,
                    self.limits.max_connections,
                    before + 1
                );
            }
            return None;
        };
        let _ = stream.set_nodelay(true);
        Some(Guarded::new(stream, permit, self.limits))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.open.available_permits()
    }
}

/// Accepts the next connection the port admits; an accept error (out of file descriptors, a
/// connection reset before it was accepted) is logged and waited out for 50 ms.
pub async fn accept(listener: &TcpListener, admission: &Admission) -> Guarded<TcpStream> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Some(g) = admission.admit(stream) {
                    return g;
                }
            }
            Err(e) => {
                tracing::warn!("{} port: accepting a connection: {e}", admission.port);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// [`accept`] as a stream, for tonic's `serve_with_incoming`; it never yields an error (tonic
/// would retry an accept error at once, spinning while descriptors are out).
pub struct Incoming {
    listener: TcpListener,
    admission: Admission,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, admission: Admission) -> Self {
        Self { listener, admission, backoff: None }
    }
}

impl futures_core::Stream for Incoming {
    type Item = Result<Guarded<TcpStream>, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(wait) = this.backoff.as_mut() {
                ready!(wait.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    if let Some(g) = this.admission.admit(stream) {
                        return Poll::Ready(Some(Ok(g)));
                    }
                }
                Err(e) => {
                    tracing::warn!("{} port: accepting a connection: {e}", this.admission.port);
                    this.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                }
            }
        }
    }
}

/// A connection under its port's [`Limits`]: it holds the port's permit until dropped, and fails
/// a read or a write (`TimedOut`) that waits past its deadline, which makes hyper close it.
pub struct Guarded<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
    limits: Limits,
    /// The last byte read or written (the connection's start until its first bytes arrive).
    last: Instant,
    spoken: bool,
    timer: Pin<Box<Sleep>>,
}

impl<T> Guarded<T> {
    fn new(io: T, permit: OwnedSemaphorePermit, limits: Limits) -> Self {
        let last = Instant::now();
        Self {
            io,
            _permit: permit,
            limits,
            last,
            spoken: false,
            timer: Box::pin(tokio::time::sleep_until(last + limits.first_bytes)),
        }
    }

    fn due(&self) -> Instant {
        self.last + if self.spoken { self.limits.idle } else { self.limits.first_bytes }
    }

    /// Called when the stream has nothing to give or take: `Err` once the deadline has passed,
    /// else the timer is armed to wake this task at the deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let due = self.due();
            if due <= Instant::now() {
                let what = if self.spoken { "idle" } else { "silent since it opened" };
                let after = if self.spoken { self.limits.idle } else { self.limits.first_bytes };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection {what} for {after:?}: closed"),
                ));
            }
            // Activity since the timer was set: wait for the new deadline (the loop polls the
            // reset timer, which registers the wake-up).
            self.timer.as_mut().reset(due);
        }
    }
}

#[cfg(unix)]
impl<T: std::os::fd::AsRawFd> std::os::fd::AsRawFd for Guarded<T> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.io.as_raw_fd()
    }
}

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                    this.spoken = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            ready => ready,
        }
    }
}

impl<T: AsyncWrite + Unpin> Guarded<T> {
    fn wrote(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                // Before the client has spoken, the server's own bytes (HTTP/2 settings) do not
                // count: a silent client is closed after `first_bytes` whatever was sent to it.
                if n > 0 && self.spoken {
                    self.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            ready => ready,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files to the hard one (where the hard one allows) and returns
/// the limit now in force; `None` where it cannot be read.
pub fn raise_file_limit() -> Option<u64> {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return None;
        }
        if l.rlim_cur < l.rlim_max {
            let want = libc::rlimit { rlim_cur: l.rlim_max, rlim_max: l.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(l.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// The most connections each of `ports` ports may hold under a descriptor limit of `files`:
/// `asked`, or less where the limit, less `reserve` descriptors for everything else (the model
/// file, ONNX Runtime, logs, the listening sockets), would not hold them all.
pub fn connections_per_port(asked: usize, files: Option<u64>, ports: usize, reserve: u64) -> usize {
    match files {
        Some(f) => asked.min((f.saturating_sub(reserve) / ports.max(1) as u64).max(1) as usize),
        None => asked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max: usize) -> Limits {
        Limits { max_connections: max, first_bytes: Duration::from_millis(200), idle: Duration::from_millis(400) }
    }

    #[test]
    fn connections_per_port_stays_below_the_descriptor_limit() {
        assert_eq!(connections_per_port(512, Some(1024), 2, 128), 448);
        assert_eq!(connections_per_port(512, Some(1 << 20), 2, 128), 512);
        assert_eq!(connections_per_port(512, None, 2, 128), 512);
        assert_eq!(connections_per_port(512, Some(100), 2, 128), 1);
    }

    #[tokio::test]
    async fn the_port_closes_connections_past_its_most_and_the_silent_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new("test", limits(2), Default::default());
        let server = {
            let admission = admission.clone();
            tokio::spawn(async move {
                loop {
                    let mut g = accept(&listener, &admission).await;
                    // An echo server: what the guard lets through comes back.
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        loop {
                            match g.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if g.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            })
        };
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(admission.open(), 2);
        // A third is accepted and closed: its read ends at once.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // One that speaks keeps its connection past the first-bytes deadline while it speaks.
        for _ in 0..4 {
            a.write_all(b"hi").await.unwrap();
            let mut got = [0u8; 2];
            a.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hi");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // The silent one was closed after its first-bytes deadline, which freed its permit.
        let n = tokio::time::timeout(Duration::from_secs(2), b.read(&mut buf)).await.expect("closed after 200 ms");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // And one that falls idle after speaking is closed after the idle deadline.
        let n = tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf)).await.expect("closed after 400 ms idle");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(admission.open(), 0);
        server.abort();
    }
}
