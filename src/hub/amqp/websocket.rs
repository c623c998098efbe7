//! AMQP over WebSockets on the HTTPS port (subprotocol `AMQPWSB10`, the AMQP WebSocket binding IoT
//! Hub and Event Hubs offer for networks that only let 443 through): at `/$servicebus/websocket`,
//! where the Event Hubs clients go, and at `/$iothub/websocket`, where IoT Hub's service clients
//! go (shared with MQTT, told apart by the subprotocol). Each binary message carries AMQP bytes; the socket is bridged to an in-memory pipe
//! so the very same connection code (`super::serve`) serves it: SASL or not, `$cbs`, partitions,
//! C2D and feedback links alike. The composition root (`hub/mod.rs`) routes the paths to
//! [`upgrade`], so `http/` never imports the AMQP front end.

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hub::state::Hub;

/// The subprotocol of the AMQP WebSocket binding.
pub const SUBPROTOCOL: &str = "AMQPWSB10";

/// Bytes in flight each way between the WebSocket and the AMQP task.
const PIPE_BYTES: usize = 64 * 1024;

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
    let Some(proto) = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .find(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL))
        .map(|p| p.trim().to_owned())
    else {
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
    let (amqp_side, ws_side) = tokio::io::duplex(PIPE_BYTES);
    let (mut from_amqp, mut to_amqp) = tokio::io::split(ws_side);
    let (mut sink, mut stream) = socket.split();
    let inbound = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(_) | Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if to_amqp.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_amqp.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_amqp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    let mut pumps = tokio::spawn(async move {
        tokio::join!(inbound, outbound);
    });
    super::serve(hub, amqp_side).await;
    // A peer that never answers our close frame must not keep the pumps alive.
    if tokio::time::timeout(std::time::Duration::from_secs(5), &mut pumps).await.is_err() {
        pumps.abort();
    }
}
