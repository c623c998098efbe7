//! The AMQP 1.0 front end (TLS, port 5671): the hub's Event Hubs-compatible endpoint and its
//! service-side nodes, on `fe2o3-amqp`'s acceptor (framing, SASL negotiation, sessions, links and
//! flow control are the library's; what each address means is ours). A connection authenticates
//! with SASL (`auth.rs`), may put tokens on `$cbs` and ask `$management` (`nodes.rs`), and opens
//! receiver links on partitions (`partition.rs`). `pad.rs` writes every performative with all
//! its fields, for the Python clients that need it. It acts on `state::HubState` only; like the
//! other front ends it never imports `mqtt/` or `http/`.
//!
//! Listener discipline is the hub's: the connection bound, accept backoff and TLS handshake
//! timeout of `hub::tls_accept_loop`, the connect timeout for the AMQP `open`, the idle timeout
//! the `open` announces (`behaviour.amqp_idle_timeout_secs`), and at most `MAX_SESSIONS`
//! sessions of `MAX_LINKS` links each per connection.

pub mod auth;
pub mod nodes;
pub mod pad;
pub mod partition;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::connection::OpenError;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{AmqpError, Error};
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
#[derive(Clone, Default)]
struct Replies(Arc<Mutex<HashMap<String, mpsc::Sender<AmqpMessage>>>>);

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<AmqpMessage>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn serve(hub: Hub, tls: super::TlsConn) {
    let claims = Claims::default();
    let idle_ms = u32::try_from(hub.behaviour.amqp_idle_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("fleetsim-{}", hub.eventhub.name))
        .max_frame_size(MAX_FRAME)
        .channel_max(MAX_SESSIONS - 1)
        .idle_time_out(idle_ms)
        .sasl_acceptor(HubSasl::new(hub.clone(), claims.clone()))
        .build();
    let open_timeout = Duration::from_secs(hub.behaviour.connect_timeout_secs);
    let mut conn = match tokio::time::timeout(open_timeout, acceptor.accept(pad::PadPerformatives::new(tls))).await {
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
    let acceptor = LinkAcceptor::builder().build();
    let mut links = JoinSet::new();
    loop {
        let attach = tokio::select! {
            _ = hub.shutdown.cancelled() => break,
            a = session.next_incoming_attach() => a,
        };
        let Some(attach) = attach else { break };
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
                    links.spawn(serve_replies(replies.clone(), path, target, s));
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
        let route = {
            let map = replies.lock();
            reply_to.and_then(|a| map.get(&a).cloned()).or_else(|| map.get(&node).cloned())
        };
        // No reply link, or one that does not read: the client's request times out, as on Azure.
        if let Some(tx) = route {
            let _ = tx.try_send(answer);
        }
    }
    let _ = r.close().await;
}

/// A client's receiver on `$cbs`/`$management`: answers for its target address (and the node).
async fn serve_replies(replies: Replies, node: String, target: String, mut s: Sender) {
    let (tx, mut rx) = mpsc::channel(REPLY_QUEUE);
    let target = path_of(&target).to_owned();
    {
        let mut map = replies.lock();
        map.insert(node.clone(), tx.clone());
        if !target.is_empty() {
            map.insert(target.clone(), tx.clone());
        }
    }
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
