//! A blocking reader over chunks an async task receives, for consumers
//! that need `std::io::Read` on a blocking thread (tar unpacking) while
//! the bytes arrive over the network.

use bytes::Bytes;
use tokio::sync::mpsc;

/// Reads, in order, the chunks sent on its channel; an `Err` chunk is
/// returned as the read's error, and the channel's end is end of file.
/// Call `read` only off the async runtime (`spawn_blocking`).
#[derive(Debug)]
pub struct ChunkReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    chunk: Bytes,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> ChunkReader {
        ChunkReader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(err)) => return Err(err),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn chunks_read_in_order_then_an_error_or_the_end() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"ab"))).unwrap();
        tx.try_send(Ok(Bytes::new())).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"cde"))).unwrap();
        drop(tx);
        let mut all = String::new();
        ChunkReader::new(rx).read_to_string(&mut all).unwrap();
        assert_eq!(all, "abcde");

        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"x"))).unwrap();
        tx.try_send(Err(std::io::Error::other("broken"))).unwrap();
        let mut reader = ChunkReader::new(rx);
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).unwrap(), 1);
        assert_eq!(reader.read(&mut buf).unwrap_err().to_string(), "broken");
    }
}
