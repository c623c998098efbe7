//! AMQP over WebSockets on the HTTPS port (subprotocol `AMQPWSB10`, the AMQP WebSocket binding IoT
//! Hub and Event Hubs offer for networks that only let 443 through): at `/$servicebus/websocket`,
//! where the Event Hubs clients go, and at `/$iothub/websocket`, where IoT Hub's service clients
//! go (shared with MQTT, told apart by the subprotocol). Each binary message carries AMQP bytes; the socket is bridged to an in-memory pipe
//! so the very same connection code (`super::serve`) serves it: SASL or not, `$cbs`, partitions,
//! C2D and feedback links alike. The composition root (`hub/mod.rs`) routes the paths to
//! [`upgrade`], so `http/` never imports the AMQP front end.

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::hub::state::Hub;

/// The subprotocol of the AMQP WebSocket binding.
pub const SUBPROTOCOL: &str = "AMQPWSB10";

/// Largest WebSocket message or frame taken: one AMQP frame of the listener's maximum size plus
/// slack, so an anonymous peer cannot make the hub buffer more.
const MAX_MESSAGE: usize = 256 * 1024;

/// Refuses an upgrade without the `AMQPWSB10` subprotocol (400); keeps the HTTPS connection's
/// slot in the hub's connection bound for the life of the socket.
pub async fn upgrade(
    State(hub): State<Hub>,
    slot: Option<Extension<crate::httpserve::ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(proto) = crate::hub::ws_bridge::subprotocol(&ws, SUBPROTOCOL) else {
        return (StatusCode::BAD_REQUEST, "the WebSocket subprotocol must be AMQPWSB10").into_response();
    };
    ws.protocols([proto]).max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE).on_upgrade(
        move |socket| async move {
            bridge(hub, socket).await;
            drop(slot);
        },
    )
}

async fn bridge(hub: Hub, socket: WebSocket) {
    crate::hub::ws_bridge::bridge(socket, |pipe| super::serve(hub, pipe)).await;
}
