//! One MQTT connection from CONNECT to close. This file owns the framing, the event loop and the
//! CONNECT decision; what a hub or DPS connection does with its packets lives in `hub_session`
//! and `dps_session`. Everything is written into one buffer and flushed once per wake-up.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{Error as CodecError, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::contract::{PacketSession, Step, Wire};
use super::dps_session::DpsSession;
use super::hub_session::HubSession;
use crate::hub::faults::DropMode;
use crate::hub::metrics::Refusal;
use crate::hub::session::{CloseReason, OUTBOUND_CAPACITY};
use crate::hub::state::Hub;
use crate::hub::store::Committed;
use crate::hub::x509::ClientChain;
use crate::iot::username::Username;

/// Room for the largest telemetry message plus its topic and headers.
pub fn max_packet(hub: &Hub) -> usize {
    hub.behaviour.max_message_bytes + 64 * 1024
}

/// Buffers above this are given back after use, so an idle connection stays small.
const KEEP_BUFFER: usize = 8 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// An installed session, closed exactly once: by `close`, or, should the connection's task end
/// any other way (a panic unwinding through it included), by `Drop`, so that no session stays in
/// the registry as Connected and no connection gauge leaks (issue 10).
struct Installed {
    session: Option<Box<dyn PacketSession + Send>>,
    hub: Hub,
}

impl Installed {
    fn session(&mut self) -> &mut (dyn PacketSession + Send) {
        self.session.as_deref_mut().expect("present until closed")
    }

    fn close(mut self, reason: CloseReason, wire: &mut Wire) {
        if let Some(mut s) = self.session.take() {
            s.on_close(reason, wire);
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut s) = self.session.take() {
            s.on_close(CloseReason::Aborted, &mut Wire::new());
            self.hub.metrics.disconnected(CloseReason::Aborted);
        }
    }
}

/// Whether the first byte of a fixed header has the flags MQTT 3.1.1 requires for its packet
/// type (§2.2.2: reserved flags as listed, else close; §3.3.1-4: PUBLISH QoS 3 is malformed).
/// rumqttc's parser does not check them, so the hub does, before parsing.
pub fn fixed_header_ok(byte: u8) -> bool {
    let flags = byte & 0x0F;
    match byte >> 4 {
        3 => (flags >> 1) & 0b11 != 0b11,
        6 | 8 | 10 => flags == 0b0010,
        1 | 2 | 4 | 5 | 7 | 9 | 11 | 12 | 13 | 14 => flags == 0,
        _ => false,
    }
}

/// Serves one connection over any byte stream (TLS or WebSocket); `chain` is the client
/// certificate its TLS handshake presented, if any (X.509 devices).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(hub: Hub, mut stream: S, chain: Option<ClientChain>) {
    let mut rbuf = BytesMut::with_capacity(1024);
    let max = max_packet(&hub);
    let first = tokio::time::timeout(
        Duration::from_secs(hub.behaviour.connect_timeout_secs),
        read_one(&mut stream, &mut rbuf, max),
    )
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(c))) => c,
        _ => {
            hub.metrics.refused(Refusal::NoConnect);
            tracing::debug!(
                timeout_secs = hub.behaviour.connect_timeout_secs,
                "connection closed: no CONNECT in time, or not MQTT"
            );
            return;
        }
    };
    // Who is connecting, for the log: the client id and username carry no secret (the SAS token
    // is the password, which is never logged).
    let client_id = connect.client_id.clone();
    let mut wire = Wire::with_store(hub.store.committed());
    if connect.protocol != Protocol::V4 {
        return refuse(
            &hub,
            &client_id,
            &mut stream,
            &mut wire,
            ConnectReturnCode::RefusedProtocolVersion,
            Refusal::UnsupportedProtocol,
        )
        .await;
    }
    let (username, password) = match &connect.login {
        Some(l) => (l.username.clone(), l.password.clone()),
        None => {
            return refuse(
                &hub,
                &client_id,
                &mut stream,
                &mut wire,
                ConnectReturnCode::NotAuthorized,
                Refusal::BadCredentials,
            )
            .await;
        }
    };
    let keep_alive = effective_keepalive(connect.keep_alive, hub.behaviour.keepalive_cap_secs);
    let (tx, mut rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let mut forced_expiry = None;
    let (session, token_expiry): (Box<dyn PacketSession + Send>, Option<u64>) = match Username::parse(&username) {
        Ok(Username::Hub(u)) => {
            if let Err(r) = crate::hub::devices::admit(&hub) {
                return refuse(&hub, &client_id, &mut stream, &mut wire, ConnectReturnCode::ServiceUnavailable, r)
                    .await;
            }
            match HubSession::connect(&hub, &u, &connect, &password, chain.as_ref(), tx, &mut wire) {
                Ok((s, expiry)) => {
                    forced_expiry = hub.faults.token_deadline();
                    (Box::new(s), Some(expiry))
                }
                Err(r) => {
                    return refuse(&hub, &client_id, &mut stream, &mut wire, ConnectReturnCode::NotAuthorized, r).await;
                }
            }
        }
        Ok(Username::Dps(u)) => match DpsSession::connect(&hub, &u, &connect, &password, tx, &mut wire) {
            Ok((s, expiry)) => (Box::new(s), Some(expiry)),
            Err(r) => {
                return refuse(&hub, &client_id, &mut stream, &mut wire, ConnectReturnCode::NotAuthorized, r).await;
            }
        },
        Err(_) => {
            return refuse(
                &hub,
                &client_id,
                &mut stream,
                &mut wire,
                ConnectReturnCode::NotAuthorized,
                Refusal::BadUsername,
            )
            .await;
        }
    };
    let mut installed = Installed { session: Some(session), hub: hub.clone() };
    // A token may name any expiry up to 2^64-1 s; one past what the clock can count never expires
    // (`None`) instead of overflowing `Instant + Duration` (issue 10).
    let token_deadline = token_expiry.and_then(|se| {
        let now = crate::iot::time::unix_secs(crate::hub::clock::wall());
        let left = Duration::from_secs(se.saturating_add(hub.behaviour.sas_skew_secs).saturating_sub(now));
        crate::sys::deadline_after(left.saturating_add(Duration::from_millis(500)))
    });
    let token_deadline = match (token_deadline, forced_expiry) {
        (Some(t), Some(f)) => Some(t.min(f)),
        (t, f) => t.or(f),
    };
    let mut ka_deadline = crate::hub::clock::now() + keep_alive; // keep_alive <= keepalive_cap_secs (validated)
    tracing::debug!(client_id, keep_alive_secs = keep_alive.as_secs(), "connected");
    let mut committed = hub.store.committed();
    let reason = 'conn: loop {
        // Handle every complete packet already buffered.
        loop {
            if rbuf.first().is_some_and(|b| !fixed_header_ok(*b)) {
                break 'conn CloseReason::ProtocolViolation;
            }
            match Packet::read(&mut rbuf, max) {
                Ok(p) => {
                    if let Step::Close(r) = installed.session().on_packet(p, &mut wire) {
                        break 'conn r;
                    }
                }
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(_) => break 'conn CloseReason::ProtocolViolation,
            }
        }
        if let (Some(rx), Some(_)) = (&committed, wire.waiting_for())
            && wire.release(*rx.borrow()).is_err()
        {
            break CloseReason::NotDurable;
        }
        if !wire.out.is_empty() && flush(&mut stream, &mut wire.out).await.is_err() {
            break CloseReason::ConnectionLost;
        }
        if rbuf.is_empty() && rbuf.capacity() > KEEP_BUFFER {
            rbuf = BytesMut::with_capacity(1024);
        } else if rbuf.capacity() - rbuf.len() < 256 {
            rbuf.reserve(1024);
        }
        tokio::select! {
            r = stream.read_buf(&mut rbuf) => match r {
                Ok(0) | Err(_) => break CloseReason::ConnectionLost,
                Ok(n) => {
                    hub.metrics.bytes_in.inc_by(n as u64);
                    ka_deadline = crate::hub::clock::now() + keep_alive;
                }
            },
            Some(o) = rx.recv() => {
                if let Step::Close(r) = installed.session().on_outbound(*o, &mut wire) {
                    break r;
                }
            }
            c = committed_past(&mut committed, wire.waiting_for()) => {
                if wire.release(c).is_err() {
                    break CloseReason::NotDurable;
                }
            }
            _ = tokio::time::sleep_until(ka_deadline) => break CloseReason::KeepAliveTimeout,
            _ = crate::sys::sleep_until_opt(token_deadline) => break CloseReason::TokenExpired,
            _ = hub.shutdown.cancelled() => break CloseReason::Shutdown,
        }
    };
    installed.close(reason, &mut wire);
    tracing::debug!(client_id, reason = reason.label(), "disconnected");
    if reason == CloseReason::FaultInjected && hub.faults.drop_mode() == DropMode::Silent {
        // Hold the socket, unread and silent, as a dead NAT mapping would, until the device's own
        // keep-alive has had time to notice; only then is it dropped. What the device wrote
        // meanwhile was never read, so it is not acknowledged and the device sends it again.
        tokio::select! {
            _ = tokio::time::sleep(keep_alive) => {}
            _ = hub.shutdown.cancelled() => {}
        }
        hub.metrics.disconnected(reason);
        return;
    }
    if !wire.out.is_empty() {
        let _ = flush(&mut stream, &mut wire.out).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    hub.metrics.disconnected(reason);
}

/// Resolves once the store has committed change `target` (or failed, or stopped: then as
/// failed); never without a store or a target.
async fn committed_past(rx: &mut Option<watch::Receiver<Committed>>, target: Option<u64>) -> Committed {
    let (Some(rx), Some(target)) = (rx, target) else { return std::future::pending().await };
    match rx.wait_for(|c| c.seq >= target || c.failed).await {
        Ok(c) => *c,
        Err(_) => Committed { seq: 0, failed: true },
    }
}

/// The hub waits 1.5x the client's keep-alive (0 means the cap).
fn effective_keepalive(client_secs: u16, cap_secs: u64) -> Duration {
    let cap = Duration::from_secs(cap_secs);
    if client_secs == 0 { cap } else { (Duration::from_secs(client_secs as u64) * 3 / 2).min(cap) }
}

async fn flush<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> std::io::Result<()> {
    let r = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(out).await?;
        stream.flush().await
    })
    .await;
    out.clear();
    if out.capacity() > KEEP_BUFFER {
        *out = BytesMut::new();
    }
    match r {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn read_one<S: AsyncRead + Unpin>(stream: &mut S, rbuf: &mut BytesMut, max: usize) -> Result<Packet, ()> {
    loop {
        if rbuf.first().is_some_and(|b| !fixed_header_ok(*b)) {
            return Err(());
        }
        match Packet::read(rbuf, max) {
            Ok(p) => return Ok(p),
            Err(CodecError::InsufficientBytes(_)) => {
                rbuf.reserve(1024);
                match stream.read_buf(rbuf).await {
                    Ok(0) | Err(_) => return Err(()),
                    Ok(_) => {}
                }
            }
            Err(_) => return Err(()),
        }
    }
}

async fn refuse<S: AsyncWrite + Unpin>(
    hub: &Hub,
    client_id: &str,
    stream: &mut S,
    wire: &mut Wire,
    code: ConnectReturnCode,
    reason: Refusal,
) {
    hub.metrics.refused(reason);
    tracing::debug!(client_id, reason = reason.label(), connack = code as u8, "connection refused");
    wire.write(Packet::ConnAck(ConnAck::new(code, false)));
    let _ = flush(stream, &mut wire.out).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_fixed_header_flags_are_checked_for_every_packet_type() {
        // Issue 10: SUBSCRIBE with flags 0000 was accepted (MQTT-3.8.1-1 says close).
        for ok in [0x10, 0x20, 0x30, 0x31, 0x32, 0x33, 0x3A, 0x3D, 0x40, 0x50, 0x62, 0x70, 0x82, 0x90, 0xA2, 0xB0, 0xC0]
        {
            assert!(fixed_header_ok(ok), "{ok:#04x}");
        }
        for bad in
            [0x00, 0x11, 0x18, 0x36, 0x37, 0x3E, 0x41, 0x60, 0x63, 0x80, 0x81, 0x8A, 0xA0, 0xA3, 0xC1, 0xE8, 0xF0]
        {
            assert!(!fixed_header_ok(bad), "{bad:#04x}");
        }
    }

    #[test]
    fn keepalive_is_one_and_a_half_times_capped() {
        assert_eq!(effective_keepalive(60, 1767), Duration::from_secs(90));
        assert_eq!(effective_keepalive(0, 1767), Duration::from_secs(1767));
        assert_eq!(effective_keepalive(1500, 1767), Duration::from_secs(1767));
    }

    use crate::hub::testing::{bench, connect, identity, token};
    use crate::iot::username::hub_username;

    /// Opens a connection through `serve` over an in-memory pipe; returns the client's end after
    /// the CONNACK, and the serving task.
    async fn open(
        hub: &Hub,
        keep_alive: u16,
        token_secs: u64,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let key = identity(hub, "d1", None);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(serve(hub.clone(), server, None));
        let mut c = connect(
            "d1",
            &hub_username("localhost", "d1", None, None),
            &token("localhost/devices/d1", &key, token_secs),
            true,
        );
        c.keep_alive = keep_alive;
        let mut out = BytesMut::new();
        Packet::Connect(c).write(&mut out, usize::MAX).unwrap();
        client.write_all(&out).await.unwrap();
        let mut rbuf = BytesMut::new();
        let ack = read_one(&mut client, &mut rbuf, 1024).await.expect("CONNACK");
        assert!(matches!(ack, Packet::ConnAck(ConnAck { code: ConnectReturnCode::Success, .. })));
        (client, serving)
    }

    fn disconnects(hub: &Hub, reason: &str) -> bool {
        hub.metrics.render().contains(&format!("fleetsim_hub_disconnects_total{{reason=\"{reason}\"}} 1"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closes_when_its_token_expires_on_the_hub_clock() {
        let b = bench(|_| {});
        let (mut client, serving) = open(&b.hub, 0, 60).await;
        let t0 = crate::hub::clock::now();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        serving.await.unwrap();
        assert!(disconnects(&b.hub, "token_expired"), "{}", b.hub.metrics.render());
        // Virtual time: the token's minute (to the second it was signed in), not the keep-alive cap.
        let waited = crate::hub::clock::now() - t0;
        assert!(waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61), "{waited:?}");
        assert!(b.hub.registry.get("d1", None).unwrap().lock().session.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_is_reset_by_traffic_and_enforced_at_one_and_a_half_times() {
        let b = bench(|_| {});
        let (mut client, serving) = open(&b.hub, 10, 3600).await;
        let t0 = crate::hub::clock::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut out = BytesMut::new();
        Packet::PingReq.write(&mut out, usize::MAX).unwrap();
        client.write_all(&out).await.unwrap();
        let mut rbuf = BytesMut::new();
        assert!(matches!(read_one(&mut client, &mut rbuf, 1024).await, Ok(Packet::PingResp)));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        serving.await.unwrap();
        assert!(disconnects(&b.hub, "keepalive_timeout"), "{}", b.hub.metrics.render());
        assert_eq!(crate::hub::clock::now() - t0, Duration::from_secs(25), "15 s after the last packet");
    }
}
