//! The first eight bytes of an AMQP connection, read before the library sees the stream: the
//! protocol header says whether the client starts with SASL (`AMQP 3 1 0 0`) or with AMQP itself
//! (`AMQP 0 1 0 0`, AMQP 1.0 part 5, section 5.1). IoT Hub takes both: Microsoft's Node service
//! client opens without SASL and authorizes through `$cbs` alone. `Replay` hands the bytes read
//! back to the library ahead of the rest of the stream, so it negotiates as if nothing was read.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The protocol header's length.
pub const LEN: usize = 8;

/// Whether a protocol header asks for the SASL layer first (protocol id 3); anything else,
/// a plain AMQP header or garbage, is left to the library's AMQP negotiation to answer or refuse.
pub fn wants_sasl(header: &[u8; LEN]) -> bool {
    header.starts_with(b"AMQP") && header[4] == 3
}

/// A stream whose first bytes are `head`, then `inner`'s.
#[derive(Debug)]
pub struct Replay<S> {
    head: [u8; LEN],
    served: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(head: [u8; LEN], inner: S) -> Self {
        Replay { head, served: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.served < LEN {
            let n = (LEN - self.served).min(buf.remaining());
            let start = self.served;
            buf.put_slice(&self.head[start..start + n]);
            self.served += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_protocol_id_chooses_sasl() {
        assert!(wants_sasl(b"AMQP\x03\x01\x00\x00"));
        assert!(!wants_sasl(b"AMQP\x00\x01\x00\x00"));
        assert!(!wants_sasl(b"GET / HT"));
    }

    #[tokio::test]
    async fn the_header_is_read_again_before_the_rest() {
        let rest: &[u8] = b"frames";
        let mut r = Replay::new(*b"AMQP\x00\x01\x00\x00", tokio::io::join(rest, tokio::io::sink()));
        let mut small = [0u8; 3];
        r.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"AMQ");
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"P\x00\x01\x00\x00frames");
    }
}
