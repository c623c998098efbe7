//! Serving HTTP to a network that may be hostile: every connection gets a header-read timeout and
//! an idle timeout, the number of open connections is bounded (past it a connection is closed at
//! once and counted, instead of the process running out of descriptors), and an accept loop that
//! fails (EMFILE, most likely) backs off instead of spinning. The emulator's HTTPS listener, its
//! metrics listener and the fleet's metrics listener all serve through here (issue 10).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client may take to send a request's headers; for HTTP/1 this also bounds how
    /// long a kept-alive connection may wait for its next request.
    pub header_timeout: Duration,
    /// How long a connection may have no request in progress before it is closed (HTTP/2's
    /// equivalent of the above; requests that take long, like a method call waiting on its
    /// device, are in progress and so never idle).
    pub idle_timeout: Duration,
}

impl Limits {
    /// The emulator's defaults (`http_header_timeout_secs`, `http_idle_timeout_secs`), and the
    /// fleet's metrics listener's fixed limits.
    pub const DEFAULT: Limits =
        Limits { header_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(120) };
}

/// Connections a metrics listener (the emulator's or the fleet's) serves at once: scrapers and
/// probes are few, and a small bound keeps the process's descriptors for its devices.
pub const METRICS_CONNECTIONS: usize = 256;

/// A slot in a listener's connection bound, held for the connection's whole life. A WebSocket
/// upgrade takes a clone from the request's extensions, so the slot is freed only when both the
/// HTTP connection and the upgraded socket are gone.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// A bound on open connections, shared by every listener that should count against it.
#[derive(Clone)]
pub struct ConnectionBound {
    slots: Arc<Semaphore>,
    /// The configured maximum, for messages.
    max: usize,
}

impl ConnectionBound {
    /// `max` connections at once; 0 means the process's open-files limit less 64 (descriptors kept
    /// for files, listeners and outgoing connections), and at least 64.
    pub fn new(max: usize) -> ConnectionBound {
        let max = if max == 0 { crate::sys::open_files_limit().saturating_sub(64).max(64) } else { max };
        ConnectionBound { slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))), max }
    }

    /// A slot, or `None` when every slot is taken.
    pub fn try_acquire(&self) -> Option<ConnectionSlot> {
        self.slots.clone().try_acquire_owned().ok().map(|p| ConnectionSlot(Arc::new(p)))
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn in_use(&self) -> usize {
        self.max.min(Semaphore::MAX_PERMITS) - self.slots.available_permits()
    }
}

/// Backs off after a failed `accept` (10 ms doubling to 1 s) and warns at most every 10 s,
/// saying how many failures the quiet period hid.
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    failures: u64,
    last_warning: Option<tokio::time::Instant>,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff { what, delay: Duration::ZERO, failures: 0, last_warning: None }
    }

    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    pub async fn failed(&mut self, e: &std::io::Error) {
        self.failures += 1;
        let now = tokio::time::Instant::now();
        if self.last_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            tracing::warn!(
                error = %e,
                listener = self.what,
                failures = self.failures,
                "accept failed (out of file descriptors?); backing off"
            );
            self.last_warning = Some(now);
            self.failures = 0;
        }
        self.delay = (self.delay * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::time::sleep(self.delay).await;
    }
}

/// Warns at most every 10 s that a listener is turning connections away at its bound.
pub struct RefusalLog {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    hidden: AtomicUsize,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog { last: std::sync::Mutex::new(None), hidden: AtomicUsize::new(0) }
    }
}

impl RefusalLog {
    pub fn refused(&self, what: &str, bound: &ConnectionBound) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            let hidden = self.hidden.swap(0, Ordering::Relaxed);
            tracing::warn!(
                listener = what,
                max_connections = bound.max(),
                refused_since_last_warning = hidden + 1,
                "connection refused: the connection limit is reached"
            );
            *last = Some(now);
        } else {
            self.hidden.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Serves one connection (plain or TLS) with `app` until it ends, breaks a limit, or `shutdown`.
pub async fn serve_connection<S>(
    io: S,
    app: Router,
    limits: Limits,
    slot: Option<ConnectionSlot>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = activity.clone();
        tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let busy = activity.begin();
            if let Some(s) = &slot {
                req.extensions_mut().insert(s.clone());
            }
            let app = app.clone();
            async move {
                let resp = app.oneshot(req.map(axum::body::Body::new)).await;
                drop(busy);
                resp
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::select! {
        _ = conn => {}
        _ = activity.idle_for(limits.idle_timeout) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Requests in progress on one connection, and when the count last changed.
#[derive(Default)]
struct Activity {
    in_progress: AtomicUsize,
    changed: std::sync::Mutex<Option<tokio::time::Instant>>,
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    fn touch(&self) {
        *self.changed.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// Resolves once no request has been in progress for `idle`.
    async fn idle_for(&self, idle: Duration) {
        let start = tokio::time::Instant::now();
        loop {
            let since = self.changed.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(start);
            let due = since.checked_add(idle).unwrap_or_else(crate::sys::far_future);
            if self.in_progress.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() >= due {
                return;
            }
            let wake =
                if self.in_progress.load(Ordering::Relaxed) == 0 { due } else { tokio::time::Instant::now() + idle };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Accepts plain-HTTP connections (the metrics endpoints) until `shutdown`, each bounded as above.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    bound: ConnectionBound,
    what: &'static str,
    shutdown: CancellationToken,
) {
    let mut backoff = AcceptBackoff::new(what);
    let refusals = RefusalLog::default();
    loop {
        let tcp: TcpStream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => { backoff.succeeded(); tcp }
                Err(e) => { backoff.failed(&e).await; continue; }
            },
        };
        let Some(slot) = bound.try_acquire() else {
            refusals.refused(what, &bound);
            drop(tcp);
            continue;
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(serve_connection(tcp, app, limits, Some(slot), shutdown));
    }
}
