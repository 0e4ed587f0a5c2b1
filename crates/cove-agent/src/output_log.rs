//! One output stream of a process as the agent holds it: the newest bytes
//! with their offsets in the stream. Large reads are kept as they were read
//! and handed to the frames that carry them without a copy; small ones are
//! gathered, so a trickle of tiny writes does not become a piece per write.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Reads at least this large are kept as read, sharing the read buffer.
const SHARE_MIN: usize = 4096;
/// Size at which gathered small writes become a piece of their own.
const GATHER: usize = 64 * 1024;

pub(crate) struct OutputLog {
    /// Held bytes before `gathered`, oldest first, each piece with its
    /// offset in the stream.
    pieces: VecDeque<(u64, Bytes)>,
    /// Small writes, after the pieces.
    gathered: Vec<u8>,
    /// Offset of the oldest byte held.
    start: u64,
    /// Bytes held, in the pieces and gathered.
    held: usize,
    /// Most bytes held at once.
    cap: usize,
    /// Bytes the process wrote (also those past `limit`).
    pub(crate) produced: u64,
    /// `max_output`: bytes past it are discarded.
    limit: Option<u64>,
    pub(crate) truncated: bool,
}

impl OutputLog {
    pub(crate) fn new(cap: usize, limit: Option<u64>) -> OutputLog {
        OutputLog {
            pieces: VecDeque::new(),
            gathered: Vec::new(),
            start: 0,
            held: 0,
            cap,
            produced: 0,
            limit,
            truncated: false,
        }
    }

    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    pub(crate) fn end(&self) -> u64 {
        self.start + self.held as u64
    }

    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Append what the process wrote; returns whether anything was kept.
    /// The log then keeps its newest `cap` bytes, except that nothing at or
    /// after `floor` (what a holding reader has not read) is ever dropped.
    pub(crate) fn append(&mut self, mut data: Bytes, floor: Option<u64>) -> bool {
        let len = data.len();
        self.produced += len as u64;
        let keep = match self.limit {
            Some(limit) => (limit.saturating_sub(self.end())).min(len as u64) as usize,
            None => len,
        };
        if keep < len {
            self.truncated = true;
            data.truncate(keep);
        }
        if keep == 0 {
            return false;
        }
        if keep < SHARE_MIN {
            self.gathered.extend_from_slice(&data);
            self.held += keep;
            if self.gathered.len() >= GATHER {
                self.seal();
            }
        } else {
            self.seal();
            self.pieces.push_back((self.end(), data));
            self.held += keep;
        }
        if self.held > self.cap {
            let oldest_kept = self.end() - self.cap as u64;
            self.trim_to(floor.map_or(oldest_kept, |f| f.min(oldest_kept)));
        }
        true
    }

    /// Make the gathered bytes a piece.
    fn seal(&mut self) {
        if self.gathered.is_empty() {
            return;
        }
        let offset = self.end() - self.gathered.len() as u64;
        // A mostly full buffer is handed over; a mostly empty one is
        // copied out, so a few bytes never pin a large allocation.
        let piece = if self.gathered.len() * 2 >= self.gathered.capacity() {
            Bytes::from(std::mem::take(&mut self.gathered))
        } else {
            let piece = Bytes::copy_from_slice(&self.gathered);
            self.gathered.clear();
            piece
        };
        self.pieces.push_back((offset, piece));
    }

    /// Copy a small log into one piece of its own, so that it no longer
    /// holds on to the larger read buffers its pieces were cut from (for a
    /// finished process kept for late readers).
    pub(crate) fn compact(&mut self) {
        if self.held > GATHER || self.pieces.len() + usize::from(!self.gathered.is_empty()) <= 1 {
            return;
        }
        let whole = self.read(self.start, self.held).concat();
        self.pieces.clear();
        self.gathered.clear();
        self.pieces.push_back((self.start, Bytes::from(whole)));
    }

    /// How much a pump may read (at most `most`) while a reader holds the
    /// process back (`floor` is what that reader has not read yet), or
    /// `None` when the reader is a full buffer behind. Bytes past
    /// `max_output` are discarded, so they need no room.
    pub(crate) fn room(&self, floor: u64, most: usize) -> Option<usize> {
        if self.limit.is_some_and(|l| self.end() >= l) {
            return Some(most);
        }
        let unread = self.end().saturating_sub(floor) as usize;
        let free = self.cap.saturating_sub(unread);
        (free > 0).then(|| free.min(most))
    }

    /// Forget everything before offset `to`.
    pub(crate) fn trim_to(&mut self, to: u64) {
        let to = to.clamp(self.start, self.end());
        while let Some((offset, piece)) = self.pieces.front_mut() {
            let piece_end = *offset + piece.len() as u64;
            if piece_end <= to {
                self.pieces.pop_front();
                continue;
            }
            if *offset < to {
                piece.advance((to - *offset) as usize);
                *offset = to;
            }
            break;
        }
        if self.pieces.is_empty() {
            let gathered_start = self.end() - self.gathered.len() as u64;
            if to > gathered_start {
                self.gathered.drain(..(to - gathered_start) as usize);
            }
        }
        self.held -= (to - self.start) as usize;
        self.start = to;
    }

    /// Up to `max` bytes from offset `from` (at least `start`), as the
    /// pieces that hold them.
    pub(crate) fn read(&self, from: u64, max: usize) -> Vec<Bytes> {
        let from = from.max(self.start);
        let until = from.saturating_add(max as u64).min(self.end());
        let mut parts = Vec::new();
        if from >= until {
            return parts;
        }
        let first = self
            .pieces
            .partition_point(|(offset, piece)| offset + piece.len() as u64 <= from);
        for (offset, piece) in self.pieces.range(first..) {
            if *offset >= until {
                break;
            }
            let a = (from.max(*offset) - offset) as usize;
            let b = (until.min(offset + piece.len() as u64) - offset) as usize;
            parts.push(piece.slice(a..b));
        }
        let gathered_start = self.end() - self.gathered.len() as u64;
        if until > gathered_start {
            let a = (from.max(gathered_start) - gathered_start) as usize;
            let b = (until - gathered_start) as usize;
            parts.push(Bytes::copy_from_slice(&self.gathered[a..b]));
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(log: &OutputLog, from: u64, max: usize) -> Vec<u8> {
        log.read(from, max).concat()
    }

    fn append(log: &mut OutputLog, data: &[u8], floor: Option<u64>) -> bool {
        log.append(Bytes::copy_from_slice(data), floor)
    }

    #[test]
    fn logs_keep_offsets_through_trims_and_drops() {
        let mut log = OutputLog::new(8, None);
        assert!(append(&mut log, b"hello", None));
        assert_eq!((log.start, log.end()), (0, 5));
        append(&mut log, b" world", None);
        // Over the cap: the oldest bytes go, offsets stay true.
        assert_eq!((log.start, log.end()), (3, 11));
        assert_eq!(read(&log, 3, 100), b"lo world");
        log.trim_to(9);
        assert_eq!(read(&log, 9, 100), b"ld");
        assert_eq!(log.produced, 11);
    }

    #[test]
    fn reads_of_mixed_pieces_are_exact_wherever_they_start_and_end() {
        // Small writes are gathered, large ones kept as pieces, and the cap
        // trims through both; every read must still return the stream.
        let sizes = [1, SHARE_MIN, 23, SHARE_MIN + 5, 3 * SHARE_MIN, 7, 2];
        let stream: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
        let mut log = OutputLog::new(5 * SHARE_MIN, None);
        let mut written = 0;
        for size in sizes.iter().cycle().take(40) {
            let piece = &stream[written..written + size];
            append(&mut log, piece, None);
            written += size;
            assert_eq!(log.end(), written as u64);
            assert_eq!(log.held(), (log.end() - log.start()) as usize);
            let step = (log.held() / 37).max(1);
            for from in (log.start..log.end()).step_by(step) {
                for max in [1, 7, SHARE_MIN, usize::MAX] {
                    let from_i = from as usize;
                    let end = from_i.saturating_add(max).min(written);
                    assert_eq!(read(&log, from, max), &stream[from_i..end], "{from} {max}");
                }
            }
        }
    }

    #[test]
    fn a_large_read_is_shared_not_copied() {
        let mut log = OutputLog::new(1 << 20, None);
        let data = Bytes::from(vec![7u8; 2 * SHARE_MIN]);
        log.append(data.clone(), None);
        let parts = log.read(SHARE_MIN as u64, 10);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].as_ptr(), data[SHARE_MIN..].as_ptr());
    }

    #[test]
    fn gathered_writes_become_pieces_of_their_own() {
        let mut log = OutputLog::new(1 << 20, None);
        for _ in 0..GATHER {
            append(&mut log, b"x", None);
        }
        assert_eq!((log.pieces.len(), log.gathered.len()), (1, 0));
        assert_eq!(read(&log, 0, usize::MAX).len(), GATHER);
    }

    #[test]
    fn a_small_log_compacts_into_one_piece_of_its_own() {
        let mut log = OutputLog::new(1 << 20, None);
        let read_buffer = Bytes::from(vec![1u8; 256 * 1024]);
        log.append(read_buffer.slice(..SHARE_MIN), None);
        append(&mut log, b"tail", None);
        log.trim_to(10);
        log.compact();
        assert_eq!(log.pieces.len(), 1);
        assert!(log.gathered.is_empty());
        let parts = log.read(10, usize::MAX);
        assert_eq!(parts.concat().len(), SHARE_MIN - 10 + 4);
        assert!(!read_buffer.as_ptr_range().contains(&parts[0].as_ptr()));
    }

    #[test]
    fn a_holding_reader_keeps_what_it_has_not_read() {
        let mut log = OutputLog::new(4, None);
        append(&mut log, b"abcd", Some(0));
        assert_eq!(log.room(0, 64), None, "a full buffer ahead of the reader");
        assert_eq!(log.room(2, 64), Some(2));
        append(&mut log, b"ef", Some(2));
        // Read bytes go first; the unread ones stay.
        assert_eq!((log.start, read(&log, 2, 10)), (2, b"cdef".to_vec()));
    }

    #[test]
    fn logs_cut_at_max_output() {
        let mut log = OutputLog::new(1024, Some(4));
        append(&mut log, b"abcdef", Some(0));
        assert_eq!(read(&log, 0, 100), b"abcd");
        assert!(log.truncated);
        assert!(!append(&mut log, b"more", Some(0)));
        assert_eq!(log.produced, 10);
    }
}
