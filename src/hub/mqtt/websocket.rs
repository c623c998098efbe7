//! MQTT over WebSockets at `/$iothub/websocket` (subprotocol `mqtt`, matched without regard to
//! case since the C SDK sends `MQTT`). The WebSocket is bridged to an in-memory byte pipe so the
//! very same MQTT connection code serves it. The route is served by the HTTPS listener: the
//! composition root (`hub/mod.rs`) routes the path to [`upgrade`] (the AMQP binding shares it),
//! so `http/` never imports the MQTT front end.

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::connection;
use crate::hub::state::Hub;
use crate::hub::x509::ClientChain;

/// The upgrade keeps the HTTPS connection's slot in the hub's connection bound for the life of
/// the socket. Frames and messages are bounded by the largest MQTT packet the hub accepts, so an
/// anonymous peer cannot make the hub buffer more than that (issue 10: 16 MiB frames were
/// buffered before the MQTT size limit applied).
pub async fn upgrade(
    State(hub): State<Hub>,
    slot: Option<Extension<crate::httpserve::ConnectionSlot>>,
    chain: Option<Extension<ClientChain>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(proto) = crate::hub::ws_bridge::subprotocol(&ws, "mqtt") else {
        return (StatusCode::BAD_REQUEST, "the WebSocket subprotocol must be mqtt").into_response();
    };
    let max = connection::max_packet(&hub);
    ws.protocols([proto]).max_message_size(max).max_frame_size(max).on_upgrade(move |socket| async move {
        bridge(hub, socket, chain.map(|Extension(c)| c)).await;
        drop(slot);
    })
}

async fn bridge(hub: Hub, socket: WebSocket, chain: Option<ClientChain>) {
    crate::hub::ws_bridge::bridge(socket, |pipe| connection::serve(hub, pipe, chain)).await;
}
