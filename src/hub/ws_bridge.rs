//! A WebSocket served as a byte stream: binary messages in, the protocol's bytes out as binary
//! messages, so the very same connection code serves MQTT and AMQP over WebSockets as over TLS.
//! Used by `mqtt/websocket.rs` and `amqp/websocket.rs`; it knows neither protocol.

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Bytes in flight each way between the WebSocket and the protocol's task.
const PIPE_BYTES: usize = 64 * 1024;

/// How long the pumps may outlive the protocol's task: a peer that never answers our close frame
/// must not keep them alive.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The subprotocol `name` as the client spelled it, if it asked for it (names compare without
/// regard to case: the C SDK sends `MQTT`).
pub fn subprotocol(ws: &WebSocketUpgrade, name: &str) -> Option<String> {
    ws.requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .find(|p| p.trim().eq_ignore_ascii_case(name))
        .map(|p| p.trim().to_owned())
}

/// Serves `socket` by running `serve` on the protocol's end of an in-memory pipe. A text frame
/// ends the connection (both protocols are binary); pings are answered by the WebSocket layer.
pub async fn bridge<F, Fut>(socket: WebSocket, serve: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let (protocol_side, ws_side) = tokio::io::duplex(PIPE_BYTES);
    let (mut from_protocol, mut to_protocol) = tokio::io::split(ws_side);
    let (mut sink, mut stream) = socket.split();
    let inbound = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(_) | Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if to_protocol.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_protocol.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_protocol.read(&mut buf).await {
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
    serve(protocol_side).await;
    if tokio::time::timeout(CLOSE_GRACE, &mut pumps).await.is_err() {
        pumps.abort();
    }
}
