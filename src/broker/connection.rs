//! The byte stream of one client connection: the socket, a read buffer that packets are
//! decoded from, and a write buffer that the protocol state (`conn.rs`) appends
//! packets to.
//!
//! Invariants:
//! - No buffers while idle: the read buffer is released when a read would block with it
//!   empty, the write buffer as soon as it has been written out. A connection without a
//!   read buffer reads into a stack buffer first and gets a heap buffer only for the
//!   bytes that arrived.
//! - Packets are decoded with [`mqtt::decode`]: the fixed header is checked against the
//!   maximum packet size before the body is buffered; "need more bytes" is `Ok(None)`.
//! - The first packet must be CONNECT [MQTT-3.1.0-1]: its first byte is checked as soon
//!   as it arrives, before any packet is decoded or buffer reserved, and its size is
//!   held to the CONNECT limit, far below the maximum packet size. A connection that
//!   has not logged in costs at most the first read and that limit.
//! - Buffered packets are not decoded while more than [`READ_PAUSE`] bytes wait to be
//!   written (the client does not read its acknowledgements), and nothing more is read
//!   then either, so a flooding client is held back by TCP.
//! - One value owns both directions; there is no split reader and writer, so the socket
//!   task polls reading and writing from one place.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::mqtt::{self, Packet, Protocol};

/// Reading stops while this much waits to be written.
const READ_PAUSE: usize = 256 * 1024;
/// The first byte of every valid CONNECT: packet type 1, no flags [MQTT-2.2.2-2].
const CONNECT_BYTE: u8 = 0x10;
/// Size of a read into a connection without a buffer.
const FIRST_READ: usize = 2048;
/// Reads at least this large keep the buffer for the next one.
const KEEP_BUFFER: usize = FIRST_READ;

/// A packet could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("{0}")]
    Malformed(#[source] mqtt::Error),
    /// The first packet is not CONNECT: the byte that showed it.
    #[error("first packet is not CONNECT (first byte 0x{0:02x})")]
    NotConnect(u8),
}

/// What [`Connection::poll_io`] got done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    /// Bytes arrived.
    Read(usize),
    /// Bytes of the write buffer went out.
    Wrote(usize),
    /// Everything written was flushed.
    Flushed,
    /// The client closed the connection or it failed.
    Closed,
}

/// The socket of one connection with its read and write buffers.
#[derive(Debug)]
pub(crate) struct Connection<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Connection<S> {
        Connection {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            unflushed: false,
        }
    }

    /// Reads the first packet, which must be a CONNECT of at most `max_connect` bytes.
    /// The first byte is checked as soon as it arrives. `Ok(None)` when the client
    /// closed the connection first.
    ///
    /// # Errors
    /// When reading fails, the first byte is not CONNECT's (0x10), or the bytes are not
    /// a valid CONNECT within the limit.
    pub async fn read_connect(
        &mut self,
        max_connect: usize,
    ) -> Result<Option<mqtt::Connect>, ReadError> {
        loop {
            if let Some(&first) = self.rbuf.first() {
                if first != CONNECT_BYTE {
                    return Err(ReadError::NotConnect(first));
                }
                let decoded = mqtt::decode(&mut self.rbuf, Protocol::V311, max_connect);
                match decoded.map_err(ReadError::Malformed)? {
                    Some(Packet::Connect(connect)) => return Ok(Some(connect)),
                    Some(_) => return Err(ReadError::NotConnect(first)),
                    None => {}
                }
            }
            let read = poll_fn(|cx| poll_read(Pin::new(&mut self.stream), cx, &mut self.rbuf));
            match read.await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// The next packet already buffered, unless the client is not taking our answers
    /// (more than [`READ_PAUSE`] bytes wait to be written). Reads nothing.
    ///
    /// # Errors
    /// When the buffered bytes are not a valid packet.
    pub fn buffered_packet(
        &mut self,
        protocol: Protocol,
        max_packet_size: usize,
    ) -> Result<Option<Packet>, mqtt::Error> {
        if self.rbuf.is_empty() || !self.reading() {
            return Ok(None);
        }
        mqtt::decode(&mut self.rbuf, protocol, max_packet_size)
    }

    /// Where packets for the client are appended.
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Bytes waiting to be written.
    pub fn pending(&self) -> usize {
        self.wbuf.len()
    }

    /// Whether reading goes on (the client takes what is written to it).
    pub fn reading(&self) -> bool {
        self.wbuf.len() < READ_PAUSE
    }

    /// Writes the whole write buffer out.
    ///
    /// # Errors
    /// When writing fails.
    pub async fn write_all(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf = BytesMut::new();
        Ok(())
    }

    /// Shuts the writing side down (flushing what is buffered below us, a TLS record).
    ///
    /// # Errors
    /// When the shutdown fails.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// One step of I/O, in this order: write what is buffered (or flush once it is all
    /// written), then read, unless reading is paused. `Pending` when neither can go on.
    pub fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Ready> {
        if !self.wbuf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ready::Closed),
                Poll::Ready(Ok(n)) => {
                    self.wrote(n);
                    return Poll::Ready(Ready::Wrote(n));
                }
                Poll::Pending => {}
            }
        } else if self.unflushed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    return Poll::Ready(Ready::Flushed);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ready::Closed),
                Poll::Pending => {}
            }
        }
        if self.reading() {
            match poll_read(Pin::new(&mut self.stream), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ready::Closed),
                Poll::Ready(Ok(n)) => return Poll::Ready(Ready::Read(n)),
                Poll::Pending => {
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
                        // Idle: give the buffer back.
                        self.rbuf = BytesMut::new();
                    }
                }
            }
        }
        Poll::Pending
    }

    fn wrote(&mut self, n: usize) {
        self.wbuf.advance(n);
        self.unflushed = true;
        if self.wbuf.is_empty() {
            // Idle connections keep no write buffer.
            self.wbuf = BytesMut::new();
        }
    }
}

/// Reads into `rbuf`. A connection without a buffer reads into a stack buffer first and
/// gets a heap buffer only for the bytes that arrived.
fn poll_read<S: AsyncRead>(
    stream: Pin<&mut S>,
    cx: &mut Context<'_>,
    rbuf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if rbuf.capacity() - rbuf.len() >= KEEP_BUFFER {
        return tokio_util::io::poll_read_buf(stream, cx, rbuf);
    }
    let mut tmp = [0u8; FIRST_READ];
    let mut buf = ReadBuf::new(&mut tmp);
    match stream.poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => {
            let n = buf.filled().len();
            if n == FIRST_READ {
                // More is likely on its way: read the rest straight into the heap.
                rbuf.reserve(4 * FIRST_READ);
            }
            rbuf.extend_from_slice(buf.filled());
            Poll::Ready(Ok(n))
        }
        other => other.map(|r| r.map(|()| 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The broker's side of a connection whose client wrote `bytes` and then went
    /// quiet (kept open).
    async fn fed(bytes: &[u8]) -> (Connection<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (broker, mut client) = tokio::io::duplex(4 << 20);
        client.write_all(bytes).await.unwrap();
        (Connection::new(broker), client)
    }

    /// Regression: the first packet was decoded with the maximum packet size, so a
    /// PUBLISH announcing 1 MB as the first packet had 1 MB reserved for it before its
    /// type was looked at.
    #[tokio::test]
    async fn a_first_byte_other_than_connect_is_refused_before_anything_is_buffered() {
        let mut announced = vec![0x30, 0xC0, 0x84, 0x3D];
        announced.extend(std::iter::repeat(b'x').take(100_000));
        let (mut io, _client) = fed(&announced).await;
        let read = io.read_connect(64 * 1024).await;
        assert!(matches!(read, Err(ReadError::NotConnect(0x30))), "{read:?}");
        // What one read brought, not the megabyte announced.
        assert!(
            io.rbuf.capacity() <= 5 * FIRST_READ,
            "{}",
            io.rbuf.capacity()
        );
    }

    #[tokio::test]
    async fn a_connect_over_the_connect_limit_is_refused_from_its_header() {
        let (mut io, _client) = fed(&[0x10, 0xC0, 0x9A, 0x0C, 0, 4]).await;
        let read = io.read_connect(64 * 1024).await;
        assert!(
            matches!(
                read,
                Err(ReadError::Malformed(mqtt::Error::PacketTooLarge { .. }))
            ),
            "{read:?}"
        );
        assert!(io.rbuf.capacity() <= FIRST_READ, "{}", io.rbuf.capacity());
    }

    #[tokio::test]
    async fn a_connect_in_pieces_is_read_whole() {
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        let (broker, mut client) = tokio::io::duplex(1024);
        let mut io = Connection::new(broker);
        let writer = tokio::spawn(async move {
            for byte in connect {
                client.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let read = io.read_connect(64 * 1024).await;
        assert!(matches!(read, Ok(Some(_))), "{read:?}");
        drop(writer.await);
    }
}
