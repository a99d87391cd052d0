//! W3C Trace Context: the `traceparent` a client sent (or a new trace when it sent none or
//! a malformed one), the trace id in the access log, and a `traceparent` per attempt for
//! the shard — same trace, a new span id for each attempt, the client's sampling flag.

/// The request header.
pub const TRACEPARENT: &str = "traceparent";

/// A request's trace: its id, the span the caller named as parent, the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id (never 0).
    pub trace_id: u128,
    /// The caller's span id, when it sent a `traceparent`.
    pub parent_id: Option<u64>,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The trace of a request with `header` as its `traceparent` (if any): the caller's
    /// when the header is valid, else a new one, sampled.
    pub fn from_header(header: Option<&[u8]>) -> Self {
        header.and_then(parse).unwrap_or_else(Self::new_root)
    }

    /// A new trace, sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero(rand::random::<u128>()),
            parent_id: None,
            flags: 1,
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex128(self.trace_id).as_str().to_owned()
    }

    /// A new span id for a child of this trace (an attempt).
    pub fn new_span_id() -> u64 {
        nonzero(rand::random::<u64>())
    }

    /// The `traceparent` value naming span `span_id` of this trace (written where it is
    /// displayed: no string of its own).
    pub fn header_for(&self, span_id: u64) -> Traceparent {
        Traceparent {
            trace_id: self.trace_id,
            span_id,
            flags: self.flags,
        }
    }
}

/// A `traceparent` value, displayed as `00-TRACEID-SPANID-FLAGS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl Traceparent {
    /// The value's 55 bytes, written without the formatting machinery (every attempt of
    /// every request sends one).
    pub fn to_bytes(&self) -> [u8; 55] {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        write_hex(&self.trace_id.to_be_bytes(), &mut out[3..35]);
        write_hex(&self.span_id.to_be_bytes(), &mut out[36..52]);
        write_hex(&[self.flags], &mut out[53..55]);
        out
    }
}

impl std::fmt::Display for Traceparent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.to_bytes()).map_err(|_| std::fmt::Error)?)
    }
}

/// A trace id, serialised as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub u128);

impl serde::Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(hex128(self.0).as_str())
    }
}

/// 128 bits as 32 lowercase hex digits, on the stack.
#[derive(Debug, Clone, Copy)]
pub struct Hex128([u8; 32]);

impl Hex128 {
    /// The digits.
    pub fn as_str(&self) -> &str {
        // Hex digits are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// `v` as 32 lowercase hex digits (request ids, trace ids).
pub fn hex128(v: u128) -> Hex128 {
    let mut out = [0; 32];
    write_hex(&v.to_be_bytes(), &mut out);
    Hex128(out)
}

fn write_hex(bytes: &[u8], out: &mut [u8]) {
    // `out` is always twice `bytes` long here, so this cannot fail.
    let _ = hex::encode_to_slice(bytes, out);
}

fn nonzero<T: PartialEq + From<u8>>(v: T) -> T {
    if v == T::from(0) {
        T::from(1)
    } else {
        v
    }
}

fn hex<const N: usize>(s: &[u8]) -> Option<u128> {
    if s.len() != N
        || !s
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// Parses a `traceparent` value: `VERSION-TRACEID-PARENTID-FLAGS`, lowercase hex, with the
/// W3C rules: version `ff` is invalid, all-zero ids are invalid, version `00` has exactly
/// these four fields, a later version may append more after a `-`.
pub fn parse(v: &[u8]) -> Option<TraceContext> {
    let v = v.trim_ascii();
    if v.len() < 55 {
        return None;
    }
    let version = hex::<2>(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = hex::<32>(&v[3..35])?;
    let parent_id = hex::<16>(&v[36..52])? as u64;
    let flags = hex::<2>(&v[53..55])? as u8;
    (trace_id != 0 && parent_id != 0).then_some(TraceContext {
        trace_id,
        parent_id: Some(parent_id),
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn hex_is_written_with_leading_zeros_and_lowercase() {
        assert_eq!(hex128(0xab).as_str(), "000000000000000000000000000000ab");
        assert_eq!(hex128(u128::MAX).as_str(), "f".repeat(32));
        let t = Traceparent {
            trace_id: 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10,
            span_id: 0xfe,
            flags: 0x0a,
        };
        assert_eq!(
            t.to_string(),
            "00-0102030405060708090a0b0c0d0e0f10-00000000000000fe-0a"
        );
        assert_eq!(parse(&t.to_bytes()).unwrap().parent_id, Some(0xfe));
    }

    #[test]
    fn a_valid_header_is_kept_and_rewritten_with_a_new_span() {
        let t = TraceContext::from_header(Some(GOOD.as_bytes()));
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(t.flags, 1);
        assert_eq!(
            t.header_for(0xabc).to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01"
        );
        assert_eq!(
            serde_json::to_string(&TraceId(t.trace_id)).unwrap(),
            "\"4bf92f3577b34da6a3ce929d0e0e4736\""
        );
        // An unsampled caller stays unsampled.
        let t = parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert_eq!(t.flags, 0);
        // A later version may carry more fields.
        assert!(parse(format!("01{}-extra", &GOOD[2..]).as_bytes()).is_some());
    }

    #[test]
    fn malformed_headers_start_a_new_trace() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(parse(b.as_bytes()), None, "{b:?}");
            let t = TraceContext::from_header(Some(b.as_bytes()));
            assert_ne!(t.trace_id, 0);
            assert_eq!(t.parent_id, None);
        }
        let fresh = TraceContext::from_header(None);
        assert_eq!(fresh.flags, 1);
        assert_eq!(fresh.header_for(1).to_string().len(), 55);
    }
}
