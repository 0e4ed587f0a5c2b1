//! An incremental `text/event-stream` decoder: bytes in as they arrive,
//! whole events out.
//!
//! Lines end with `\n`, `\r\n` or `\r`; a blank line ends an event; `data`
//! lines are joined with `\n`; comments (`: heartbeat`) and unknown fields
//! are skipped, as the HTML standard's event-stream parsing says. The
//! buffer is scanned once with `memchr`, so a large event costs a few
//! passes over its bytes, not one per network read, and an event's one
//! `data` line (the usual case) comes out as a slice of the buffer, not a
//! copy.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event` field, `message` when absent.
    pub name: String,
    /// The `id` field of this event, if it had one.
    pub id: Option<String>,
    /// The `data` lines, joined with `\n`.
    pub data: Bytes,
}

/// The decoder's state between reads.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    /// Bytes from the start of the event being read.
    buf: BytesMut,
    /// Where the first line not yet parsed starts.
    pos: usize,
    /// How far past `pos` the buffer is known to hold no line end: a long
    /// line arriving in many reads is scanned once, not once per read.
    scanned: usize,
    name: Option<String>,
    id: Option<String>,
    /// The event's data: its first line's place in `buf`, and any further
    /// lines joined after a copy of it.
    first_data: Option<Range<usize>>,
    more_data: Vec<u8>,
}

impl SseDecoder {
    /// Add bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        // Lines parsed before any data (comments, `event`, `id`) are done with.
        if self.first_data.is_none() && self.pos > 0 {
            self.buf.advance(self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if the bytes so far hold one.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let rest = &self.buf[self.pos..];
            let Some(end) = memchr::memchr2(b'\n', b'\r', &rest[self.scanned..]) else {
                self.scanned = rest.len();
                return None;
            };
            let end = self.scanned + end;
            // A `\r` at the very end may be the first half of `\r\n`.
            let terminator = match (rest[end], rest.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.scanned = end;
                    return None;
                }
                _ => 1,
            };
            self.scanned = 0;
            let line_start = self.pos;
            self.pos += end + terminator;
            if end == 0 {
                if let Some(event) = self.dispatch() {
                    return Some(event);
                }
                continue;
            }
            self.field(line_start, end);
        }
    }

    /// Handle the field line at `buf[start..start + len]`.
    fn field(&mut self, start: usize, len: usize) {
        let line = &self.buf[start..start + len];
        if line[0] == b':' {
            return; // a comment
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = start + colon + 1..start + len;
                let space = usize::from(self.buf.get(value.start) == Some(&b' '));
                (&line[..colon], value.start + space..value.end)
            }
            None => (line, start + len..start + len),
        };
        match name {
            b"data" => match &self.first_data {
                None => self.first_data = Some(value),
                Some(first) => {
                    if self.more_data.is_empty() {
                        self.more_data.extend_from_slice(&self.buf[first.clone()]);
                    }
                    self.more_data.push(b'\n');
                    self.more_data.extend_from_slice(&self.buf[value]);
                }
            },
            b"event" => self.name = Some(String::from_utf8_lossy(&self.buf[value]).into_owned()),
            b"id" => self.id = Some(String::from_utf8_lossy(&self.buf[value]).into_owned()),
            _ => {}
        }
    }

    /// End of an event: hand it out, unless it had no data. The event's
    /// bytes leave the buffer, whose room is reused once they are dropped.
    fn dispatch(&mut self) -> Option<SseEvent> {
        let name = self.name.take();
        let id = self.id.take();
        let first = self.first_data.take();
        let more = std::mem::take(&mut self.more_data);
        let event = self.buf.split_to(self.pos).freeze();
        self.pos = 0;
        let first = first?;
        let data = if more.is_empty() {
            event.slice(first)
        } else {
            Bytes::from(more)
        };
        Some(SseEvent {
            name: name.unwrap_or_else(|| "message".to_string()),
            id,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(decoder: &mut SseDecoder) -> Vec<SseEvent> {
        std::iter::from_fn(|| decoder.next_event()).collect()
    }

    fn event(name: &str, id: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            name: name.into(),
            id: id.map(Into::into),
            data: Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b": heartbeat\n\nevent: stdout\nid: 2.0\ndata: {\"a\":1}\n\n\
                       event: exit\r\ndata: one\r\ndata:two\r\rdata: three\n\n";
        let expected = vec![
            event("stdout", Some("2.0"), "{\"a\":1}"),
            event("exit", None, "one\ntwo"),
            event("message", None, "three"),
        ];
        for split in 1..stream.len() {
            let mut decoder = SseDecoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(split) {
                decoder.push(piece);
                got.extend(all(&mut decoder));
            }
            assert_eq!(got, expected, "pieces of {split} bytes");
        }
    }

    #[test]
    fn a_long_line_in_many_reads_ends_at_its_first_terminator() {
        let payload = "x".repeat(100_000);
        let mut decoder = SseDecoder::default();
        let mut got = Vec::new();
        let stream = format!("event: stdout\ndata: {payload}\r\n\r\nevent: exit\ndata: 0\n\n");
        for piece in stream.as_bytes().chunks(997) {
            decoder.push(piece);
            got.extend(all(&mut decoder));
        }
        assert_eq!(
            got,
            vec![event("stdout", None, &payload), event("exit", None, "0")]
        );
    }

    #[test]
    fn an_event_without_data_is_skipped_and_an_unfinished_one_waits() {
        let mut decoder = SseDecoder::default();
        decoder.push(b"event: ping\nid: 7\n\nevent: stdout\ndata: x");
        assert_eq!(all(&mut decoder), vec![]);
        decoder.push(b"y\n");
        assert_eq!(all(&mut decoder), vec![]);
        decoder.push(b"\n");
        assert_eq!(all(&mut decoder), vec![event("stdout", None, "xy")]);
    }

    #[test]
    fn comments_with_no_event_do_not_pile_up() {
        let mut decoder = SseDecoder::default();
        for _ in 0..100_000 {
            decoder.push(b": heartbeat\n");
            assert_eq!(all(&mut decoder), vec![]);
        }
        assert!(decoder.buf.len() < 64, "{} bytes held", decoder.buf.len());
    }

    #[test]
    fn a_long_stream_does_not_grow_the_buffer() {
        let mut decoder = SseDecoder::default();
        let block = format!("event: stdout\ndata: {}\n\n", "z".repeat(1000));
        for _ in 0..10_000 {
            decoder.push(block.as_bytes());
            assert_eq!(all(&mut decoder).len(), 1);
        }
        assert!(decoder.buf.capacity() < 16 * block.len());
    }
}
