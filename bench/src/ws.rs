//! A minimal RFC 6455 client: the upgrade, server frames parsed in place from one read buffer, masked client frames.
//!
//! The generator's receive path is the ceiling of every fan-out measurement, so it does no more
//! than the protocol needs: one `read` fills the buffer with as many frames as the kernel has,
//! [`Conn::frames`] hands each text payload out as a borrowed slice (no allocation, no UTF-8
//! pass, no message object per frame), and only the partial frame at the end is moved.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A server frame larger than this ends the connection (a sync reply of 500 messages is ~150 KB).
pub const MAX_FRAME: usize = 16 << 20;
/// The read buffer's initial size; it grows only for a frame that does not fit.
const READ_BUF: usize = 8 << 10;

/// One complete server message, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Close,
}

/// A frame header: FIN, opcode, payload length, and where the payload starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub len: usize,
    pub offset: usize,
}

/// Parses the header at the start of `b`: `Ok(None)` when more bytes are needed.
pub fn header(b: &[u8]) -> Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[1] & 0x80 != 0 {
        bail!("a server frame is masked (RFC 6455 5.1)");
    }
    if b[0] & 0x70 != 0 {
        bail!("a server frame has RSV bits set (no extension was negotiated)");
    }
    let (len, offset) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            (
                usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                10,
            )
        }
        n => (usize::from(n), 2),
    };
    if len > MAX_FRAME {
        bail!("a server frame of {len} bytes is over the {MAX_FRAME}-byte limit");
    }
    Ok(Some(Header {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        len,
        offset,
    }))
}

/// Splits the complete frames at the front of `buf` into messages; returns the bytes consumed.
/// `frag` holds a fragmented text message across calls.
pub fn parse(buf: &[u8], frag: &mut Option<Vec<u8>>, mut on: impl FnMut(Msg<'_>)) -> Result<usize> {
    let mut at = 0;
    while let Some(h) = header(&buf[at..])? {
        let end = at + h.offset + h.len;
        if end > buf.len() {
            break;
        }
        let payload = &buf[at + h.offset..end];
        at = end;
        match (h.opcode, h.fin) {
            (1, true) if frag.is_none() => on(Msg::Text(payload)),
            (1, false) if frag.is_none() => *frag = Some(payload.to_vec()),
            (0, fin) => {
                let Some(f) = frag.as_mut() else {
                    bail!("a continuation frame without a message to continue");
                };
                f.extend_from_slice(payload);
                if f.len() > MAX_FRAME {
                    bail!("a fragmented message is over the {MAX_FRAME}-byte limit");
                }
                if fin && let Some(whole) = frag.take() {
                    on(Msg::Text(&whole));
                }
            }
            (1, _) => bail!("a new text message inside a fragmented one"),
            (2, _) => bail!("a binary frame (the protocols measured are text only)"),
            (8, _) => {
                on(Msg::Close);
                return Ok(at);
            }
            (9, _) => on(Msg::Ping(payload)),
            (10, _) => {}
            (op, _) => bail!("unknown opcode {op}"),
        }
    }
    Ok(at)
}

/// Appends a masked client frame (`opcode` 1 text, 10 pong) for `payload` to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key: [u8; 4] = rand::random();
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
}

/// An upgraded connection.
pub struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
    frag: Option<Vec<u8>>,
    out: Vec<u8>,
}

impl Conn {
    /// Upgrades `tcp` with a GET of `path` (which may carry a query); bytes after the 101 stay buffered.
    pub async fn upgrade(mut tcp: TcpStream, host: SocketAddr, path: &str) -> Result<Conn> {
        let key = generate_key();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(req.as_bytes())
            .await
            .context("sending the upgrade")?;
        let mut buf = Vec::with_capacity(READ_BUF);
        let head_end = loop {
            if let Some(p) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() >= 16 << 10 {
                bail!("upgrade response headers over 16 KiB");
            }
            if tcp.read_buf(&mut buf).await? == 0 {
                bail!("connection closed during the upgrade");
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {status}");
        }
        let want = derive_accept_key(key.as_bytes());
        let accepted = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
            })
        });
        if !accepted {
            bail!("upgrade response without the right Sec-WebSocket-Accept");
        }
        buf.drain(..head_end);
        Ok(Conn {
            tcp,
            buf,
            frag: None,
            out: Vec::new(),
        })
    }

    /// Reads what the kernel has (waiting for at least one byte); `Ok(0)` at end of stream.
    /// Cancel-safe: a cancelled read has read nothing.
    pub async fn read(&mut self) -> Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            // A frame longer than the buffer: grow to hold it whole (never past MAX_FRAME + header).
            let need = header(&self.buf)?.map_or(0, |h| h.offset + h.len);
            self.buf
                .reserve(need.max(self.buf.len() * 2).max(READ_BUF) - self.buf.len());
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = self.tcp.read_buf(&mut self.buf).await?;
        if n > 0 && n < spare {
            // A short read drained the socket: forget its readiness now rather than learn it
            // from a second read that fails with EAGAIN (one syscall less per wake-up). Safe on
            // edge-triggered epoll: data arriving after the read raises a new event.
            let _ = self.tcp.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
        }
        Ok(n)
    }

    /// Hands out every complete message read so far; keeps a partial frame for the next read.
    pub fn frames(&mut self, on: impl FnMut(Msg<'_>)) -> Result<()> {
        let used = parse(&self.buf, &mut self.frag, on)?;
        self.buf.drain(..used);
        Ok(())
    }

    /// The next text message, reading as needed (set-up and recovery only: it allocates).
    pub async fn next_text(&mut self) -> Result<String> {
        loop {
            // One frame at a time, so nothing after the message returned is consumed.
            while let Some(h) = header(&self.buf)? {
                let end = h.offset + h.len;
                if end > self.buf.len() {
                    break;
                }
                let (mut text, mut ping, mut closed) = (None, None, false);
                parse(&self.buf[..end], &mut self.frag, |m| match m {
                    Msg::Text(t) => text = Some(String::from_utf8_lossy(t).into_owned()),
                    Msg::Ping(p) => ping = Some(p.to_vec()),
                    Msg::Close => closed = true,
                })?;
                self.buf.drain(..end);
                if let Some(p) = ping {
                    self.pong(&p).await?;
                }
                if closed {
                    bail!("closed by the server");
                }
                if let Some(t) = text {
                    return Ok(t);
                }
            }
            if self.read().await? == 0 {
                bail!("connection ended");
            }
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.send(1, text.as_bytes()).await
    }

    /// Answers a WebSocket ping.
    pub async fn pong(&mut self, payload: &[u8]) -> Result<()> {
        self.send(10, payload).await
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        self.out.clear();
        encode(&mut self.out, opcode, payload);
        self.tcp.write_all(&self.out).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 65535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn collect(buf: &[u8], frag: &mut Option<Vec<u8>>) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let used = parse(buf, frag, |m| {
            out.push(match m {
                Msg::Text(t) => String::from_utf8_lossy(t).into_owned(),
                Msg::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                Msg::Close => "close".into(),
            })
        })
        .expect("valid frames");
        (out, used)
    }

    #[test]
    fn complete_frames_are_handed_out_and_a_partial_one_is_kept() {
        let mut buf = server_frame(1, true, b"one");
        buf.extend(server_frame(9, true, b"p"));
        let long = "x".repeat(300);
        buf.extend(server_frame(1, true, long.as_bytes()));
        let whole = buf.len();
        buf.extend(&server_frame(1, true, b"partial")[..4]);
        let (msgs, used) = collect(&buf, &mut None);
        assert_eq!(msgs, vec!["one".to_owned(), "ping:p".into(), long]);
        assert_eq!(used, whole);
    }

    #[test]
    fn lengths_of_all_three_sizes_parse() {
        for n in [0usize, 125, 126, 65535, 65536, 200_000] {
            let p = vec![b'a'; n];
            let (msgs, used) = collect(&server_frame(1, true, &p), &mut None);
            assert_eq!(msgs.len(), 1, "length {n}");
            assert_eq!(msgs[0].len(), n);
            assert_eq!(used, server_frame(1, true, &p).len());
        }
    }

    #[test]
    fn a_fragmented_message_is_joined_across_reads() {
        let mut frag = None;
        let a = server_frame(1, false, b"hel");
        let (m, used) = collect(&a, &mut frag);
        assert!(m.is_empty());
        assert_eq!(used, a.len());
        let mut b = server_frame(9, true, b"");
        b.extend(server_frame(0, true, b"lo"));
        let (m, _) = collect(&b, &mut frag);
        assert_eq!(m, vec!["ping:".to_owned(), "hello".into()]);
        assert!(frag.is_none());
    }

    #[test]
    fn masked_rsv_oversized_and_binary_frames_are_refused() {
        assert!(header(&[0x81, 0x81, 0, 0, 0, 0, b'x']).is_err());
        assert!(header(&[0xC1, 0x01, b'x']).is_err());
        let mut big = vec![0x81, 127];
        big.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        assert!(header(&big).is_err());
        assert!(parse(&server_frame(2, true, b"b"), &mut None, |_| {}).is_err());
        assert!(parse(&server_frame(0, true, b"c"), &mut None, |_| {}).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for n in [3usize, 200, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode(&mut out, 1, &payload);
            assert_eq!(out[0], 0x81);
            assert_ne!(out[1] & 0x80, 0, "mask bit");
            let (len, at) = match out[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([out[2], out[3]])), 4),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&out[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                l => (usize::from(l), 2),
            };
            assert_eq!(len, n);
            let key = &out[at..at + 4];
            let un: Vec<u8> = out[at + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i & 3])
                .collect();
            assert_eq!(un, payload);
        }
    }
}
