//! Server-Sent Events framing, as much as forwarding needs: where events end, whether a
//! buffer holds a complete `data:` event, and the error event sent when a stream dies.

use bytes::Bytes;

/// The end of the last complete event in `buf` (the index just past its blank line), if
/// any. Events end with a blank line: `\n\n` or `\r\n\r\n`. Searched from the end.
pub fn last_event_end(buf: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'\n', buf)
        .find(|&i| {
            let before = &buf[..i];
            before.ends_with(b"\n") || before.ends_with(b"\n\r")
        })
        .map(|i| i + 1)
}

/// The lines of `buf`, split at `\n` (the last may be partial).
pub(crate) fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(buf);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b'\n', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Whether the complete events in `buf[..end]` include one with a `data:` line — the
/// first real output of a stream (comments and bare `event:` lines do not count).
pub fn has_data_event(events: &[u8]) -> bool {
    lines(events).any(|line| line.starts_with(b"data:"))
}

/// Counts `data:` lines other than `[DONE]` (roughly one per generated token on the
/// engines we front), for streams that carry no `usage` block.
pub fn count_data_events(events: &[u8]) -> u64 {
    lines(events)
        .filter(|line| {
            line.starts_with(b"data:") && !line.ends_with(b"[DONE]") && !line.ends_with(b"[DONE]\r")
        })
        .count() as u64
}

/// The event that ends a stream that failed after output started. No `[DONE]` follows, so
/// a client cannot mistake the cut for a complete answer.
pub fn error_event(message: &str, code: &str) -> Bytes {
    let body = super::error::error_json(message, "server_error", code);
    Bytes::from(format!("data: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_event_boundary() {
        assert_eq!(last_event_end(b"data: a"), None);
        assert_eq!(last_event_end(b"data: a\n\n"), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n\ndata: c"), Some(18));
        assert_eq!(last_event_end(b"data: a\r\n\r\nrest"), Some(11));
        assert_eq!(last_event_end(b""), None);
        assert_eq!(last_event_end(b"\n"), None);
        assert_eq!(last_event_end(b"\n\n"), Some(2));
        // A blank line more after an event: the boundary is after it.
        assert_eq!(last_event_end(b"data: a\n\n\n"), Some(10));
        assert_eq!(last_event_end(b"data: a\r\n\r\ndata: b\r\n"), Some(11));
    }

    #[test]
    fn data_events_are_told_from_comments() {
        assert!(!has_data_event(b": ping\n\n"));
        assert!(!has_data_event(b"event: start\n\n"));
        assert!(has_data_event(b": ping\n\ndata: {}\n\n"));
        assert_eq!(
            count_data_events(b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n"),
            2
        );
    }

    #[test]
    fn error_event_is_one_data_event() {
        let e = error_event("shard died", "upstream_error");
        assert!(e.starts_with(b"data: {\"error\":"));
        assert_eq!(last_event_end(&e), Some(e.len()));
    }
}
