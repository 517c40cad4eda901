//! `/console`: a browser console over the public API, as three static files compiled
//! into the binary (no build step, nothing fetched from elsewhere at run time). The page
//! holds no privilege of its own: it calls the same `/v1` routes as any client, with the
//! key the user pastes, kept in the tab's session storage and never put in a URL.
//!
//! Every console response carries a Content-Security-Policy that lets the page load
//! only its own files and talk only to this API (its WebSocket stream included), so a
//! prompt or webhook URL shown on the page can never run as script.

use actix_web::{
    http::header::{self, HeaderValue},
    web, HttpRequest, HttpResponse,
};

use crate::state::AppState;

const INDEX: &str = include_str!("index.html");
const STYLE: &str = include_str!("console.css");
const SCRIPT: &str = include_str!("console.js");

/// The console's page.
#[utoipa::path(
    get,
    path = "/console",
    tag = "console",
    responses((status = 200, description = "The console's HTML page; it asks for an API key and keeps it in the tab's session storage", content_type = "text/html"))
)]
pub(crate) async fn page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    asset(&req, &state, "text/html; charset=utf-8", INDEX)
}

/// The console's style sheet.
#[utoipa::path(
    get,
    path = "/console/console.css",
    tag = "console",
    responses((status = 200, description = "CSS", content_type = "text/css"))
)]
pub(crate) async fn style(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    asset(&req, &state, "text/css; charset=utf-8", STYLE)
}

/// The console's script.
#[utoipa::path(
    get,
    path = "/console/console.js",
    tag = "console",
    responses((status = 200, description = "JavaScript", content_type = "text/javascript"))
)]
pub(crate) async fn script(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    asset(&req, &state, "text/javascript; charset=utf-8", SCRIPT)
}

fn asset(
    req: &HttpRequest,
    state: &AppState,
    content_type: &'static str,
    body: &'static str,
) -> HttpResponse {
    let host = req.connection_info().host().to_owned();
    let policy = content_security_policy(&host, &state.settings.public_base_url);
    let mut response = HttpResponse::Ok();
    response
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header(("Cross-Origin-Opener-Policy", "same-origin"))
        .insert_header((
            "Permissions-Policy",
            "camera=(), microphone=(), geolocation=()",
        ));
    if let Ok(value) = HeaderValue::from_str(&policy) {
        response.insert_header((header::CONTENT_SECURITY_POLICY, value));
    }
    response.body(body)
}

/// Only this origin for scripts, styles and API calls; the stream's `ws:`/`wss:` form of
/// the host the browser used (older browsers do not count it as `'self'`); videos from
/// this origin, from `public_base_url` (the host the `video_url`s name, which a proxy may
/// make differ from the one the page came from) and from `https:` object stores, whose
/// pre-signed URLs name hosts the API does not know in advance.
fn content_security_policy(host: &str, public_base_url: &str) -> String {
    let mut connect = String::from("'self'");
    if is_plain_host(host) {
        connect.push_str(&format!(" ws://{host} wss://{host}"));
    }
    let mut media = String::from("'self' https:");
    if let Some(origin) = origin_of(public_base_url) {
        media.push(' ');
        media.push_str(&origin);
    }
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         media-src {media}; connect-src {connect}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// A `host[:port]` (or `[v6]:port`) with nothing that could end a CSP source expression.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

fn origin_of(base: &str) -> Option<String> {
    let url = url::Url::parse(base).ok()?;
    let origin = url.origin();
    origin
        .is_tuple()
        .then(|| origin.ascii_serialization())
        .filter(|o| !o.contains([';', ',', ' ']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_allows_only_this_api_and_its_stream() {
        let policy = content_security_policy("127.0.0.1:8080", "http://videos.example:9000/x");
        assert!(policy.contains("script-src 'self';"));
        assert!(policy.contains("connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;"));
        assert!(policy.contains("media-src 'self' https: http://videos.example:9000;"));
        assert!(policy.starts_with("default-src 'none';"));
        assert!(!policy.contains("unsafe-inline"));
    }

    #[test]
    fn a_strange_host_header_adds_no_source() {
        let policy = content_security_policy("evil.example; script-src *", "not a url");
        assert!(policy.contains("connect-src 'self';"));
        assert!(policy.contains("media-src 'self' https:;"));
    }

    #[test]
    fn the_page_loads_only_embedded_files() {
        assert!(INDEX.contains(r#"src="/console/console.js""#));
        assert!(INDEX.contains(r#"href="/console/console.css""#));
        assert!(
            !INDEX.contains("<script>"),
            "no inline script: the policy forbids it"
        );
        assert!(
            !INDEX.contains("style="),
            "no inline style: the policy forbids it"
        );
        for file in [INDEX, SCRIPT, STYLE] {
            assert!(
                !file.contains("src=\"http") && !file.contains("url(http"),
                "nothing from elsewhere"
            );
        }
    }
}
