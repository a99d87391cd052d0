//! The dashboard's static files, compiled into the binary: no CDN, no build step, works
//! offline. They hold no data; the page asks for the admin token and calls the admin API.

use http::{HeaderValue, Response, StatusCode};

/// One file of the dashboard.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("dashboard/index.html"),
    content_type: "text/html; charset=utf-8",
};
const SCRIPT: Asset = Asset {
    body: include_str!("dashboard/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_str!("dashboard/app.css"),
    content_type: "text/css; charset=utf-8",
};

/// Only the page's own files and the admin API; no inline script or style, no framing,
/// no form posting anywhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The file served at `path`, if it is one of the dashboard's.
pub(super) fn asset(path: &str) -> Option<Asset> {
    match path {
        "/" | "/index.html" => Some(INDEX),
        "/dashboard/app.js" => Some(SCRIPT),
        "/dashboard/app.css" => Some(STYLE),
        _ => None,
    }
}

/// The response for `asset`.
pub(super) fn serve(asset: Asset) -> Response<Vec<u8>> {
    let mut r = Response::new(asset.body.as_bytes().to_vec());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(asset.body.len()),
    );
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files() {
        assert!(asset("/").is_some());
        assert!(asset("/dashboard/app.js").is_some());
        assert!(asset("/dashboard/../admin/status").is_none());
        let page = INDEX.body;
        assert!(page.contains("src=\"/dashboard/app.js\""));
        assert!(page.contains("href=\"/dashboard/app.css\""));
        // Nothing from elsewhere: no scheme-qualified URL in any file (the SVG namespace
        // is a name, not a fetch).
        for a in [INDEX, SCRIPT, STYLE] {
            let fetched = a
                .body
                .match_indices("http")
                .filter(|(i, _)| !a.body[*i..].starts_with("http://www.w3.org/2000/svg"))
                .count();
            assert_eq!(fetched, 0, "{}", a.content_type);
        }
    }
}
