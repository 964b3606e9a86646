//! The generator's receive path: a `new_message` frame is recognised and scanned for its stamp and seq, nothing more.
//!
//! Everything else a server sends (acks, pings, `user_joined`, …) is rare and goes to the cold
//! path in the worker, which copies and parses it. [`Tally`] keeps one read's deliveries and
//! records their latencies into the histogram in one batch, so the cost per delivery is a prefix
//! check, two short substring scans and a push. `confab-bench recv-bench` measures it.

use std::time::Instant;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use memchr::memmem;

use crate::wire::Transport;
use crate::ws;

/// What a delivery frame carries that the generator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Scheduled send time stamped into the content (Unix ns); 0 when the frame has none.
    pub stamp: u64,
    /// The message's seq; 0 when the frame has none.
    pub seq: u64,
}

fn digits(b: &[u8]) -> u64 {
    let mut n: u64 = 0;
    for &c in b.iter().take(20) {
        if !c.is_ascii_digit() {
            break;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
    }
    n
}

fn after<'a>(frame: &'a [u8], pat: &memmem::Finder<'_>) -> Option<&'a [u8]> {
    pat.find(frame).map(|at| &frame[at + pat.needle().len()..])
}

/// Substring finders built once (a `Finder` pre-computes its search state).
pub struct Scanner {
    stamp: memmem::Finder<'static>,
    seq: memmem::Finder<'static>,
    ws_type: memmem::Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            stamp: memmem::Finder::new(b"~T"),
            seq: memmem::Finder::new(b"\"seq\":"),
            ws_type: memmem::Finder::new(b"\"type\":\"new_message\""),
        }
    }
}

impl Scanner {
    /// `Some` for a `new_message` frame (Socket.IO `42["new_message",…]`, or a `/ws` frame whose
    /// `type` is `new_message`, wherever the server put that field); `None` for anything else.
    /// A raw `"type":"new_message"` cannot occur inside a JSON string (its quotes would be escaped).
    pub fn delivery(&self, t: Transport, frame: &[u8]) -> Option<Delivery> {
        let is = match t {
            Transport::Sio => frame.starts_with(b"42[\"new_message\","),
            Transport::Ws => {
                frame.starts_with(b"{\"type\":\"new_message\"")
                    || frame.ends_with(b"\"type\":\"new_message\"}")
                    || self.ws_type.find(frame).is_some()
            }
        };
        if !is {
            return None;
        }
        Some(Delivery {
            stamp: after(frame, &self.stamp).map_or(0, digits),
            seq: after(frame, &self.seq).map_or(0, digits),
        })
    }
}

/// One read's deliveries, folded into the worker's counters and histogram at once.
#[derive(Default)]
pub struct Tally {
    /// Deliveries of the current round in this batch.
    pub received: u64,
    /// Deliveries stamped before the current round started (a previous round's backlog).
    pub stale: u64,
    lats_us: Vec<u64>,
}

impl Tally {
    /// Counts one delivery received at `now_ns` (Unix ns) in a round that started at `round_ns`.
    #[inline]
    pub fn delivery(&mut self, d: Delivery, now_ns: u64, round_ns: u64) {
        if d.stamp >= round_ns && d.stamp > 0 {
            self.received += 1;
            self.lats_us
                .push((now_ns.saturating_sub(d.stamp) / 1000).max(1));
        } else {
            self.stale += 1;
        }
    }

    /// Records the batch's latencies and empties it; returns (received, stale).
    pub fn flush(&mut self, hist: &mut Histogram<u64>) -> (u64, u64) {
        for &l in &self.lats_us {
            hist.saturating_record(l);
        }
        self.lats_us.clear();
        let out = (self.received, self.stale);
        self.received = 0;
        self.stale = 0;
        out
    }
}

/// Frames recorded from the servers measured (one text payload per line), by server and transport;
/// `bench/fixtures/frames/capture.mjs` records them again.
pub const RECORDED: [(&str, Transport, &str); 4] = [
    (
        "Confab socket.io",
        Transport::Sio,
        include_str!("../fixtures/frames/confab-socketio.txt"),
    ),
    (
        "Confab /ws",
        Transport::Ws,
        include_str!("../fixtures/frames/confab-ws.txt"),
    ),
    (
        "Node socket.io",
        Transport::Sio,
        include_str!("../fixtures/frames/node-socketio.txt"),
    ),
    (
        "bare /ws",
        Transport::Ws,
        include_str!("../fixtures/frames/bare-ws.txt"),
    ),
];

/// `confab-bench recv-bench`: the receive path (WebSocket framing, scan, tally, histogram) over
/// recorded frames, read in `read_bytes` chunks as the kernel hands them out; prints frames/s.
pub fn bench(frames: usize, read_bytes: usize) -> Result<Vec<(String, f64, usize)>> {
    let scanner = Scanner::default();
    let mut out = Vec::new();
    for (name, transport, text) in RECORDED {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        anyhow::ensure!(!lines.is_empty(), "no recorded frames for {name}");
        // Stamps must be in the round: rewrite each frame's stamp to a recent time.
        let now = crate::worker::unix_nanos();
        let mut stream = Vec::new();
        let mut n = 0;
        while n < frames {
            for l in &lines {
                let l = restamp(l, now);
                server_frame(&mut stream, l.as_bytes());
                n += 1;
            }
        }
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")?;
        let mut tally = Tally::default();
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        let mut frag = None;
        let mut cold = 0usize;
        let t0 = Instant::now();
        let mut received = 0u64;
        for chunk in stream.chunks(read_bytes) {
            // What a read does: append to the connection's buffer.
            buf.extend_from_slice(chunk);
            let now_ns = crate::worker::unix_nanos();
            let used = ws::parse(&buf, &mut frag, |m| {
                if let ws::Msg::Text(t) = m {
                    match scanner.delivery(transport, t) {
                        Some(d) => tally.delivery(d, now_ns, now - 1),
                        None => cold += 1,
                    }
                }
            })?;
            buf.drain(..used);
            received += tally.flush(&mut hist).0;
        }
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            received as usize == n && cold == 0,
            "{name}: {received} of {n} frames recognised as deliveries ({cold} not)"
        );
        let avg = stream.len() / n;
        out.push((name.to_owned(), n as f64 / secs, avg));
    }
    Ok(out)
}

fn restamp(line: &str, now: u64) -> String {
    match line.find("~T") {
        Some(at) => {
            let rest = &line[at + 2..];
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            format!("{}~T{now}{}", &line[..at], &rest[n..])
        }
        None => line.to_owned(),
    }
}

/// An unmasked server frame, as a server writes it.
pub fn server_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recorded_frame_is_a_delivery_with_its_stamp_and_seq() {
        let s = Scanner::default();
        for (name, t, text) in RECORDED {
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                let d = s
                    .delivery(t, l.as_bytes())
                    .unwrap_or_else(|| panic!("{name}: {l}"));
                assert!(d.stamp > 1_700_000_000_000_000_000, "{name}: stamp of {l}");
                assert!(d.seq > 0, "{name}: seq of {l}");
            }
        }
    }

    #[test]
    fn stamp_and_seq_are_read_wherever_the_fields_are() {
        let s = Scanner::default();
        let ws_last = br#"{"payload":{"content":"bench ~T1700000000000000042~ #3","seq":17},"type":"new_message"}"#;
        assert_eq!(
            s.delivery(Transport::Ws, ws_last),
            Some(Delivery {
                stamp: 1_700_000_000_000_000_042,
                seq: 17
            })
        );
        let sio = br#"42["new_message",{"seq":5,"lastSeq":9,"content":"bench ~T1700000000000000001~ #1"}]"#;
        assert_eq!(
            s.delivery(Transport::Sio, sio),
            Some(Delivery {
                stamp: 1_700_000_000_000_000_001,
                seq: 5
            })
        );
    }

    #[test]
    fn the_generators_stamp_reads_back_from_a_delivery() {
        let content = crate::wire::stamp(1_764_630_000_123_456_789, 4);
        let frame = format!(r#"42["new_message",{{"content":"{content}","seq":9}}]"#);
        assert_eq!(
            Scanner::default().delivery(Transport::Sio, frame.as_bytes()),
            Some(Delivery {
                stamp: 1_764_630_000_123_456_789,
                seq: 9
            })
        );
    }

    #[test]
    fn other_frames_go_to_the_cold_path() {
        let s = Scanner::default();
        assert_eq!(s.delivery(Transport::Sio, b"2"), None);
        assert_eq!(
            s.delivery(Transport::Sio, br#"431[{"message":{"seq":3}}]"#),
            None
        );
        assert_eq!(
            s.delivery(Transport::Sio, br#"42["user_joined",{"userId":"u"}]"#),
            None
        );
        assert_eq!(
            s.delivery(
                Transport::Ws,
                br#"{"type":"ack","id":1,"payload":{"seq":3}}"#
            ),
            None
        );
        // The event name inside a string is escaped, so it is not a match.
        assert_eq!(
            s.delivery(
                Transport::Ws,
                br#"{"type":"user_joined","payload":{"name":"\"type\":\"new_message\""}}"#
            ),
            None
        );
    }

    #[test]
    fn a_previous_rounds_delivery_is_stale_and_not_recorded() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
        let mut t = Tally::default();
        let round = 2_000_000_000;
        t.delivery(
            Delivery {
                stamp: round + 5_000_000,
                seq: 1,
            },
            round + 7_000_000,
            round,
        );
        t.delivery(
            Delivery {
                stamp: round - 1,
                seq: 2,
            },
            round + 7_000_000,
            round,
        );
        t.delivery(Delivery { stamp: 0, seq: 3 }, round + 7_000_000, round);
        assert_eq!(t.flush(&mut h), (1, 2));
        assert_eq!(h.len(), 1);
        assert_eq!(h.max(), 2000);
        assert_eq!(t.flush(&mut h), (0, 0));
    }

    #[test]
    fn the_bench_reads_every_frame_of_every_server() {
        let r = bench(2_000, 4096).expect("bench runs");
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|(_, rate, avg)| *rate > 0.0 && *avg > 20));
    }
}
