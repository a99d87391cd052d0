//! Server-Sent Events framing, as much as forwarding needs: where events end, whether a
//! buffer holds the stream's first output, and the error event sent when a stream dies —
//! for both [`Dialect`]s.

use bytes::Bytes;

use super::request::Dialect;

/// The Responses events an engine sends before any output: the header is held back past
/// them, so a shard that fails after opening the response but before its first token is
/// retried like one that failed before answering.
const RESPONSES_PREAMBLE: [&[u8]; 5] = [
    b"response.created",
    b"response.in_progress",
    b"response.queued",
    b"response.output_item.added",
    b"response.content_part.added",
];

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
/// first real output of a chat stream (comments and bare `event:` lines do not count).
pub fn has_data_event(events: &[u8]) -> bool {
    lines(events).any(|line| line.starts_with(b"data:"))
}

/// Whether the complete events hold the stream's first output: for chat, any `data:`
/// event; for Responses, an event other than the lifecycle preamble (its name from the
/// `event:` line, or else the data's `type`).
pub fn has_output_event(events: &[u8], dialect: Dialect) -> bool {
    match dialect {
        Dialect::Chat => has_data_event(events),
        Dialect::Responses => split_events(events).any(|event| {
            let mut name = None;
            let mut data = None;
            for line in lines(event) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(v) = line.strip_prefix(b"event:") {
                    name = Some(v.trim_ascii());
                } else if let Some(v) = line.strip_prefix(b"data:") {
                    data = Some(v.trim_ascii());
                }
            }
            let Some(data) = data else {
                return false; // a comment or a bare event line
            };
            let typed;
            let name = match name {
                Some(n) => n,
                None => {
                    typed = event_type(data);
                    typed.as_deref().map_or(&b""[..], str::as_bytes)
                }
            };
            !RESPONSES_PREAMBLE.contains(&name)
        }),
    }
}

/// The `type` of an event's JSON data.
fn event_type(data: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_slice::<Typed>(data).ok().map(|t| t.kind)
}

/// The events of `buf` (each up to its blank line; the last may be partial).
fn split_events(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memmem::find(rest, b"\n\n").map_or(rest.len(), |i| i + 2);
        let (event, tail) = rest.split_at(end);
        rest = tail;
        Some(event)
    })
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

/// Counts the events that carry generated tokens: for chat every `data:` event but
/// `[DONE]`; for Responses the `*.delta` events (text, reasoning, tool arguments), not the
/// lifecycle ones around them.
pub fn count_output_events(events: &[u8], dialect: Dialect) -> u64 {
    match dialect {
        Dialect::Chat => count_data_events(events),
        Dialect::Responses => lines(events)
            .filter(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                line.starts_with(b"event:") && line.ends_with(b".delta")
            })
            .count() as u64,
    }
}

/// The event that ends a stream that failed after output started. No `[DONE]` (chat) or
/// `response.completed` (Responses) follows, so a client cannot mistake the cut for a
/// complete answer. A Responses stream gets its own `error` event, numbered after the
/// `events` already sent.
pub fn error_event(dialect: Dialect, message: &str, code: &str, events: u64) -> Bytes {
    match dialect {
        Dialect::Chat => {
            let body = super::error::error_json(message, "server_error", code);
            Bytes::from(format!("data: {body}\n\n"))
        }
        Dialect::Responses => {
            let body = serde_json::json!({
                "type": "error",
                "code": code,
                "message": message,
                "param": null,
                "sequence_number": events,
            });
            Bytes::from(format!("event: error\ndata: {body}\n\n"))
        }
    }
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
        let e = error_event(Dialect::Chat, "shard died", "upstream_error", 3);
        assert!(e.starts_with(b"data: {\"error\":"));
        assert_eq!(last_event_end(&e), Some(e.len()));
        let e = error_event(Dialect::Responses, "shard died", "upstream_error", 7);
        assert!(e.starts_with(b"event: error\ndata: {"));
        assert_eq!(last_event_end(&e), Some(e.len()));
        let data = e.strip_prefix(b"event: error\ndata: ").unwrap();
        let v: serde_json::Value = serde_json::from_slice(data.trim_ascii()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "upstream_error");
        assert_eq!(v["sequence_number"], 7);
    }

    #[test]
    fn a_responses_stream_commits_at_its_first_output_not_its_preamble() {
        let preamble = b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n\
event: response.in_progress\ndata: {\"type\":\"response.in_progress\"}\n\n\
event: response.output_item.added\ndata: {}\n\n\
event: response.content_part.added\r\ndata: {}\r\n\r\n";
        assert!(!has_output_event(preamble, Dialect::Responses));
        assert!(
            has_output_event(preamble, Dialect::Chat),
            "chat commits at any data"
        );
        let delta = b"event: response.output_text.delta\ndata: {\"delta\":\"hi\"}\n\n";
        assert!(has_output_event(delta, Dialect::Responses));
        // Without event lines, the data's type decides.
        assert!(!has_output_event(
            b"data: {\"type\":\"response.created\",\"response\":{}}\n\n",
            Dialect::Responses
        ));
        assert!(has_output_event(
            b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n",
            Dialect::Responses
        ));
        assert!(!has_output_event(b": keep-alive\n\n", Dialect::Responses));
        let mut all = preamble.to_vec();
        all.extend_from_slice(delta);
        all.extend_from_slice(b"event: response.completed\ndata: {}\n\n");
        assert_eq!(count_output_events(&all, Dialect::Responses), 1);
        assert_eq!(count_data_events(&all), 6);
    }
}
