//! `GET /`: the device page, one static file compiled into the binary (no CDN, no build
//! step). It reads `/status` and streams a reply over `/v1/chat/completions`, like any client.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("page.html");

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
