//! A lean MQTT 3.1.1 client connection: the same codec as the hub, one read buffer and one write
//! buffer, no task or channel of its own. The device runtime owns it and drives it from its
//! single event loop, which is what keeps a simulated device small.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::BoxIo;

/// Largest packet accepted from the hub (a C2D message is at most 64 KB, a method 128 KB).
const MAX_IN: usize = 512 * 1024;
/// Idle buffers larger than this are given back.
const KEEP: usize = 4 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the hub refused the connection: CONNACK {code} ({0:?})", code = *.0 as u8)]
    Refused(ConnectReturnCode),
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("no CONNACK in time")]
    Timeout,
    #[error("the hub answered with something other than CONNACK")]
    Protocol,
}

impl ConnectError {
    /// Whether new credentials (or re-provisioning) are needed rather than a retry.
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectError::Refused(ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword))
    }
}

pub struct MqttConn {
    io: BoxIo,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_pkid: u16,
}

impl MqttConn {
    /// Sends CONNECT and waits for a successful CONNACK.
    pub async fn connect(
        io: BoxIo,
        client_id: &str,
        username: &str,
        password: &str,
        keep_alive: u16,
        timeout: Duration,
    ) -> Result<MqttConn, ConnectError> {
        let mut c =
            MqttConn { io, rbuf: BytesMut::with_capacity(256), wbuf: BytesMut::with_capacity(512), next_pkid: 0 };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = keep_alive;
        connect.clean_session = true;
        connect.set_login(username, password);
        c.queue(Packet::Connect(connect));
        tokio::time::timeout(timeout, async {
            c.flush().await?;
            loop {
                if let Some(p) = c.next_packet().map_err(|_| ConnectError::Protocol)? {
                    return match p {
                        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(()),
                        Packet::ConnAck(a) => Err(ConnectError::Refused(a.code)),
                        _ => Err(ConnectError::Protocol),
                    };
                }
                if c.fill().await? == 0 {
                    return Err(ConnectError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        })
        .await
        .map_err(|_| ConnectError::Timeout)??;
        Ok(c)
    }

    pub fn queue(&mut self, p: Packet) {
        let _ = p.write(&mut self.wbuf, usize::MAX);
    }

    /// Queues a publish; QoS 1 gets a packet id, returned.
    pub fn publish(&mut self, topic: String, payload: impl Into<bytes::Bytes>, qos: QoS) -> u16 {
        let mut p = rumqttc::mqttbytes::v4::Publish::from_bytes(topic, qos, payload.into());
        if qos == QoS::AtLeastOnce {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            p.pkid = self.next_pkid;
        }
        let id = p.pkid;
        self.queue(Packet::Publish(p));
        id
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await?;
            self.wbuf.clear();
            if self.wbuf.capacity() > KEEP {
                self.wbuf = BytesMut::with_capacity(512);
            }
        }
        Ok(())
    }

    /// Reads more bytes; 0 means the hub closed. Safe to cancel (nothing is lost).
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP {
            self.rbuf = BytesMut::with_capacity(256);
        }
        if self.rbuf.capacity() - self.rbuf.len() < 128 {
            self.rbuf.reserve(1024);
        }
        self.io.read_buf(&mut self.rbuf).await
    }

    /// The next complete packet already read, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        match Packet::read(&mut self.rbuf, MAX_IN) {
            Ok(p) => Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// DISCONNECT, flushed, then the stream closed; errors are irrelevant at this point.
    pub async fn disconnect(mut self) {
        self.queue(Packet::Disconnect);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}
