//! A small HTTP/1 server loop shared by every server the host runs (the
//! store, the signer, the dev stack's emulator): bind, serve connections,
//! stop gracefully, and keep slow or idle clients from holding the server.
//!
//! Every connection is watched: a request's head must arrive within
//! [`ServeLimits::header_read_timeout`] of the connection opening (or of its
//! first byte, for later requests on a kept-alive connection), a kept-alive
//! connection with no request in flight is closed after
//! [`ServeLimits::idle_timeout`], and connections are counted per client IP
//! and in total. A connection over the count of its IP is answered `503` with
//! a JSON `{code, message}` and closed before any of its bytes are read.
//!
//! When the table is full, a new connection does not lose to connections
//! that sent nothing: the one that has waited longest for a request head
//! (else the longest idle kept-alive one) is closed to make room, as nginx
//! and HAProxy do under pressure, and only a table of connections that all
//! have a request in flight refuses the newcomer. While the table is over
//! three quarters full, request heads get a quarter of
//! [`ServeLimits::header_read_timeout`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long open connections get to finish when a server stops.
pub const GRACE: Duration = Duration::from_secs(5);

/// What a server tolerates from its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time for a request's head (request line and headers) to arrive, counted
    /// from the connection opening for the first request and from the first
    /// byte for later ones. Slow or half-sent heads are cut off after it.
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Time a handler that buffers a whole request body (the signer) allows
    /// for it, before the request takes any scarce resource.
    pub body_read_timeout: Duration,
    /// Open connections allowed from one client IP address. Behind a proxy or
    /// on loopback every client shares one address: size it for that.
    pub max_connections_per_ip: usize,
    /// Open connections allowed in total.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(10),
            max_connections_per_ip: 256,
            max_connections: 1024,
        }
    }
}

/// A running server. Dropping it stops the server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    counts: Arc<ConnectionCounts>,
}

impl Server {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections open right now (accepted and not yet closed).
    pub fn open_connections(&self) -> usize {
        self.counts.total.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets open connections finish (up to [`GRACE`]), and waits.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Open connections, per client IP and in total.
#[derive(Debug, Default)]
struct ConnectionCounts {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    /// The server's total.
    Total,
    /// The client address's own count.
    PerIp,
}

impl Over {
    fn reason(self) -> &'static str {
        match self {
            Over::Total => "the server has as many open connections as it allows, each with a request in flight",
            Over::PerIp => "this client address has as many open connections as the server allows",
        }
    }
}

/// One counted connection; uncounts itself on drop, or at once when it is
/// shed to make room (its socket closes when its task ends, a moment later).
struct Counted(Arc<CountedPlace>);

/// The place a connection holds in the counts, given back once.
struct CountedPlace {
    counts: Arc<ConnectionCounts>,
    ip: IpAddr,
    released: std::sync::atomic::AtomicBool,
}

impl CountedPlace {
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut per_ip = self.counts.per_ip.lock().expect("connection counts lock");
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.counts.total.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConnectionCounts {
    /// Counts a new connection from `ip`, or says which bound it would cross.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ServeLimits) -> Result<Counted, Over> {
        let mut per_ip = self.per_ip.lock().expect("connection counts lock");
        // Looked up, not inserted: a refused address leaves no entry behind.
        if per_ip.get(&ip).is_some_and(|n| *n >= limits.max_connections_per_ip) {
            return Err(Over::PerIp);
        }
        if self.total.load(Ordering::SeqCst) >= limits.max_connections {
            return Err(Over::Total);
        }
        *per_ip.entry(ip).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        Ok(Counted(Arc::new(CountedPlace {
            counts: self.clone(),
            ip,
            released: std::sync::atomic::AtomicBool::new(false),
        })))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// What the watchdog of one connection knows. Times are milliseconds since `opened`.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    /// When the last request finished (or the connection opened).
    idle_since_ms: AtomicU64,
    /// 0 while idle; else 1 + when the current request's head began.
    head_started_ms: AtomicU64,
    /// 0 unless the socket refused the last write; else 1 + when it began
    /// refusing: the client is not reading what it was sent.
    write_blocked_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        // The first request's head is due from the moment the connection opens.
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(1),
            write_blocked_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 && self.head_started_ms.load(Ordering::SeqCst) == 0 {
            self.head_started_ms.store(self.now_ms() + 1, Ordering::SeqCst);
        }
    }

    /// Notes what a write to the socket came to.
    fn on_write<T>(&self, polled: &Poll<std::io::Result<T>>) {
        match polled {
            Poll::Pending => {
                let now = self.now_ms() + 1;
                let _ = self.write_blocked_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            }
            Poll::Ready(_) => {
                if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
                    self.write_blocked_ms.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    fn request_finished(&self) {
        self.idle_since_ms.store(self.now_ms(), Ordering::SeqCst);
        self.head_started_ms.store(0, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// How long it has waited for a request head, if it is waiting for one
    /// (not for a response, not idle between requests).
    fn waiting_for_head(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match self.head_started_ms.load(Ordering::SeqCst) {
            0 => None,
            started => Some(Duration::from_millis(self.now_ms().saturating_sub(started - 1))),
        }
    }

    /// How long the client has not taken what it was sent, while a request runs.
    fn stalled_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            return None;
        }
        match self.write_blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since - 1))),
        }
    }

    /// How long it has been idle between requests, if it is.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 || self.head_started_ms.load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(Duration::from_millis(self.now_ms().saturating_sub(self.idle_since_ms.load(Ordering::SeqCst))))
    }

    /// When the connection must be closed, and why: unless a request starts
    /// (idle, or waiting for a head), or, while one runs, unless the client
    /// reads again (as nginx's `send_timeout`). A response that is slow to
    /// come is never cut: only one the client stopped taking.
    fn deadline(&self, limits: &ServeLimits) -> Option<(Instant, &'static str)> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return match self.write_blocked_ms.load(Ordering::Relaxed) {
                0 => None,
                since => Some((
                    self.opened + Duration::from_millis(since - 1) + limits.idle_timeout,
                    "the client stopped reading its answer",
                )),
            };
        }
        match self.head_started_ms.load(Ordering::SeqCst) {
            0 => {
                let idle = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
                Some((self.opened + idle + limits.idle_timeout, "idle"))
            }
            started => {
                let started = Duration::from_millis(started - 1);
                Some((self.opened + started + limits.header_read_timeout, "request head not received in time"))
            }
        }
    }
}

/// The socket, noting when bytes arrive.
struct WatchedIo {
    socket: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.socket).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.socket).poll_write(cx, buf);
        self.activity.on_write(&polled);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        self.activity.on_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }
}

/// Marks a request in flight until its response body is dropped (sent or abandoned).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.request_started();
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that keeps its request in flight while it is being sent.
pub struct WatchedBody<B> {
    inner: Pin<Box<B>>,
    _in_flight: InFlight,
}

impl<B: http_body::Body> http_body::Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The service, counting its requests in flight on one connection.
struct WatchedService<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for WatchedService<S>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
{
    type Response = http::Response<WatchedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        let has_body = !http_body::Body::is_end_stream(request.body());
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // A refusal may leave the request's body unread, and hyper then
            // closes the connection after the answer: a client that kept it
            // for its next request would send that into the close. Say so.
            if has_body && (response.status().is_client_error() || response.status().is_server_error()) {
                response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| WatchedBody { inner: Box::pin(body), _in_flight: in_flight }))
        })
    }
}

/// Logs a warning when the process may not open as many files as the
/// connection table admits: `accept` would then fail before the table is
/// full, and silent connections could not be shed to make room.
fn warn_if_files_limit_is_below(name: &str, max_connections: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    // Room for the listener, the store's files, logs and outbound calls.
    let wanted = max_connections as u64 + 64;
    if limit.rlim_cur < wanted {
        tracing::warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the {name} may hold up to {max_connections} connections but this process may open only {} files: \
             raise the limit (ulimit -n {wanted}) or lower --max-connections",
            limit.rlim_cur
        );
    }
}

/// The answer to a connection over a bound: written without waiting, then the socket is closed.
fn refusal(reason: &str) -> Vec<u8> {
    let body =
        serde_json::json!({"code": "too_many_connections", "message": format!("{reason}; retry later")}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An error a service or a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body the server loop can send.
pub trait ServeBody: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> ServeBody for B where B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// A service the server loop can run on every connection.
pub trait ServeService<B: ServeBody>:
    hyper::service::Service<
        http::Request<Incoming>,
        Response = http::Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B: ServeBody> ServeService<B> for S where
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = http::Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Binds `addr` and serves `service` on it with [`ServeLimits::default`].
pub async fn spawn<S: ServeService<B>, B: ServeBody>(
    name: &'static str,
    addr: SocketAddr,
    service: S,
) -> Result<Server> {
    spawn_with(name, addr, ServeLimits::default(), service).await
}

/// Binds `addr` and serves `service` on it, under `limits`, until the returned [`Server`] stops.
pub async fn spawn_with<S: ServeService<B>, B: ServeBody>(
    name: &'static str,
    addr: SocketAddr,
    limits: ServeLimits,
    service: S,
) -> Result<Server> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("bind the {name} to {addr}"))?;
    let addr = listener.local_addr().context("read the bound address")?;
    warn_if_files_limit_is_below(name, limits.max_connections);
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let counts = Arc::new(ConnectionCounts::default());
    let task_counts = counts.clone();
    let watched = Arc::new(Watched::default());
    // One reaper per server, off the connections' own poll path (a timer polled
    // with every connection wake-up cost a fifth of the throughput).
    let reaper = tokio::spawn(watched.clone().reap(name, limits, counts.clone()));
    let task = tokio::spawn(async move {
        let counts = task_counts;
        let builder = hyper::server::conn::http1::Builder::new();
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let admitted = match counts.admit(peer.ip(), &limits) {
                            Err(Over::Total) if watched.shed_one(name) => counts.admit(peer.ip(), &limits),
                            admitted => admitted,
                        };
                        let counted = match admitted {
                            Ok(counted) => counted,
                            Err(over) => {
                                tracing::warn!(%peer, "{name} refused a connection: {}", over.reason());
                                // Best effort: a fresh socket's send buffer takes this without blocking.
                                let _ = socket.try_write(&refusal(over.reason()));
                                continue;
                            }
                        };
                        let _ = socket.set_nodelay(true);
                        let activity = Arc::new(Activity::new());
                        let io = TokioIo::new(WatchedIo { socket, activity: activity.clone() });
                        let service = WatchedService { inner: service.clone(), activity: activity.clone() };
                        let conn = graceful.watch(builder.serve_connection(io, service));
                        let id = watched.next_id();
                        let place = counted.0.clone();
                        let task = tokio::spawn({
                            let watched = watched.clone();
                            async move {
                                let _counted = counted;
                                let _registered = Registered { watched, id };
                                if let Err(e) = conn.await {
                                    tracing::debug!(%peer, "{name} connection ended: {e}");
                                }
                            }
                        });
                        watched.register(id, Entry { activity, place, task: task.abort_handle() });
                    }
                    Err(e) => {
                        tracing::warn!("{name} accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = &mut stop_rx => break,
            }
        }
        drop(listener);
        reaper.abort();
        if tokio::time::timeout(GRACE, graceful.shutdown()).await.is_err() {
            tracing::warn!("{name}: connections still open after {GRACE:?}; closing them");
        }
        tracing::debug!("{name} on {addr} stopped");
    });
    Ok(Server { addr, stop: Some(stop_tx), task: Some(task), counts })
}

/// The open connections of one server, for the reaper.
#[derive(Default)]
struct Watched {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// One open connection, as the reaper and the shedding see it.
struct Entry {
    activity: Arc<Activity>,
    place: Arc<CountedPlace>,
    task: tokio::task::AbortHandle,
}

/// Removes its connection from [`Watched`] when the connection's task ends.
struct Registered {
    watched: Arc<Watched>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.watched.open.lock().expect("watched connections lock").remove(&self.id);
    }
}

impl Watched {
    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn register(&self, id: u64, entry: Entry) {
        if !entry.task.is_finished() {
            self.open.lock().expect("watched connections lock").insert(id, entry);
        }
    }

    /// Closes the connection that has waited longest for a request head, else
    /// the one idle longest between requests, to make room for a new one.
    /// False when every open connection has a request in flight.
    fn shed_one(&self, name: &'static str) -> bool {
        let mut open = self.open.lock().expect("watched connections lock");
        // A connection whose place is already free (its task ended as it was
        // registered; the reaper drops the entry) would free nothing.
        let holding = |entry: &&Entry| !entry.place.released.load(Ordering::SeqCst);
        let silent = open
            .iter()
            .filter(|(_, entry)| holding(entry))
            .filter_map(|(id, entry)| Some((*id, entry.activity.waiting_for_head()?)))
            // Times are whole milliseconds: of equal waits the older connection (lower id) goes.
            .max_by_key(|(id, waited)| (*waited, std::cmp::Reverse(*id)));
        // A client that has not read its answer for a second goes before one
        // that is merely idle between requests.
        let stalled = || {
            open.iter()
                .filter(|(_, entry)| holding(entry))
                .filter_map(|(id, entry)| Some((*id, entry.activity.stalled_for()?)))
                .filter(|(_, stalled)| *stalled >= Duration::from_secs(1))
                .max_by_key(|(id, stalled)| (*stalled, std::cmp::Reverse(*id)))
        };
        let idle = || {
            open.iter()
                .filter(|(_, entry)| holding(entry))
                .filter_map(|(id, entry)| Some((*id, entry.activity.idle_for()?)))
                .max_by_key(|(id, idle)| (*idle, std::cmp::Reverse(*id)))
        };
        let (victim, why) = match (silent, stalled(), idle()) {
            (Some((id, _)), _, _) => (id, "it had sent no complete request head"),
            (None, Some((id, _)), _) => (id, "its client had stopped reading its answer"),
            (None, None, Some((id, _))) => (id, "it was idle between requests"),
            (None, None, None) => return false,
        };
        if let Some(entry) = open.remove(&victim) {
            tracing::debug!("{name}: the connection table is full; closed the oldest connection because {why}");
            // Its place is free at once; its socket closes when its task ends.
            entry.place.release();
            entry.task.abort();
        }
        true
    }

    /// Every tick, closes (aborts) each connection past its deadline. Heads
    /// get a quarter of their time while the table is over 3/4 full.
    async fn reap(self: Arc<Self>, name: &'static str, limits: ServeLimits, counts: Arc<ConnectionCounts>) {
        let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 8)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pressed = ServeLimits { header_read_timeout: limits.header_read_timeout / 4, ..limits };
        loop {
            interval.tick().await;
            let now = Instant::now();
            let full = counts.total.load(Ordering::SeqCst) * 4 > limits.max_connections * 3;
            let limits = if full { &pressed } else { &limits };
            let mut open = self.open.lock().expect("watched connections lock");
            open.retain(|_, entry| match entry.activity.deadline(limits) {
                Some((deadline, why)) if deadline <= now => {
                    tracing::debug!("{name} closed a connection: {why}");
                    entry.place.release();
                    entry.task.abort();
                    false
                }
                _ => !entry.task.is_finished(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = 16 << 20;
    type TestBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

    /// `/slow`: two chunks a second apart; else `BIG` bytes, streamed, so the
    /// response stays in flight until the client takes it (a whole body at
    /// once would sit in hyper's buffer, the request done).
    async fn big_or_slow(
        request: http::Request<Incoming>,
    ) -> Result<http::Response<TestBody>, std::convert::Infallible> {
        let body: TestBody = if request.uri().path() == "/slow" {
            let chunks = futures_util::stream::unfold(0, |n| async move {
                if n == 2 {
                    return None;
                }
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let chunk = hyper::body::Frame::data(bytes::Bytes::from_static(b"chunk"));
                Some((Ok::<_, std::convert::Infallible>(chunk), n + 1))
            });
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks))
        } else {
            let chunks = futures_util::stream::iter((0..BIG >> 16).map(|_| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![b'x'; 1 << 16])))
            }));
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks))
        };
        Ok(http::Response::new(body))
    }

    /// A connection that sends two requests at once and never reads the answers.
    async fn pipeline_and_never_read(addr: SocketAddr) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        stream
    }

    /// A client that sends requests and never reads the answers is cut after
    /// the idle time with no progress; an answer that is slow to come, read
    /// as it comes, is not.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_but_a_slow_answer_is_not() {
        let service = hyper::service::service_fn(big_or_slow);
        let limits = ServeLimits { idle_timeout: Duration::from_millis(300), ..ServeLimits::default() };
        let server = spawn_with("test", "127.0.0.1:0".parse().unwrap(), limits, service).await.unwrap();
        let addr: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();

        // The slow answer arrives whole.
        let slow = reqwest::get(format!("{}/slow", server.url())).await.unwrap().text().await.unwrap();
        assert_eq!(slow, "chunkchunk");

        // Requests pipelined, answers never read (a small receive buffer).
        let mut stream = pipeline_and_never_read(addr).await;
        use tokio::io::AsyncReadExt;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Cut: what was sent before the cut, then the end, far short of the answers.
        let mut got = 0;
        let mut buf = vec![0; 64 << 10];
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection stayed open");
        assert!(got < BIG, "the whole answer arrived ({got} bytes): the connection was not cut");
        server.shutdown().await;
    }

    /// A full table of connections whose clients stopped reading: a newcomer
    /// takes the place of one of them rather than get a 503.
    #[tokio::test]
    async fn a_newcomer_takes_the_place_of_a_client_that_stopped_reading() {
        let limits = ServeLimits { max_connections: 2, ..ServeLimits::default() };
        let server =
            spawn_with("test", "127.0.0.1:0".parse().unwrap(), limits, hyper::service::service_fn(big_or_slow))
                .await
                .unwrap();
        let addr: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
        let _stalled = [pipeline_and_never_read(addr).await, pipeline_and_never_read(addr).await];
        // Stalled for over a second, and within the idle time: only shedding frees a place.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let answer = reqwest::get(format!("{}/slow", server.url())).await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.text().await.unwrap(), "chunkchunk");
        server.shutdown().await;
    }

    /// An entry whose task ended as it was registered holds no place:
    /// shedding it would free nothing, so it is never the one shed.
    #[tokio::test]
    async fn shedding_skips_a_connection_whose_place_is_already_free() {
        let counts = Arc::new(ConnectionCounts::default());
        let watched = Watched::default();
        let task = tokio::spawn(async {});
        let ended = task.abort_handle();
        task.await.unwrap();
        let counted = counts.admit(IpAddr::from([127, 0, 0, 1]), &ServeLimits::default()).unwrap();
        let place = counted.0.clone();
        drop(counted);
        // Waiting for its head since it opened: the first a shed would pick.
        watched.open.lock().unwrap().insert(0, Entry { activity: Arc::new(Activity::new()), place, task: ended });
        assert!(!watched.shed_one("test"), "a connection that holds no place was shed");
        // One that holds its place is shed.
        let live = tokio::spawn(std::future::pending::<()>());
        let counted = counts.admit(IpAddr::from([127, 0, 0, 1]), &ServeLimits::default()).unwrap();
        let place = counted.0.clone();
        watched
            .open
            .lock()
            .unwrap()
            .insert(1, Entry { activity: Arc::new(Activity::new()), place, task: live.abort_handle() });
        assert!(watched.shed_one("test"));
        assert_eq!(counts.total.load(Ordering::SeqCst), 0, "the shed connection's place was given back");
        drop(counted);
        assert!(live.await.unwrap_err().is_cancelled());
    }

    #[test]
    fn a_refused_connection_leaves_no_count_behind() {
        let counts = Arc::new(ConnectionCounts::default());
        let limits = ServeLimits { max_connections: 2, max_connections_per_ip: 1, ..ServeLimits::default() };
        let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
        let first = counts.admit(ip(1), &limits).unwrap();
        assert_eq!(counts.admit(ip(1), &limits).err(), Some(Over::PerIp));
        let second = counts.admit(ip(2), &limits).unwrap();
        // The table is full: addresses never seen are refused and not remembered.
        for n in 3..=200 {
            assert_eq!(counts.admit(ip(n), &limits).err(), Some(Over::Total));
        }
        assert_eq!(counts.per_ip.lock().unwrap().len(), 2);
        drop((first, second));
        assert!(counts.per_ip.lock().unwrap().is_empty());
        assert_eq!(counts.total.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_refused_request_with_a_body_ends_its_connection_and_others_keep_it() {
        let service = hyper::service::service_fn(|request: http::Request<Incoming>| async move {
            // Refuses without reading the body, as a store refusing a late part does.
            let status = if request.uri().path() == "/refuse" { 404 } else { 200 };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().status(status).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap(),
            )
        });
        let server = spawn("test", "127.0.0.1:0".parse().unwrap(), service).await.unwrap();
        let client = reqwest::Client::new();
        let send = |path: &str, body: Option<Vec<u8>>| {
            let request = match body {
                Some(body) => client.put(format!("{}{path}", server.url())).body(body),
                None => client.get(format!("{}{path}", server.url())),
            };
            request.send()
        };
        let refused = send("/refuse", Some(vec![b'x'; 1 << 20])).await.unwrap();
        assert_eq!(
            (refused.status().as_u16(), refused.headers().get("connection").map(|v| v.as_bytes())),
            (404, Some(&b"close"[..]))
        );
        // Without a body, or answered 200, the connection stays open for the next request.
        let bodyless = send("/refuse", None).await.unwrap();
        assert_eq!((bodyless.status().as_u16(), bodyless.headers().get("connection")), (404, None));
        let accepted = send("/ok", Some(vec![b'x'; 16])).await.unwrap();
        assert_eq!((accepted.status().as_u16(), accepted.headers().get("connection")), (200, None));
        server.shutdown().await;
    }

    /// Silent connections from several addresses fill the table and
    /// reconnect as they are closed; a caller with a real request still gets
    /// in every time, and the table stays near its bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_is_served_through_a_flood_of_silent_connections() {
        use std::sync::atomic::AtomicBool;
        use tokio::io::AsyncReadExt;
        let service = hyper::service::service_fn(|_request: http::Request<Incoming>| async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))))
        });
        let limits = ServeLimits {
            header_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_ip: 12,
            max_connections: 24,
            ..ServeLimits::default()
        };
        let server = spawn_with("test", "127.0.0.1:0".parse().unwrap(), limits, service).await.unwrap();
        let addr = server.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicUsize::new(0));
        let mut flood = Vec::new();
        // 3 addresses × 10 connections: more than the table holds, under each address's own bound.
        for from in 2..=4u8 {
            for _ in 0..10 {
                let (stop, connected) = (stop.clone(), connected.clone());
                flood.push(tokio::spawn(async move {
                    let local = SocketAddr::from(([127, 0, 0, from], 0));
                    while !stop.load(Ordering::SeqCst) {
                        let socket = tokio::net::TcpSocket::new_v4().unwrap();
                        socket.bind(local).unwrap();
                        let Ok(mut stream) = socket.connect(addr).await else { continue };
                        connected.fetch_add(1, Ordering::SeqCst);
                        // Sends nothing; reconnects once the server closes it.
                        let mut sink = Vec::new();
                        let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut sink)).await;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
            }
        }
        // The flood has filled the table (a shed connection leaves the count at once).
        let deadline = Instant::now() + Duration::from_secs(20);
        while connected.load(Ordering::SeqCst) < 30 || server.open_connections() < limits.max_connections {
            assert!(Instant::now() < deadline, "the flood never filled the table ({} open)", server.open_connections());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A fresh connection per request, as a new caller makes.
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut statuses = Vec::new();
        for _ in 0..20 {
            let response = client.get(format!("{}/", server.url())).send().await.unwrap();
            statuses.push(response.status().as_u16());
            assert!(server.open_connections() <= limits.max_connections, "{} open", server.open_connections());
        }
        assert_eq!(statuses, vec![200; 20], "the caller lost to silent connections");
        stop.store(true, Ordering::SeqCst);
        for task in flood {
            task.abort();
        }
        server.shutdown().await;
    }

    /// A full table of connections that each have a request in flight
    /// refuses a newcomer: there is nothing to shed.
    #[tokio::test]
    async fn a_full_table_of_busy_connections_refuses_with_a_503() {
        let (release, released) = tokio::sync::watch::channel(false);
        let entered = Arc::new(AtomicUsize::new(0));
        let service_entered = entered.clone();
        let service = hyper::service::service_fn(move |_request: http::Request<Incoming>| {
            let mut released = released.clone();
            service_entered.fetch_add(1, Ordering::SeqCst);
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
            }
        });
        let limits = ServeLimits { max_connections: 2, ..ServeLimits::default() };
        let server = spawn_with("test", "127.0.0.1:0".parse().unwrap(), limits, service).await.unwrap();
        let client = reqwest::Client::new();
        let busy: Vec<_> = (0..2).map(|_| tokio::spawn(client.get(format!("{}/", server.url())).send())).collect();
        // Both requests in flight, not just connected.
        while entered.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The refusal is written before the client says anything: read it raw.
        let mut refused = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut refused, &mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"), "{answer}");
        assert!(answer.contains("each with a request in flight"), "{answer}");
        release.send(true).unwrap();
        for request in busy {
            assert_eq!(request.await.unwrap().unwrap().status(), 200);
        }
        server.shutdown().await;
    }
}
