//! HTTP/1.1 framing for the upstream leg, as pure functions over byte buffers: the request
//! head the gateway writes, the response head it parses (with `httparse`), and the body
//! decoder (`Content-Length`, chunked, or until the connection closes).

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue};

/// Largest response head accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most response header fields accepted.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size plus extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Most trailer bytes accepted after the last chunk.
const MAX_TRAILER_BYTES: usize = 16 << 10;

/// A response that does not follow HTTP/1.1's framing rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed response head: {0}")]
    Head(String),
    /// The head is longer than [`MAX_HEAD_BYTES`].
    #[error("response head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// `Content-Length` is not one non-negative number.
    #[error("invalid content-length")]
    ContentLength,
    /// The chunked encoding is broken.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    /// The connection closed before the body's declared end.
    #[error("connection closed before the end of the body")]
    Truncated,
}

/// Writes an origin-form `POST` request head: request line, `host`, the given fields, the
/// request id, the attempt's `traceparent` and `content-length`. Values come from already-parsed requests, so they
/// hold no CR or LF.
pub fn request_head<'a>(
    method: &str,
    path_and_query: &str,
    authority: &str,
    fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    request_id: &str,
    traceparent: &[u8],
    content_length: usize,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(method.as_bytes());
    h.push(b' ');
    h.extend_from_slice(path_and_query.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    h.extend_from_slice(authority.as_bytes());
    for (name, value) in fields {
        h.extend_from_slice(b"\r\n");
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
    }
    h.extend_from_slice(b"\r\nx-request-id: ");
    h.extend_from_slice(request_id.as_bytes());
    h.extend_from_slice(b"\r\ntraceparent: ");
    h.extend_from_slice(traceparent);
    h.extend_from_slice(b"\r\ncontent-length: ");
    h.extend_from_slice(itoa::Buffer::new().format(content_length).as_bytes());
    h.extend_from_slice(b"\r\n\r\n");
    h
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// What the gateway needs from a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, when sent.
    pub content_type: Option<HeaderValue>,
    /// How the body is delimited.
    pub body: BodyKind,
    /// Whether the connection may carry another request afterwards.
    pub keep_alive: bool,
}

/// Parses a final response head from the front of `buf`, removing it (and any interim 1xx
/// heads before it). `Ok(None)`: more bytes are needed.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, FramingError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(FramingError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(FramingError::Head(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 {
            buf.advance(len);
            continue; // an interim answer (100 Continue, 103 Early Hints): the final one follows
        }
        let head = interpret(status, resp.version == Some(1), resp.headers)?;
        buf.advance(len);
        return Ok(Some(head));
    }
}

fn interpret(
    status: u16,
    http11: bool,
    fields: &[httparse::Header<'_>],
) -> Result<ResponseHead, FramingError> {
    let mut content_type = None;
    let mut content_length: Option<u64> = None;
    let mut chunked = None;
    let mut close = !http11;
    for f in fields {
        let name = f.name;
        if name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_bytes(f.value).ok();
        } else if name.eq_ignore_ascii_case("content-length") {
            for part in f.value.split(|&b| b == b',') {
                let n = std::str::from_utf8(part)
                    .ok()
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(FramingError::ContentLength)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(FramingError::ContentLength);
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding decides whether the body is chunked.
            let last = f.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in f.value.split(|&b| b == b',') {
                let token = trim(token);
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    close = false;
                }
            }
        }
    }
    let body = match (status, chunked, content_length) {
        (204 | 304, _, _) => BodyKind::Empty,
        (101, _, _) => return Err(FramingError::Head("unexpected protocol switch".into())),
        (_, Some(true), _) => BodyKind::Chunked,
        (_, Some(false), _) => BodyKind::UntilClose,
        (_, None, Some(n)) => BodyKind::Length(n),
        (_, None, None) => BodyKind::UntilClose,
    };
    Ok(ResponseHead {
        status,
        content_type,
        keep_alive: !close && body != BodyKind::UntilClose,
        body,
    })
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// One step of body decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes (never empty).
    Data(Bytes),
    /// Nothing more can be decoded until more bytes arrive.
    NeedMore,
    /// The body is complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers(usize),
    UntilClose,
    Done,
}

/// Takes body bytes out of a read buffer as they arrive, zero-copy where it can.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

impl BodyDecoder {
    /// A decoder for a body delimited as `kind`.
    pub fn new(kind: BodyKind) -> Self {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::ChunkSize,
            BodyKind::UntilClose => State::UntilClose,
        };
        Self { state }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes up to `left` bytes of body from `buf`: the state becomes `more(rest)` while some
    /// remain, `after` once all are taken.
    fn take(
        &mut self,
        buf: &mut BytesMut,
        left: u64,
        more: fn(u64) -> State,
        after: State,
    ) -> Decoded {
        if buf.is_empty() {
            return Decoded::NeedMore;
        }
        let n = left.min(buf.len() as u64);
        self.state = match left - n {
            0 => after,
            rest => more(rest),
        };
        Decoded::Data(buf.split_to(n as usize).freeze())
    }

    /// Decodes what it can from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, FramingError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Length(left) => {
                    return Ok(self.take(buf, left, State::Length, State::Done));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkData(left) => {
                    return Ok(self.take(buf, left, State::ChunkData, State::ChunkDataEnd));
                }
                State::ChunkDataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(FramingError::Chunked("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers(seen) => {
                    let Some(line) = take_line(buf, MAX_TRAILER_BYTES.saturating_sub(seen))? else {
                        return Ok(Decoded::NeedMore);
                    };
                    self.state = if line.is_empty() {
                        State::Done
                    } else {
                        State::Trailers(seen + line.len() + 2)
                    };
                }
            }
        }
    }

    /// The connection closed: fine only for a body delimited by the close (or finished).
    pub fn at_eof(&mut self) -> Result<(), FramingError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(FramingError::Truncated),
        }
    }
}

/// Removes one CRLF-terminated line from the front of `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, FramingError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end <= max => {
            let line = buf.split_to(end);
            buf.advance(2);
            Ok(Some(line))
        }
        Some(_) => Err(FramingError::Chunked("line too long")),
        None if buf.len() > max + 1 => Err(FramingError::Chunked("line too long")),
        None => Ok(None),
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let digits = trim(line.split(|&b| b == b';').next().unwrap_or_default());
    if digits.is_empty() || digits.len() > 15 {
        return Err(FramingError::Chunked("bad chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| FramingError::Chunked("bad chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| FramingError::Chunked("bad chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<ResponseHead>, FramingError> {
        parse_head(&mut BytesMut::from(text))
    }

    /// Feeds `wire` to a decoder split at `cut`, returns the body and whether it finished.
    fn decode_split(
        kind: BodyKind,
        wire: &[u8],
        cut: usize,
    ) -> Result<(Vec<u8>, bool), FramingError> {
        let mut d = BodyDecoder::new(kind);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in [&wire[..cut], &wire[cut..]] {
            buf.extend_from_slice(part);
            loop {
                match d.decode(&mut buf)? {
                    Decoded::Data(b) => {
                        assert!(!b.is_empty());
                        out.extend_from_slice(&b);
                    }
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn the_request_head_is_one_origin_form_post() {
        let fields = [(
            HeaderName::from_static("authorization"),
            HeaderValue::from_static("Bearer t"),
        )];
        let h = request_head(
            "POST",
            "/v1/chat/completions?x=1",
            "10.0.0.1:8000",
            fields.iter().map(|(n, v)| (n, v)),
            "abc",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            42,
        );
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\n\
             authorization: Bearer t\r\nx-request-id: abc\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
             content-length: 42\r\n\r\n"
        );
    }

    #[test]
    fn heads_are_read_with_their_framing() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.content_type.unwrap(), "application/json");
        assert_eq!(h.body, BodyKind::Length(12));
        assert!(h.keep_alive);

        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h.body,
            BodyKind::Chunked,
            "chunked wins over content-length"
        );
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::Empty);
        assert!(h.keep_alive);
    }

    #[test]
    fn connections_are_kept_only_when_the_framing_and_headers_allow() {
        let close = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!close.unwrap().unwrap().keep_alive);
        let until_close = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(until_close.body, BodyKind::UntilClose);
        assert!(!until_close.keep_alive);
        let old = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!old.keep_alive);
        let old_kept =
            head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(old_kept.unwrap().unwrap().keep_alive);
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        );
        let h = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(h.status, 201);
        assert_eq!(&buf[..], b"ok");
        assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(matches!(
            head("garbage\r\n\r\n"),
            Err(FramingError::Head(_))
        ));
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n"),
            Err(FramingError::ContentLength)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            Err(FramingError::ContentLength)
        );
        let same_twice = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(same_twice.unwrap().unwrap().body, BodyKind::Length(3));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&huge), Err(FramingError::HeadTooLarge));
        assert!(head("HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
    }

    #[test]
    fn a_chunked_body_decodes_the_same_wherever_the_reads_split_it() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\nC\r\nworld, 12345\r\n0\r\ntrailer: x\r\n\r\n";
        for cut in 0..=wire.len() {
            let (body, done) = decode_split(BodyKind::Chunked, wire, cut).unwrap();
            assert_eq!(body, b"hello world, 12345", "cut at {cut}");
            assert!(done, "cut at {cut}");
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let wire = b"0123456789";
        for cut in 0..=wire.len() {
            let (body, done) = decode_split(BodyKind::Length(10), wire, cut).unwrap();
            assert_eq!(body, wire);
            assert!(done);
        }
        let mut buf = BytesMut::from(&b"abcEXTRA"[..]);
        let mut d = BodyDecoder::new(BodyKind::Length(3));
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::Done);
        assert_eq!(
            &buf[..],
            b"EXTRA",
            "bytes past the body are left for the caller to see"
        );
    }

    #[test]
    fn the_end_of_the_connection_ends_only_close_delimited_bodies() {
        let mut d = BodyDecoder::new(BodyKind::UntilClose);
        let mut buf = BytesMut::from("all of it");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"all of it"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::NeedMore);
        assert_eq!(d.at_eof(), Ok(()));
        assert!(d.is_done());

        let mut d = BodyDecoder::new(BodyKind::Length(5));
        assert_eq!(d.at_eof(), Err(FramingError::Truncated));
        let mut d = BodyDecoder::new(BodyKind::Chunked);
        let mut buf = BytesMut::from("5\r\nhel");
        assert!(matches!(d.decode(&mut buf).unwrap(), Decoded::Data(_)));
        assert_eq!(d.at_eof(), Err(FramingError::Truncated));
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"ffffffffffffffff\r\n",
        ] {
            let mut d = BodyDecoder::new(BodyKind::Chunked);
            let mut buf = BytesMut::from(wire);
            let mut result = Ok(Decoded::NeedMore);
            for _ in 0..4 {
                result = d.decode(&mut buf);
                if !matches!(result, Ok(Decoded::Data(_))) {
                    break;
                }
            }
            assert!(
                result.is_err(),
                "{:?} gave {result:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut d = BodyDecoder::new(BodyKind::Chunked);
        let mut long = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 8][..]);
        assert!(
            d.decode(&mut long).is_err(),
            "an endless size line is refused"
        );
    }
}
