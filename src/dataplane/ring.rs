//! A background process's output (pure): one byte-offset space over stdout and stderr
//! together, kept in a bounded ring of frames. A reader asks for everything from an offset;
//! when the ring has already dropped part of that, the answer says how many bytes were lost
//! and goes on from the oldest kept byte, so a reader that reattaches with the offset it last
//! saw gets no gap it is not told about and no byte twice.

use std::collections::VecDeque;

use bytes::Bytes;

/// Which stream a frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Output written at `offset` (bytes before it, over both streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub offset: u64,
    pub stream: Stream,
    pub data: Bytes,
}

impl Frame {
    /// The offset just past this frame: where a reader that saw it goes on.
    pub fn next(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// What a read from an offset found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Bytes between the offset asked for and the oldest kept byte: dropped before the
    /// reader came (0 when nothing was missed).
    pub dropped_bytes: u64,
    pub frames: Vec<Frame>,
    /// Where the next read goes on (the end of the output so far).
    pub next: u64,
}

/// The ring: at most `capacity` bytes of the newest output.
#[derive(Debug)]
pub struct OutputRing {
    capacity: usize,
    frames: VecDeque<Frame>,
    kept: usize,
    /// Offset of the first kept byte.
    start: u64,
    /// Offset past the last byte written.
    end: u64,
}

impl OutputRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            frames: VecDeque::new(),
            kept: 0,
            start: 0,
            end: 0,
        }
    }

    /// Every byte ever written (kept or not).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes dropped from the front so far.
    pub fn dropped(&self) -> u64 {
        self.start
    }

    /// Appends a frame, dropping the oldest output past the capacity (a frame larger than
    /// the whole ring keeps only its tail).
    pub fn push(&mut self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut frame = Frame {
            offset: self.end,
            stream,
            data,
        };
        self.end = frame.next();
        if frame.data.len() > self.capacity {
            let cut = frame.data.len() - self.capacity;
            frame.data = frame.data.slice(cut..);
            frame.offset += cut as u64;
            self.frames.clear();
            self.kept = 0;
        }
        self.kept += frame.data.len();
        self.frames.push_back(frame);
        while self.kept > self.capacity {
            let over = self.kept - self.capacity;
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.data.len() <= over {
                self.kept -= front.data.len();
                self.frames.pop_front();
            } else {
                front.data = front.data.slice(over..);
                front.offset += over as u64;
                self.kept -= over;
            }
        }
        self.start = self.frames.front().map_or(self.end, |f| f.offset);
    }

    /// Everything kept from `since` on (a frame that `since` falls inside comes from there).
    /// An offset past the end reads nothing and goes on from the end.
    pub fn read_from(&self, since: u64) -> Read {
        let from = since.min(self.end);
        let dropped_bytes = self.start.saturating_sub(from);
        let frames = self
            .frames
            .iter()
            .filter(|f| f.next() > from)
            .map(|f| {
                if f.offset >= from {
                    f.clone()
                } else {
                    let skip = (from - f.offset) as usize;
                    Frame {
                        offset: from,
                        stream: f.stream,
                        data: f.data.slice(skip..),
                    }
                }
            })
            .collect();
        Read {
            dropped_bytes,
            frames,
            next: self.end,
        }
    }
}

/// Prepended to a process's or terminal's command (`sh -c PID_WRAPPER sh argv…`): prints
/// the shell's pid as the first line, then becomes the command (same pid, same stdin).
pub const PID_WRAPPER: &str = "echo $$; exec \"$@\"";

/// The first line of a process's stdout is its pid (the wrapper's `echo $$` before it
/// `exec`s the command): this takes it off, and passes the rest through.
#[derive(Debug, Default)]
pub struct PidLine {
    pending: Vec<u8>,
    done: bool,
}

impl PidLine {
    /// Feeds stdout; returns the pid once its line is complete (once), and the output
    /// that follows it.
    pub fn feed(&mut self, data: Bytes) -> (Option<Option<u32>>, Bytes) {
        if self.done {
            return (None, data);
        }
        match data.iter().position(|b| *b == b'\n') {
            Some(nl) => {
                self.pending.extend_from_slice(&data[..nl]);
                self.done = true;
                let pid = std::str::from_utf8(&self.pending)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                self.pending = Vec::new();
                (Some(pid), data.slice(nl + 1..))
            }
            None => {
                self.pending.extend_from_slice(&data);
                // Never hold more than a pid's worth: anything longer is output.
                if self.pending.len() > 32 {
                    self.done = true;
                    return (Some(None), Bytes::from(std::mem::take(&mut self.pending)));
                }
                (None, Bytes::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Read) -> String {
        r.frames
            .iter()
            .map(|f| String::from_utf8_lossy(&f.data).into_owned())
            .collect()
    }

    #[test]
    fn reads_from_any_offset_without_gaps_or_repeats() {
        let mut ring = OutputRing::new(100);
        ring.push(Stream::Stdout, Bytes::from_static(b"hello "));
        ring.push(Stream::Stderr, Bytes::from_static(b"oops "));
        ring.push(Stream::Stdout, Bytes::from_static(b"world"));
        let all = ring.read_from(0);
        assert_eq!(text(&all), "hello oops world");
        assert_eq!((all.dropped_bytes, all.next), (0, 16));
        assert_eq!(all.frames[1].stream, Stream::Stderr);
        // A reader that saw "hello oo" goes on at 8.
        let rest = ring.read_from(8);
        assert_eq!(text(&rest), "ps world");
        assert_eq!(rest.frames[0].offset, 8);
        assert_eq!(rest.frames[0].stream, Stream::Stderr);
        assert!(ring.read_from(16).frames.is_empty());
        assert_eq!(ring.read_from(99).next, 16);
    }

    #[test]
    fn a_full_ring_drops_the_oldest_and_says_how_much_a_reader_missed() {
        let mut ring = OutputRing::new(10);
        for chunk in ["0123", "4567", "89ab", "cdef"] {
            ring.push(Stream::Stdout, Bytes::copy_from_slice(chunk.as_bytes()));
        }
        assert_eq!(ring.end(), 16);
        assert_eq!(ring.dropped(), 6);
        let r = ring.read_from(2);
        assert_eq!(r.dropped_bytes, 4);
        assert_eq!(text(&r), "6789abcdef");
        assert_eq!(r.frames[0].offset, 6);
        // Caught up: nothing missed.
        assert_eq!(ring.read_from(12).dropped_bytes, 0);
        assert_eq!(text(&ring.read_from(12)), "cdef");
    }

    #[test]
    fn a_frame_larger_than_the_ring_keeps_its_tail() {
        let mut ring = OutputRing::new(4);
        ring.push(Stream::Stdout, Bytes::from_static(b"ab"));
        ring.push(Stream::Stderr, Bytes::from_static(b"0123456789"));
        let r = ring.read_from(0);
        assert_eq!(r.dropped_bytes, 8);
        assert_eq!(text(&r), "6789");
        assert_eq!(r.next, 12);
        ring.push(Stream::Stdout, Bytes::new());
        assert_eq!(ring.end(), 12);
    }

    #[test]
    fn the_pid_line_is_taken_off_stdout() {
        let mut p = PidLine::default();
        assert_eq!(p.feed(Bytes::from_static(b"4")), (None, Bytes::new()));
        assert_eq!(
            p.feed(Bytes::from_static(b"2\nhello")),
            (Some(Some(42)), Bytes::from_static(b"hello"))
        );
        assert_eq!(
            p.feed(Bytes::from_static(b"\nmore")),
            (None, Bytes::from_static(b"\nmore"))
        );
        let mut junk = PidLine::default();
        let (pid, rest) = junk.feed(Bytes::from_static(
            b"not a pid at all, much longer than 32 bytes",
        ));
        assert_eq!(pid, Some(None));
        assert_eq!(rest.len(), 43);
    }
}
