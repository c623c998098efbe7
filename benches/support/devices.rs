//! Devices for the benches that drive the emulator's MQTT port directly: created over REST, then
//! connected over TLS with a SAS token and driven with raw MQTT packets, so the bench's own cost
//! per message stays small next to the hub's. Included by path (`#[path]`) only from the benches
//! that use it.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use fleetsim::hub::info::HubInfo;
use fleetsim::iot::sas::{Key, sign_token};
use fleetsim::iot::time::unix_secs;
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Subscribe};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::support;

pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// Creates `bench-{i:06}` for i in `range` with `key` as both keys, 64 requests in flight;
/// returns how many succeeded.
pub async fn create(info: &HubInfo, key: &Key, range: std::ops::Range<usize>) -> usize {
    let (http, token) = support::service_client(info);
    let sem = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in range {
        let (http, token, sem, key) = (http.clone(), token.clone(), sem.clone(), key.to_base64());
        let url = format!("https://localhost:{}/devices/bench-{i:06}?api-version=2021-04-12", info.https_port);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let body =
                json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}});
            http.put(url).header("authorization", token).json(&body).send().await.is_ok_and(|r| r.status().is_success())
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    ok
}

pub async fn write<W: AsyncWriteExt + Unpin>(s: &mut W, p: Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX).unwrap();
    s.write_all(&out).await.map_err(|_| "write".to_string())
}

/// Reads until `done` says the packet it was waiting for came.
pub async fn until<R: AsyncReadExt + Unpin>(
    s: &mut R,
    buf: &mut BytesMut,
    mut done: impl FnMut(&Packet) -> bool,
) -> Result<(), String> {
    loop {
        while let Ok(p) = Packet::read(buf, 1 << 16) {
            if let Packet::ConnAck(a) = &p
                && a.code != ConnectReturnCode::Success
            {
                return Err(format!("connack {:?}", a.code));
            }
            if done(&p) {
                return Ok(());
            }
        }
        if s.read_buf(buf).await.map_err(|_| "read".to_string())? == 0 {
            return Err("closed".into());
        }
    }
}

/// Device `id` connected (clean session, keep-alive 1000 s), and subscribed to `filter` if given
/// (returned once its SUBACK came; otherwise once the CONNACK came).
pub async fn connect(
    info: &HubInfo,
    tls: Arc<rustls::ClientConfig>,
    id: String,
    key: &Key,
    filter: Option<&str>,
) -> Result<Stream, String> {
    let tcp = TcpStream::connect(info.mqtt_addr).await.map_err(|e| format!("tcp: {}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|_| "tls".to_string())?;
    let mut c = Connect::new(id.clone());
    c.keep_alive = 1000;
    let password = sign_token(&format!("localhost/devices/{id}"), key, unix_secs(SystemTime::now()) + 7200, None);
    c.set_login(hub_username("localhost", &id, None, None), password);
    write(&mut s, Packet::Connect(c)).await?;
    let mut buf = BytesMut::new();
    match filter {
        Some(f) => {
            let mut sub = Subscribe::new(f, QoS::AtLeastOnce);
            sub.pkid = 1;
            write(&mut s, Packet::Subscribe(sub)).await?;
            until(&mut s, &mut buf, |p| matches!(p, Packet::SubAck(_))).await?;
        }
        None => until(&mut s, &mut buf, |p| matches!(p, Packet::ConnAck(_))).await?,
    }
    Ok(s)
}
