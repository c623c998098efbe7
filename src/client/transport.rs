//! Opening a byte stream to the hub or DPS: TCP + TLS, optionally MQTT over WebSockets on top.
//! Both end up as one boxed `AsyncRead + AsyncWrite`, so the MQTT client does not care which.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// Where to dial: the host is also the TLS server name.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub websocket: bool,
}

pub async fn open(ep: &Endpoint, tls: Arc<rustls::ClientConfig>) -> io::Result<BoxIo> {
    let tcp = TcpStream::connect((ep.host.as_str(), ep.port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(ep.host.clone())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad host name"))?;
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    if !ep.websocket {
        return Ok(Box::new(stream));
    }
    let mut req = format!("wss://{}:{}/$iothub/websocket", ep.host, ep.port)
        .into_client_request()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    req.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().expect("static header"));
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))?;
    Ok(Box::new(WsIo { ws, pending: Bytes::new() }))
}

/// A WebSocket carrying a byte stream in binary messages (MQTT packets need not align with them).
struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary message.
    pending: Bytes,
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_err)?;
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(ws_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(ws_err)
    }
}

/// Roots to trust: the given CA file (an emulator, a gateway), or the public web PKI (Azure).
pub fn client_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            {
                roots.add(c.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
