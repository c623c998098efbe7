//! The AMQP 1.0 front end (TLS, port 5671, and WebSockets on the HTTPS port, `websocket.rs`): the hub's Event Hubs-compatible endpoint, C2D
//! sending and their service-side nodes, on `fe2o3-amqp`'s acceptor (framing, SASL negotiation,
//! sessions, links and flow control are the library's; what each address means is ours). A
//! connection authenticates with SASL (`auth.rs`), may put tokens on `$cbs` and ask
//! `$management` (`nodes.rs`), opens receiver links on partitions (`partition.rs`) and sender
//! links on `/messages/devicebound` (C2D, `c2d.rs`) and receiver links on
//! `/messages/servicebound/feedback` (C2D feedback, `feedback.rs`). `pad.rs` writes every performative with all
//! its fields, for the Python clients that need it. It acts on `state::HubState` only; like the
//! other front ends it never imports `mqtt/` or `http/`.
//!
//! Listener discipline is the hub's: the connection bound, accept backoff and TLS handshake
//! timeout of `hub::tls_accept_loop`, the connect timeout for the AMQP `open`, the idle timeout
//! the `open` announces (`behaviour.amqp_idle_timeout_secs`), and at most `MAX_SESSIONS`
//! sessions of `MAX_LINKS` links each per connection.

pub mod auth;
pub mod c2d;
pub mod feedback;
pub mod header;
pub mod nodes;
pub mod pad;
pub mod partition;
pub mod websocket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle, ListenerSessionHandle, SessionAcceptor,
    SupportedReceiverSettleModes,
};
use fe2o3_amqp::connection::OpenError;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{AmqpError, Error, ReceiverSettleMode};
use fe2o3_amqp::types::messaging::{Body, Target};
use fe2o3_amqp::types::primitives::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use self::auth::{Claims, HubSasl, without_scheme};
use self::nodes::AmqpMessage;
use super::metrics::Refusal;
use super::secrets::Permissions;
use super::state::Hub;
use crate::iot::time::unix_secs;

/// Sessions (channels) one connection may begin.
pub const MAX_SESSIONS: u16 = 16;
/// Links one session may attach.
pub const MAX_LINKS: u32 = 64;
/// The largest frame the listener takes or sends (messages larger than this are split).
const MAX_FRAME: u32 = 64 * 1024;
/// Answers waiting on a reply link before the oldest requests are dropped.
const REPLY_QUEUE: usize = 16;

/// Accepts AMQP connections until shutdown.
pub(crate) async fn accept_loop(hub: Hub, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    super::tls_accept_loop(hub, listener, tls, "AMQP", |hub, tls, slot| async move {
        serve(hub, tls).await;
        drop(slot);
    })
    .await;
}

/// Where the answers of `$cbs` and `$management` go: the sender link a client attached for them,
/// by the address it names (its target, which clients also put in `reply-to`) and by node.
/// Clients may send a request before their reply link is attached (uamqp does), so a request
/// waits up to `REPLY_LINK_WAIT` for its route.
#[derive(Clone, Default)]
struct Replies(Arc<(Mutex<Routes>, tokio::sync::Notify)>);

/// Reply address (or node) to the reply link's queue.
type Routes = HashMap<String, mpsc::Sender<AmqpMessage>>;

/// How long an answer waits for the reply link it is addressed to.
const REPLY_LINK_WAIT: Duration = Duration::from_secs(5);

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes answers for `node` and `target` to `tx`, waking requests waiting for a route.
    fn register(&self, node: &str, target: &str, tx: &mpsc::Sender<AmqpMessage>) {
        let mut map = self.lock();
        map.insert(node.to_owned(), tx.clone());
        if !target.is_empty() {
            map.insert(target.to_owned(), tx.clone());
        }
        drop(map);
        self.0.1.notify_waiters();
    }

    fn find(&self, reply_to: Option<&str>, node: &str) -> Option<mpsc::Sender<AmqpMessage>> {
        let map = self.lock();
        reply_to.and_then(|a| map.get(a).cloned()).or_else(|| map.get(node).cloned())
    }

    /// The route for an answer, waiting (bounded) for the reply link to attach.
    async fn route(&self, reply_to: Option<&str>, node: &str) -> Option<mpsc::Sender<AmqpMessage>> {
        let wait = async {
            loop {
                let notified = self.0.1.notified();
                if let Some(tx) = self.find(reply_to, node) {
                    return tx;
                }
                notified.await;
            }
        };
        tokio::time::timeout(REPLY_LINK_WAIT, wait).await.ok()
    }
}

/// Serves one AMQP connection over `stream` (TLS from the listener, or a WebSocket's bytes
/// from `websocket.rs`) until it closes or the hub stops.
pub(crate) async fn serve<S>(hub: Hub, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let claims = Claims::default();
    let idle_ms = u32::try_from(hub.behaviour.amqp_idle_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
    let builder = ConnectionAcceptor::builder()
        .container_id(format!("fleetsim-{}", hub.eventhub.name))
        .max_frame_size(MAX_FRAME)
        .channel_max(MAX_SESSIONS - 1)
        .idle_time_out(idle_ms);
    let open_timeout = Duration::from_secs(hub.behaviour.connect_timeout_secs);
    let mut stream = stream;
    let mut head = [0u8; header::LEN];
    match tokio::time::timeout(open_timeout, tokio::io::AsyncReadExt::read_exact(&mut stream, &mut head)).await {
        Ok(Ok(_)) => {}
        _ => {
            tracing::debug!("AMQP connection sent no protocol header within the connect timeout");
            return;
        }
    }
    let stream = pad::PadPerformatives::new(header::Replay::new(head, stream));
    // Without SASL a connection starts with no claim: it must put a token on `$cbs`.
    let accepted = if header::wants_sasl(&head) {
        let acceptor = builder.sasl_acceptor(HubSasl::new(hub.clone(), claims.clone())).build();
        tokio::time::timeout(open_timeout, acceptor.accept(stream)).await
    } else {
        tokio::time::timeout(open_timeout, builder.build().accept(stream)).await
    };
    let mut conn = match accepted {
        Ok(Ok(c)) => c,
        Ok(Err(OpenError::SaslError { .. })) => {
            hub.metrics.refused(Refusal::BadCredentials);
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "AMQP connection not opened");
            return;
        }
        Err(_) => {
            tracing::debug!("AMQP connection did not open within the connect timeout");
            return;
        }
    };
    let replies = Replies::default();
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = hub.shutdown.cancelled() => break,
            i = conn.next_incoming_session() => i,
        };
        let Some(incoming) = incoming else { break };
        let acceptor = SessionAcceptor::builder().handle_max(MAX_LINKS - 1).build();
        match acceptor.accept_incoming_session(incoming, &mut conn).await {
            Ok(session) => {
                sessions.spawn(serve_session(hub.clone(), claims.clone(), replies.clone(), session));
            }
            Err(e) => {
                tracing::debug!(error = %e, "AMQP session not begun");
                break;
            }
        }
        while sessions.try_join_next().is_some() {}
    }
    close(&mut conn).await;
    sessions.abort_all();
}

async fn close(conn: &mut ListenerConnectionHandle) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
}

/// The path an address names on this hub: `amqps://host/a/b` and `a/b` both give `a/b`.
fn path_of(address: &str) -> &str {
    let has_scheme = address.contains("://");
    let s = without_scheme(address);
    if has_scheme { s.split_once('/').map_or("", |(_, p)| p) } else { s.trim_start_matches('/') }
}

async fn serve_session(hub: Hub, claims: Claims, replies: Replies, mut session: ListenerSessionHandle) {
    // Settlement is one-phase on every link (receiver-settle-mode `first`): a client asking for
    // `second` is answered with `first`, as it may be (AMQP 1.0 section 2.7.3); uamqp asks for
    // `second` and then waits forever for a settled disposition.
    let acceptor = LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    let mut links = JoinSet::new();
    loop {
        let attach = tokio::select! {
            _ = hub.shutdown.cancelled() => break,
            a = session.next_incoming_attach() => a,
        };
        let Some(attach) = attach else { break };
        tracing::debug!(name = %attach.name, role = ?attach.role, "AMQP attach");
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "AMQP link not attached");
                continue;
            }
        };
        match link {
            LinkEndpoint::Receiver(r) => {
                let target = r.target().as_ref().and_then(|t: &Target| t.address.clone()).unwrap_or_default();
                match path_of(&target) {
                    node @ ("$cbs" | "$management") => {
                        let node = node.to_owned();
                        links.spawn(serve_requests(hub.clone(), claims.clone(), replies.clone(), node, r));
                    }
                    c2d::ADDRESS => {
                        links.spawn(attach_c2d(hub.clone(), claims.clone(), r));
                    }
                    _ => {
                        let why =
                            Error::new(AmqpError::NotImplemented, "this address takes no messages".to_owned(), None);
                        links.spawn(async move {
                            let _ = r.close_with_error(why).await;
                        });
                    }
                }
            }
            LinkEndpoint::Sender(s) => {
                let source = s.source().as_ref().and_then(|s| s.address.clone()).unwrap_or_default();
                let path = path_of(&source).to_owned();
                if path == "$cbs" || path == "$management" {
                    let target = s.target().as_ref().and_then(|t| t.address.clone()).unwrap_or_default();
                    // Registered before the next frame is read, so a request right behind the
                    // attach finds it.
                    let (tx, rx) = mpsc::channel(REPLY_QUEUE);
                    replies.register(&path, path_of(&target), &tx);
                    links.spawn(serve_replies(replies.clone(), tx, rx, s));
                } else if path.eq_ignore_ascii_case(feedback::ADDRESS) {
                    links.spawn(attach_feedback(hub.clone(), claims.clone(), s));
                } else {
                    links.spawn(attach_partition(hub.clone(), claims.clone(), path, s));
                }
            }
        }
        while links.try_join_next().is_some() {}
    }
    links.abort_all();
}

/// Checks a partition link (address, claim, filter) and serves it, or closes it with the error
/// Event Hubs gives: `amqp:not-found`, `amqp:unauthorized-access`, `amqp:invalid-field`.
async fn attach_partition(hub: Hub, claims: Claims, path: String, sender: Sender) {
    let checked = partition::parse_address(&hub, &path).and_then(|addr| {
        let resource = format!("{}/{path}", hub.hostname);
        let now = unix_secs(crate::hub::clock::wall());
        claims.authorizes(&resource, Permissions::SERVICE_CONNECT, now).ok_or_else(|| {
            partition::refuse(AmqpError::UnauthorizedAccess, "Unauthorized: put a token on $cbs first")
        })?;
        let from = partition::position(sender.source().as_ref())?;
        Ok((addr, resource, from))
    });
    match checked {
        Ok((addr, resource, from)) => partition::serve(hub, claims, sender, resource, addr, from).await,
        Err(e) => {
            tracing::debug!(address = %path, error = ?e.condition, "AMQP partition link refused");
            let _ = sender.close_with_error(e).await;
        }
    }
}

/// Checks the claim for `/messages/devicebound` (ServiceConnect, as IoT Hub asks of C2D senders)
/// and serves the link, or closes it with `amqp:unauthorized-access`.
async fn attach_c2d(hub: Hub, claims: Claims, r: Receiver) {
    let resource = format!("{}/{}", hub.hostname, c2d::ADDRESS);
    let now = unix_secs(crate::hub::clock::wall());
    if claims.authorizes(&resource, Permissions::SERVICE_CONNECT, now).is_none() {
        let why = partition::refuse(AmqpError::UnauthorizedAccess, "Unauthorized: put a token on $cbs first");
        let _ = r.close_with_error(why).await;
        return;
    }
    c2d::serve(hub, claims, r, resource).await;
}

/// Checks the claim for `/messages/servicebound/feedback` (ServiceConnect, as for C2D) and serves
/// the link, or closes it with `amqp:unauthorized-access`.
async fn attach_feedback(hub: Hub, claims: Claims, s: Sender) {
    let resource = format!("{}/{}", hub.hostname, feedback::ADDRESS);
    let now = unix_secs(crate::hub::clock::wall());
    if claims.authorizes(&resource, Permissions::SERVICE_CONNECT, now).is_none() {
        let why = partition::refuse(AmqpError::UnauthorizedAccess, "Unauthorized: put a token on $cbs first");
        let _ = s.close_with_error(why).await;
        return;
    }
    feedback::serve(hub, claims, s, resource).await;
}

/// Takes requests on a `$cbs` or `$management` link, answers each on the reply link.
async fn serve_requests(hub: Hub, claims: Claims, replies: Replies, node: String, mut r: Receiver) {
    loop {
        let delivery = tokio::select! {
            _ = hub.shutdown.cancelled() => break,
            d = r.recv::<Body<Value>>() => match d {
                Ok(d) => d,
                Err(_) => break,
            },
        };
        let request = delivery.message();
        let answer = match node.as_str() {
            "$cbs" => nodes::cbs(&hub, &claims, request),
            _ => nodes::management(&hub, &claims, request),
        };
        let reply_to = request.properties.as_ref().and_then(|p| p.reply_to.as_deref()).map(path_of).map(str::to_owned);
        if r.accept(&delivery).await.is_err() {
            break;
        }
        // No reply link, or one that does not read: the client's request times out, as on Azure.
        match replies.route(reply_to.as_deref(), &node).await {
            Some(tx) => {
                let _ = tx.try_send(answer);
            }
            None => tracing::debug!(node = %node, "AMQP answer dropped: no reply link"),
        }
    }
    let _ = r.close().await;
}

/// A client's receiver on `$cbs`/`$management`: sends the answers routed to it (`tx` is its
/// entry in `replies`, removed when the link ends).
async fn serve_replies(
    replies: Replies,
    tx: mpsc::Sender<AmqpMessage>,
    mut rx: mpsc::Receiver<AmqpMessage>,
    mut s: Sender,
) {
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => if s.send_batchable(m).await.is_err() { break },
                None => break,
            },
            _ = s.on_detach() => break,
        }
    }
    replies.lock().retain(|_, v| !v.same_channel(&tx));
    let _ = s.close().await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_lose_scheme_and_host() {
        assert_eq!(
            super::path_of("amqps://h.example:5671/hub/ConsumerGroups/$Default/Partitions/0"),
            "hub/ConsumerGroups/$Default/Partitions/0"
        );
        assert_eq!(super::path_of("$cbs"), "$cbs");
        assert_eq!(super::path_of("/$management"), "$management");
        assert_eq!(super::path_of("amqps://h"), "");
    }
}
