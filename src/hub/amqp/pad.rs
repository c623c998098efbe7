//! Writes every AMQP performative with all of its fields. AMQP 1.0 lets an encoder drop trailing
//! null or default fields of a performative's list (part 1, section 1.4), and `fe2o3-amqp` does;
//! Azure's brokers never do, and Microsoft's Python AMQP stack (`azure-eventhub`'s pyamqp, also
//! used by `azure-servicebus`) reads performatives by position: an `open` without `properties`,
//! a `detach` without `error` or a `transfer` without `batchable` breaks it (`IndexError`). This
//! wrapper sits between the library and the TLS stream and, frame by frame, appends the omitted
//! trailing fields as explicit nulls, which every conforming reader takes as the same frame.
//! It never changes a field, a payload or the SASL layer; a frame it does not recognise passes
//! unchanged.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The number of fields of each performative (AMQP 1.0 part 2, section 2.7), by descriptor code.
fn full_count(code: u8) -> Option<usize> {
    Some(match code {
        0x10 => 10, // open
        0x11 => 8,  // begin
        0x12 => 14, // attach
        0x13 => 11, // flow
        0x14 => 11, // transfer
        0x15 => 6,  // disposition
        0x16 => 3,  // detach
        0x17 => 1,  // end
        0x18 => 1,  // close
        _ => return None,
    })
}

/// The frame with its performative's list padded to the full field count, or `None` when it is
/// not an AMQP performative frame this knows or needs no padding.
pub fn pad_frame(frame: &[u8]) -> Option<Vec<u8>> {
    let doff = usize::from(*frame.get(4)?) * 4;
    if frame.get(5) != Some(&0) || doff < 8 || frame.len() <= doff {
        return None;
    }
    let body = &frame[doff..];
    // A performative is a described list: 0x00, then the descriptor as smallulong (0x53 code).
    let (&[0x00, 0x53, code], rest) = body.split_first_chunk::<3>()? else { return None };
    let full = full_count(code)?;
    let (count, fields_start, fields_len) = match rest.first()? {
        0x45 => (0usize, 1usize, 0usize),
        0xc0 => {
            let size = usize::from(*rest.get(1)?);
            (usize::from(*rest.get(2)?), 3, size.checked_sub(1)?)
        }
        0xd0 => {
            let size = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(rest.get(5..9)?.try_into().ok()?) as usize;
            (count, 9, size.checked_sub(4)?)
        }
        _ => return None,
    };
    if count >= full {
        return None;
    }
    let fields = rest.get(fields_start..fields_start.checked_add(fields_len)?)?;
    let after = &rest[fields_start + fields_len..];
    let mut list = Vec::with_capacity(fields.len() + full + 9);
    let new_len = fields.len() + (full - count);
    if new_len < 255 {
        list.push(0xc0);
        list.push((new_len + 1) as u8);
        list.push(full as u8);
    } else {
        list.push(0xd0);
        list.extend_from_slice(&((new_len + 4) as u32).to_be_bytes());
        list.extend_from_slice(&(full as u32).to_be_bytes());
    }
    list.extend_from_slice(fields);
    list.resize(list.len() + (full - count), 0x40);
    let mut out = Vec::with_capacity(doff + 3 + list.len() + after.len());
    out.extend_from_slice(&frame[..doff]);
    out.extend_from_slice(&[0x00, 0x53, code]);
    out.extend_from_slice(&list);
    out.extend_from_slice(after);
    let size = u32::try_from(out.len()).ok()?;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Some(out)
}

/// The stream wrapper: reads pass through; writes are split into protocol headers and frames,
/// frames padded, and handed to the inner stream in order. At most one frame's worth of bytes
/// waits unwritten before a write returns `Pending`.
#[derive(Debug)]
pub struct PadPerformatives<S> {
    inner: S,
    /// Bytes the library wrote that do not yet make up a whole header or frame.
    pending: Vec<u8>,
    /// Bytes ready for the inner stream.
    out: Vec<u8>,
    written: usize,
}

impl<S> PadPerformatives<S> {
    pub fn new(inner: S) -> Self {
        PadPerformatives { inner, pending: Vec::new(), out: Vec::new(), written: 0 }
    }

    /// Moves every complete protocol header and frame from `pending` to `out`.
    fn split(&mut self) {
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            let unit = if rest.starts_with(b"AMQP") {
                8
            } else if rest.len() >= 4 {
                let size = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                size.max(8)
            } else {
                break;
            };
            if rest.len() < unit {
                break;
            }
            let piece = &rest[..unit];
            match pad_frame(piece) {
                Some(padded) => self.out.extend_from_slice(&padded),
                None => self.out.extend_from_slice(piece),
            }
            at += unit;
        }
        self.pending.drain(..at);
    }
}

impl<S: AsyncWrite + Unpin> PadPerformatives<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PadPerformatives<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PadPerformatives<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        self.pending.extend_from_slice(buf);
        self.split();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 1]);
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn a_detach_without_error_gets_its_null_error_field() {
        // detach(handle=0, closed=true): list8 of 2 fields.
        let short = frame(&[0x00, 0x53, 0x16, 0xc0, 0x03, 0x02, 0x43, 0x41]);
        let padded = pad_frame(&short).unwrap();
        assert_eq!(padded, frame(&[0x00, 0x53, 0x16, 0xc0, 0x04, 0x03, 0x43, 0x41, 0x40]));
    }

    #[test]
    fn an_empty_close_and_a_transfer_keep_what_follows_the_list() {
        let close = frame(&[0x00, 0x53, 0x18, 0x45]);
        assert_eq!(pad_frame(&close).unwrap(), frame(&[0x00, 0x53, 0x18, 0xc0, 0x02, 0x01, 0x40]));
        // transfer(handle=0) then a payload of two bytes.
        let t = frame(&[0x00, 0x53, 0x14, 0xc0, 0x02, 0x01, 0x43, 0xAA, 0xBB]);
        let p = pad_frame(&t).unwrap();
        let mut want = vec![0x00, 0x53, 0x14, 0xc0, 12, 11, 0x43];
        want.extend_from_slice(&[0x40; 10]);
        want.extend_from_slice(&[0xAA, 0xBB]);
        assert_eq!(p, frame(&want));
    }

    #[test]
    fn full_frames_sasl_frames_and_unknown_bodies_pass_unchanged() {
        let full_detach = frame(&[0x00, 0x53, 0x16, 0xc0, 0x04, 0x03, 0x43, 0x41, 0x40]);
        assert_eq!(pad_frame(&full_detach), None);
        let mut sasl = frame(&[0x00, 0x53, 0x44, 0x45]);
        sasl[5] = 1;
        assert_eq!(pad_frame(&sasl), None);
        assert_eq!(pad_frame(&frame(&[])), None, "an empty (heartbeat) frame");
        assert_eq!(pad_frame(&frame(&[0x00, 0x53])), None, "truncated");
        assert_eq!(pad_frame(&frame(&[0x00, 0x53, 0x16, 0xc0, 0x09, 0x02])), None, "a list longer than the frame");
    }

    #[tokio::test]
    async fn the_stream_pads_frames_split_across_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = PadPerformatives::new(a);
        let close = frame(&[0x00, 0x53, 0x18, 0x45]);
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend_from_slice(&close);
        for chunk in bytes.chunks(3) {
            w.write_all(chunk).await.unwrap();
        }
        w.flush().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let mut want = b"AMQP\x00\x01\x00\x00".to_vec();
        want.extend_from_slice(&frame(&[0x00, 0x53, 0x18, 0xc0, 0x02, 0x01, 0x40]));
        assert_eq!(got, want);
    }
}
