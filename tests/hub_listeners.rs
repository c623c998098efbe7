//! Issue 10, kind 3: no client holds a listener's resources without limit. Hundreds of idle and
//! half-sent connections against every listener (MQTT, HTTPS, metrics) are closed by the server
//! after its timeouts, new clients are served meanwhile and after, and past the connection bound
//! a connection is turned away at once and counted. Every loop here is bounded in count and time.

use fleetsim_testkit as common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestHub;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How many of each kind of stalled connection a listener gets.
const EACH: usize = 60;

/// Longest the test waits for the server to close a stalled connection: several times the
/// shortest timeouts configured below, so only a connection that is never closed fails it.
const CLOSE_BOUND: Duration = Duration::from_secs(30);

/// What a stalled connection is, and whether the server closed it.
type Stalled = std::pin::Pin<Box<dyn std::future::Future<Output = (String, bool)> + Send>>;

async fn tcp(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("the listener accepts")
}

async fn tls(hub: &TestHub, addr: SocketAddr, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut cfg = rustls::ClientConfig::clone(&hub.tls);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp(addr).await)
        .await
        .expect("TLS handshake")
}

/// Reads until the server closes the connection (end of stream or reset); true if it did within
/// the bound.
async fn server_closes<S: AsyncRead + Unpin>(mut s: S) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(CLOSE_BOUND, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn served(hub: &TestHub) {
    let (status, _, body) = hub.rest("GET", "/devices", None).await;
    assert_eq!(status, 200, "{body}");
    hub.create_device(&format!("fresh-{}", rand_suffix())).await;
    assert!(hub.metrics().await.contains("fleetsim_hub_connections"));
}

fn rand_suffix() -> u32 {
    std::process::id() ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos())
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_and_new_clients_are_served() {
    let hub = TestHub::start_with(|c| {
        c.behaviour.connect_timeout_secs = 1;
        c.behaviour.http_header_timeout_secs = 1;
        c.behaviour.http_idle_timeout_secs = 2;
    })
    .await;
    let (mqtt, https) = (hub.info.mqtt_addr, hub.info.https_addr);
    let amqp = hub.info.amqp_addr.expect("the AMQP listener is on");
    let metrics: SocketAddr =
        hub.info.metrics_url.as_deref().unwrap()["http://".len()..].trim_end_matches("/metrics").parse().unwrap();
    let mut stalled: Vec<Stalled> = Vec::new();
    for i in 0..EACH {
        // MQTT: no TLS at all; TLS and no CONNECT; half a CONNECT.
        let s = tcp(mqtt).await;
        stalled.push(Box::pin(async move { ("mqtt tcp only".to_owned(), server_closes(s).await) }));
        let s = tls(&hub, mqtt, &[]).await;
        stalled.push(Box::pin(async move { ("mqtt no CONNECT".to_owned(), server_closes(s).await) }));
        let mut s = tls(&hub, mqtt, &[]).await;
        s.write_all(&[0x10, 0x40, 0x00, 0x04, b'M', b'Q']).await.unwrap();
        stalled.push(Box::pin(async move { ("mqtt half CONNECT".to_owned(), server_closes(s).await) }));
        // HTTPS: no TLS; half-sent headers (HTTP/1.1); a finished request then silence; an HTTP/2
        // connection that never sends a request.
        let s = tcp(https).await;
        stalled.push(Box::pin(async move { ("https tcp only".to_owned(), server_closes(s).await) }));
        let mut s = tls(&hub, https, &[b"http/1.1"]).await;
        s.write_all(format!("GET /devices?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\nX-{i}: ").as_bytes())
            .await
            .unwrap();
        stalled.push(Box::pin(async move { ("https half headers".to_owned(), server_closes(s).await) }));
        if i % 4 == 0 {
            let mut s = tls(&hub, https, &[b"http/1.1"]).await;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
            stalled.push(Box::pin(async move { ("https kept alive".to_owned(), server_closes(s).await) }));
            let mut s = tls(&hub, https, &[b"h2"]).await;
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
            stalled.push(Box::pin(async move { ("https idle h2".to_owned(), server_closes(s).await) }));
        }
        // AMQP: no TLS; TLS and no protocol header; half a SASL protocol header.
        let s = tcp(amqp).await;
        stalled.push(Box::pin(async move { ("amqp tcp only".to_owned(), server_closes(s).await) }));
        let s = tls(&hub, amqp, &[]).await;
        stalled.push(Box::pin(async move { ("amqp no header".to_owned(), server_closes(s).await) }));
        let mut s = tls(&hub, amqp, &[]).await;
        s.write_all(b"AMQP\x03").await.unwrap();
        stalled.push(Box::pin(async move { ("amqp half header".to_owned(), server_closes(s).await) }));
        // Metrics (plain HTTP): half-sent headers.
        let mut s = tcp(metrics).await;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        stalled.push(Box::pin(async move { ("metrics half headers".to_owned(), server_closes(s).await) }));
    }
    let total = stalled.len();
    assert!(total >= 9 * EACH, "a few hundred stalled connections");
    // New clients are served while the stalled ones are still open.
    served(&hub).await;
    let key = hub.create_device("d1").await;
    let _c = hub.connect("d1", None, &key, true).await;
    let results = futures_util::future::join_all(stalled).await;
    let open: Vec<&String> = results.iter().filter(|(_, closed)| !closed).map(|(what, _)| what).collect();
    assert!(open.is_empty(), "{} of {total} stalled connections were never closed: {open:?}", open.len());
    served(&hub).await;
    assert!(hub.metric("fleetsim_hub_connections_refused_total{reason=\"no_connect\"}").await >= EACH as f64);
}

#[tokio::test]
async fn past_the_connection_bound_connections_are_turned_away_and_counted() {
    const BOUND: usize = 40;
    let hub = TestHub::start_with(|c| {
        c.behaviour.max_connections = BOUND;
        c.behaviour.connect_timeout_secs = 2;
    })
    .await;
    // Fill the bound with idle TCP connections to the three TLS listeners.
    let mut held = Vec::new();
    for i in 0..BOUND {
        let amqp = hub.info.amqp_addr.expect("the AMQP listener is on");
        held.push(tcp([hub.info.mqtt_addr, hub.info.https_addr, amqp][i % 3]).await);
    }
    // The accept loop has taken every one of them once the next one is refused at once.
    let mut refused = 0;
    for _ in 0..20 {
        let extra = tcp(hub.info.mqtt_addr).await;
        if tokio::time::timeout(Duration::from_secs(5), server_closes(extra)).await.unwrap_or(false) {
            refused += 1;
        }
    }
    assert_eq!(refused, 20, "connections past the bound are closed");
    common::wait_until("the refusals are counted", || async {
        hub.metric("fleetsim_hub_connections_refused_total{reason=\"connection_limit\"}").await >= 20.0
    })
    .await;
    // The held ones time out (no TLS handshake within connect_timeout) and free their slots.
    let closed = futures_util::future::join_all(held.into_iter().map(server_closes)).await;
    assert!(closed.iter().all(|c| *c), "stalled connections are closed");
    common::wait_until("slots are free again", || async { hub.state().connections.in_use() < BOUND }).await;
    served(&hub).await;
    let key = hub.create_device("d1").await;
    let _c = hub.connect("d1", None, &key, true).await;
}

/// Issue 10: WebSocket frames were buffered up to 16 MiB before the MQTT size limit applied (40
/// anonymous connections added 634 MiB). A frame larger than the largest MQTT packet now ends the
/// connection before the hub holds it, and the hub keeps serving.
#[tokio::test]
async fn websocket_frames_larger_than_an_mqtt_packet_end_the_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let hub = TestHub::start().await;
    let max = hub.state().behaviour.max_message_bytes + 64 * 1024;
    for size in [max + 1, 4 * 1024 * 1024] {
        let mut req =
            format!("wss://localhost:{}/$iothub/websocket", hub.info.https_port).into_client_request().unwrap();
        req.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        let tcp = TcpStream::connect(hub.info.https_addr).await.unwrap();
        let connector = tokio_tungstenite::Connector::Rustls(hub.tls.clone());
        let (mut ws, _) =
            tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector)).await.unwrap();
        // The send itself may fail once the hub closes; what matters is that the socket ends.
        let _ = ws.send(Message::Binary(bytes::Bytes::from(vec![0x30; size]))).await;
        let ended = tokio::time::timeout(CLOSE_BOUND, async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a {size}-byte frame did not end the connection");
    }
    served(&hub).await;
}
