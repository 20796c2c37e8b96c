//! Admission of TCP connections, the same on both ports (HTTP and gRPC): at most
//! [`Limits::max_connections`] open per port, a deadline for a connection's first bytes and for
//! any silence after them (reads and writes alike: a client that neither sends nor reads its
//! answer is closed), and an accept loop that waits after an error (out of descriptors) instead
//! of spinning. A port at its most makes room for a new connection by closing the oldest one that
//! has sent nothing yet, else the one silent longest for at least `first_bytes`; only when every
//! connection is active is the new one closed at once. So idle or silent sockets, however many,
//! never lock the health checks out, and the process never runs out of file descriptors.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
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
    evicted: prometheus_client::metrics::counter::Counter,
    live: Arc<Mutex<Live>>,
    epoch: Instant,
}

/// The port's open connections, for choosing one to close.
#[derive(Debug, Default)]
struct Live {
    next: u64,
    slots: HashMap<u64, Arc<Slot>>,
}

/// What a connection shares with its port.
#[derive(Debug)]
struct Slot {
    /// Milliseconds since the port's epoch: the connection's start, then its last byte read or
    /// written once the client has spoken.
    last_ms: AtomicU64,
    spoken: AtomicBool,
    /// Set when the port closes the connection for a newer one (its permit taken away).
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Admission {
    /// `refused` counts the connections closed at once because every open one was active,
    /// `evicted` those closed to make room (`Metrics::connections_closed`).
    pub fn new(
        port: &'static str,
        limits: Limits,
        refused: prometheus_client::metrics::counter::Counter,
        evicted: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            limits,
            open: Arc::new(Semaphore::new(limits.max_connections)),
            port,
            refused,
            evicted,
            live: Arc::default(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The accepted `stream` with its permit, or `None` (and the stream dropped, which closes it)
    /// when the port has its most connections and none of them may be closed for it.
    pub fn admit(&self, stream: TcpStream) -> Option<Guarded<TcpStream>> {
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match self.evict() {
                Some(p) => p,
                None => {
                    // Logged at the 1st, 2nd, 4th, 8th, ... refusal: a flood of connections must
                    // not become a flood of log lines.
                    let before = self.refused.inc();
                    if (before + 1).is_power_of_two() {
                        tracing::warn!(
                            "{} port: {} connections open and active, the most allowed (--max-connections): \
                             closing new ones ({} so far)",
                            self.port,
                            self.limits.max_connections,
                            before + 1
                        );
                    }
                    return None;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let slot = Arc::new(Slot {
            last_ms: AtomicU64::new(self.now_ms()),
            spoken: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
            permit: Mutex::new(Some(permit)),
        });
        let id = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.next += 1;
            let id = live.next;
            live.slots.insert(id, slot.clone());
            id
        };
        Some(Guarded::new(stream, self.clone(), id, slot))
    }

    /// Takes the permit of the connection to close for a new one: the oldest that has sent
    /// nothing, else the one silent longest, if for at least `first_bytes`; wakes it to close.
    fn evict(&self) -> Option<OwnedSemaphorePermit> {
        let now = self.now_ms();
        let patience = self.limits.first_bytes.as_millis() as u64;
        let victim = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.slots
                .values()
                .filter(|s| !s.evicted.load(Ordering::Relaxed))
                .map(|s| (s.spoken.load(Ordering::Relaxed), s.last_ms.load(Ordering::Relaxed), s))
                .filter(|(spoken, last, _)| !spoken || now.saturating_sub(*last) >= patience)
                .min_by_key(|(spoken, last, _)| (*spoken, *last))
                .map(|(_, _, s)| s.clone())
        }?;
        let permit = victim.permit.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        victim.evicted.store(true, Ordering::Release);
        if let Some(w) = victim.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
        let before = self.evicted.inc();
        if (before + 1).is_power_of_two() {
            tracing::warn!(
                "{} port: {} connections open (--max-connections): closing idle ones for new ones ({} so far)",
                self.port,
                self.limits.max_connections,
                before + 1
            );
        }
        Some(permit)
    }

    /// Connections open now (those closed for newer ones no longer count).
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

/// A connection under its port's [`Limits`]: it holds the port's permit until dropped (or until
/// the port closes it for a newer one), and fails a read or a write (`TimedOut`) that waits past
/// its deadline, which makes hyper close it.
pub struct Guarded<T> {
    io: T,
    admission: Admission,
    id: u64,
    slot: Arc<Slot>,
    timer: Pin<Box<Sleep>>,
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        self.admission.live.lock().unwrap_or_else(|e| e.into_inner()).slots.remove(&self.id);
    }
}

impl<T> Guarded<T> {
    fn new(io: T, admission: Admission, id: u64, slot: Arc<Slot>) -> Self {
        let timer = Box::pin(tokio::time::sleep(admission.limits.first_bytes));
        Self { io, admission, id, slot, timer }
    }

    fn due(&self) -> Instant {
        let l = &self.admission.limits;
        let after = if self.slot.spoken.load(Ordering::Relaxed) { l.idle } else { l.first_bytes };
        self.admission.epoch + Duration::from_millis(self.slot.last_ms.load(Ordering::Relaxed)) + after
    }

    fn active(&self) {
        self.slot.last_ms.store(self.admission.now_ms(), Ordering::Relaxed);
    }

    /// Called when the stream has nothing to give or take: `Err` once the deadline has passed or
    /// the port has closed the connection, else the timer is armed to wake this task at the
    /// deadline (and the port can wake it to close it).
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.slot.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed for a newer one: the port had --max-connections open",
            ));
        }
        {
            let mut w = self.slot.waker.lock().unwrap_or_else(|e| e.into_inner());
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let due = self.due();
            if due <= Instant::now() {
                let l = &self.admission.limits;
                let (what, after) = if self.slot.spoken.load(Ordering::Relaxed) {
                    ("idle", l.idle)
                } else {
                    ("silent since it opened", l.first_bytes)
                };
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
        if this.slot.evicted.load(Ordering::Acquire) {
            return Poll::Ready(this.check(cx));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.active();
                    this.slot.spoken.store(true, Ordering::Relaxed);
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
        if self.slot.evicted.load(Ordering::Acquire) {
            return Poll::Ready(self.check(cx).map(|()| 0));
        }
        match r {
            Poll::Ready(Ok(n)) => {
                // Before the client has spoken, the server's own bytes (HTTP/2 settings) do not
                // count: a silent client is closed after `first_bytes` whatever was sent to it.
                if n > 0 && self.slot.spoken.load(Ordering::Relaxed) {
                    self.active();
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

    async fn read_ends(c: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 8];
        matches!(tokio::time::timeout(within, c.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    /// An echo server on `listener` under `admission`: what the guard lets through comes back.
    fn echo_server(listener: TcpListener, admission: Admission) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let mut g = accept(&listener, &admission).await;
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
    }

    async fn echo(c: &mut TcpStream) {
        c.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn a_full_port_closes_silent_then_idle_connections_for_new_ones_and_refuses_past_active_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new("test", limits(2), Default::default(), Default::default());
        let server = echo_server(listener, admission.clone());
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        let mut a = TcpStream::connect(addr).await.unwrap();
        echo(&mut a).await;
        let mut b = TcpStream::connect(addr).await.unwrap();
        settle().await;
        assert_eq!(admission.open(), 2);
        // A third: the port closes the one that has sent nothing (b) for it.
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(read_ends(&mut b, Duration::from_millis(150)).await, "b closed for c at once");
        echo(&mut c).await;
        echo(&mut a).await;
        // Both open ones active within `first_bytes`: a fourth is closed at once.
        let mut d = TcpStream::connect(addr).await.unwrap();
        assert!(read_ends(&mut d, Duration::from_millis(150)).await, "d refused");
        echo(&mut a).await;
        echo(&mut c).await;
        assert_eq!(admission.refused.get(), 1);
        assert_eq!(admission.evicted.get(), 1);
        // c falls silent past `first_bytes` while a keeps speaking: a fifth takes c's place.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            echo(&mut a).await;
        }
        let mut e = TcpStream::connect(addr).await.unwrap();
        assert!(read_ends(&mut c, Duration::from_millis(150)).await, "c closed for e");
        echo(&mut e).await;
        echo(&mut a).await;
        server.abort();
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_after_their_deadlines() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new("test", limits(2), Default::default(), Default::default());
        let server = echo_server(listener, admission.clone());
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(admission.open(), 2);
        let mut buf = [0u8; 8];
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
