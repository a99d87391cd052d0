//! Just enough of `multipart/form-data` (RFC 7578) to route an audio request: the form's
//! small text fields (`model`, `stream`) and the size of its file, read from the body the
//! gateway already holds whole (for retries) in one pass that skips over the file's bytes
//! without copying them. The body is forwarded as it came.

/// Why a form could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The `Content-Type` is not `multipart/form-data` with a boundary.
    #[error("the body must be multipart/form-data with a boundary (got {0:?})")]
    NotMultipart(String),
    /// The body is not well-formed multipart.
    #[error("malformed multipart body: {0}")]
    Malformed(&'static str),
    /// A text field is longer than the gateway reads.
    #[error("the form field `{0}` is longer than {MAX_FIELD_BYTES} bytes")]
    FieldTooLong(String),
}

/// Longest text field value read (a model name, a flag).
pub const MAX_FIELD_BYTES: usize = 4096;
/// Longest header block of one part.
const MAX_PART_HEADER_BYTES: usize = 8192;

/// What routing needs from a form.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Form {
    /// The `model` field.
    pub model: Option<String>,
    /// The `stream` field.
    pub stream: Option<String>,
    /// Bytes of file content (every part with a `filename`).
    pub file_bytes: usize,
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Result<&str, FormError> {
    let not = || FormError::NotMultipart(content_type.chars().take(100).collect());
    let mut parts = content_type.split(';');
    let kind = parts.next().unwrap_or_default().trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return Err(not());
    }
    parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(not)
}

/// Reads the form in `body`, whose parts are separated by `boundary`.
pub fn read(body: &[u8], boundary: &str) -> Result<Form, FormError> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let next_part = memchr::memmem::Finder::new(delimiter);
    let mut form = Form::default();
    // Anything before the first delimiter is a preamble, ignored.
    let mut at = next_part
        .find(body)
        .ok_or(FormError::Malformed("no boundary in the body"))?
        + delimiter.len();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(form); // the closing delimiter
        }
        let rest = rest.strip_prefix(b"\r\n").ok_or(FormError::Malformed(
            "a boundary not followed by a line break",
        ))?;
        let head_len =
            memchr::memmem::find(&rest[..rest.len().min(MAX_PART_HEADER_BYTES)], b"\r\n\r\n")
                .ok_or(FormError::Malformed("a part's headers do not end"))?;
        let (name, filename) = disposition(&rest[..head_len])?;
        let content = &rest[head_len + 4..];
        // The content ends at the line break before the next delimiter.
        let end = next_part
            .find_iter(content)
            .find(|&i| i >= 2 && &content[i - 2..i] == b"\r\n")
            .ok_or(FormError::Malformed(
                "the last part has no closing boundary",
            ))?;
        let value = &content[..end - 2];
        if filename {
            form.file_bytes += value.len();
        } else if matches!(name.as_str(), "model" | "stream") {
            if value.len() > MAX_FIELD_BYTES {
                return Err(FormError::FieldTooLong(name));
            }
            let text = String::from_utf8_lossy(value).into_owned();
            match name.as_str() {
                "model" => form.model = Some(text),
                _ => form.stream = Some(text),
            }
        }
        at = body.len() - content.len() + end + delimiter.len();
    }
}

/// A part's field name and whether it is a file, from its `Content-Disposition`.
fn disposition(headers: &[u8]) -> Result<(String, bool), FormError> {
    let text = std::str::from_utf8(headers)
        .map_err(|_| FormError::Malformed("part headers are not UTF-8"))?;
    let line = text
        .split("\r\n")
        .find(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
        })
        .ok_or(FormError::Malformed("a part without Content-Disposition"))?;
    let mut name = None;
    let mut filename = false;
    for param in line.split(';').skip(1) {
        let Some((k, v)) = param.split_once('=') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "name" => name = Some(v.trim().trim_matches('"').to_string()),
            "filename" | "filename*" => filename = true,
            _ => {}
        }
    }
    let name = name.ok_or(FormError::Malformed("a part without a name"))?;
    Ok((name, filename))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = b"preamble to ignore\r\n".to_vec();
        for (name, file, value) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            match file {
                Some(f) => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
                ),
                None => b.extend_from_slice(
                    format!("content-disposition: form-data; name={name}\r\n\r\n").as_bytes(),
                ),
            }
            b.extend_from_slice(value);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn reads_the_fields_around_a_file_that_looks_like_a_boundary() {
        // The file holds "--XyZ" without the line break before it: not a delimiter.
        let audio: &[u8] = b"RIFF....--XyZ..data\r\n-\r\n-XyZ--";
        let body = form(&[
            ("file", Some("a.wav"), audio),
            ("model", None, b"whisper-large-v3"),
            ("stream", None, b"true"),
            ("language", None, b"en"),
        ]);
        let f = read(&body, "XyZ").unwrap();
        assert_eq!(f.model.as_deref(), Some("whisper-large-v3"));
        assert_eq!(f.stream.as_deref(), Some("true"));
        assert_eq!(f.file_bytes, audio.len());
    }

    #[test]
    fn the_boundary_comes_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").unwrap(),
            "abc"
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=utf-8; Boundary=\"a b\"").unwrap(),
            "a b"
        );
        assert!(boundary("application/json").is_err());
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("multipart/form-data; boundary=").is_err());
    }

    #[test]
    fn malformed_forms_are_errors_not_panics() {
        let good = form(&[("model", None, b"m")]);
        for cut in 0..good.len() {
            let _ = read(&good[..cut], "XyZ"); // never panics
        }
        assert!(read(b"no delimiter at all", "XyZ").is_err());
        assert!(read(b"--XyZ\r\nno headers end", "XyZ").is_err());
        assert!(read(b"--XyZ\r\nX-Other: 1\r\n\r\nv\r\n--XyZ--", "XyZ").is_err());
        let long = form(&[("model", None, &[b'm'; MAX_FIELD_BYTES + 1])]);
        assert_eq!(
            read(&long, "XyZ").unwrap_err(),
            FormError::FieldTooLong("model".into())
        );
        // A form without a model reads, and routing says what is missing.
        assert_eq!(
            read(&form(&[("file", Some("a"), b"x")]), "XyZ")
                .unwrap()
                .model,
            None
        );
    }
}
