//! The device-facing MQTT endpoint: a TLS listener whose connections are served by one task each.
//! The same `connection::serve` also runs behind the WebSocket endpoint of the HTTPS listener.

pub mod connection;
mod dps_session;
mod hub_session;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::metrics::Refusal;
use super::state::Hub;

/// Accepts TCP connections until shutdown; each gets a TLS handshake (bounded in time) and then
/// an MQTT connection task.
pub async fn accept_loop(hub: Hub, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let handshake_timeout = Duration::from_secs(hub.behaviour.connect_timeout_secs);
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather than spin.
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let hub = hub.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => connection::serve(hub, tls).await,
                _ => hub.metrics.refused(Refusal::TlsHandshake),
            }
        });
    }
}
