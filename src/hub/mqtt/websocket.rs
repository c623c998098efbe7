//! MQTT over WebSockets at `/$iothub/websocket` (subprotocol `mqtt`, matched without regard to
//! case since the C SDK sends `MQTT`). The WebSocket is bridged to an in-memory byte pipe so the
//! very same MQTT connection code serves it. The route is served by the HTTPS listener: the
//! composition root (`hub/mod.rs`) routes the path to [`upgrade`] (the AMQP binding shares it),
//! so `http/` never imports the MQTT front end.

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connection;
use crate::hub::state::Hub;

/// Bytes in flight each way between the WebSocket and the MQTT task.
const PIPE_BYTES: usize = 64 * 1024;

/// The upgrade keeps the HTTPS connection's slot in the hub's connection bound for the life of
/// the socket. Frames and messages are bounded by the largest MQTT packet the hub accepts, so an
/// anonymous peer cannot make the hub buffer more than that (issue 10: 16 MiB frames were
/// buffered before the MQTT size limit applied).
pub async fn upgrade(
    State(hub): State<Hub>,
    slot: Option<Extension<crate::httpserve::ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(proto) = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .find(|p| p.trim().eq_ignore_ascii_case("mqtt"))
        .map(|p| p.trim().to_owned())
    else {
        return (StatusCode::BAD_REQUEST, "the WebSocket subprotocol must be mqtt").into_response();
    };
    let max = connection::max_packet(&hub);
    ws.protocols([proto]).max_message_size(max).max_frame_size(max).on_upgrade(move |socket| async move {
        bridge(hub, socket).await;
        drop(slot);
    })
}

async fn bridge(hub: Hub, socket: WebSocket) {
    let (mqtt_side, ws_side) = tokio::io::duplex(PIPE_BYTES);
    let (mut from_mqtt, mut to_mqtt) = tokio::io::split(ws_side);
    let (mut sink, mut stream) = socket.split();
    let inbound = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                // MQTT is binary; text frames are a protocol error, pings are answered for us.
                Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if to_mqtt.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_mqtt.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_mqtt.read(&mut buf).await {
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
    let pumps = async move {
        tokio::join!(inbound, outbound);
    };
    let mut pumps = tokio::spawn(pumps);
    connection::serve(hub, mqtt_side).await;
    // A peer that never answers our close frame must not keep the pumps alive.
    if tokio::time::timeout(std::time::Duration::from_secs(5), &mut pumps).await.is_err() {
        pumps.abort();
    }
}
