//! What each path answers.

use super::phase::Phase;
use super::response::Response;

/// The live page: one file, its script and style inline, no outside assets.
const PAGE: &str = include_str!("page.html");

/// The page with the picture of now inside it: drawn before any event arrives (and
/// by clients that read the page once, such as a headless browser).
fn page(phase: &Phase) -> String {
    let picture = serde_json::to_string(&phase.picture()).unwrap_or_else(|_| "null".into());
    // `<` only occurs inside JSON strings, where `\u003c` means the same; so the
    // script element cannot be closed from inside a name.
    PAGE.replace("__PICTURE__", &picture.replace('<', "\\u003c"))
}

/// The answer to a GET (or HEAD) of `path`; `/events` is streamed elsewhere.
pub async fn answer(path: &str, phase: &Phase) -> Response {
    match path {
        "/healthz" => Response::text(200, "ok"),
        "/readyz" => match phase.readiness().await {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text(503, &why),
        },
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            phase.metrics_text(),
        ),
        "/api/picture" => match serde_json::to_vec(&phase.picture()) {
            Ok(json) => Response::new(200, "application/json", json),
            Err(e) => Response::text(500, &format!("cannot encode the picture: {e}")),
        },
        "/" => Response::new(200, "text/html; charset=utf-8", page(phase)).header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
        ),
        _ => Response::text(404, &format!("no such page: {path}")),
    }
}
