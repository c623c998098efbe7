//! The device-facing MQTT endpoint: a TLS listener whose connections are served by one task each.
//! The same `connection::serve` also runs behind the WebSocket endpoint (`websocket.rs`), whose
//! route the composition root hands to the HTTPS listener.

pub mod connection;
pub mod contract;
mod dps_session;
mod hub_session;
pub mod websocket;

use std::sync::Arc;

use tokio::net::TcpListener;

use super::state::Hub;

/// Serves device connections (hub and DPS) until shutdown.
pub async fn accept_loop(hub: Hub, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    super::tls_accept_loop(hub, listener, tls, "mqtt", |hub, stream, slot| async move {
        let chain = crate::hub::x509::ClientChain::of(stream.get_ref().1);
        connection::serve(hub, stream, chain).await;
        drop(slot);
    })
    .await
}
