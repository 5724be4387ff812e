//! The embedded live-leaderboard web page.
//!
//! Plain HTML, CSS and JS compiled into the binary with `include_str!`: no build step, no
//! framework, no external resource. The pages talk to the server over the same origin:
//! `GET /api/boards` for the index, and for one live board `crier.js`, the browser client
//! module that applications load from here too (`docs/client.md`): `/ws?topic=board:{name}`,
//! falling back to `/sse`, resuming from the last offset after a reconnect. See
//! `docs/leaderboards.md` ("The web page").
//!
//! | route | body |
//! |---|---|
//! | `/` | `index.html` (the list of boards) |
//! | `/boards/{board}` | `board.html` (one board, live; the page reads the name from the URL) |
//! | `/assets/{file}` | `style.css`, `board.js`, `index.js`, `crier.js` |

use axum::{
    extract::Path,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

const INDEX_HTML: &str = include_str!("assets/index.html");
const BOARD_HTML: &str = include_str!("assets/board.html");
const STYLE_CSS: &str = include_str!("assets/style.css");
const BOARD_JS: &str = include_str!("assets/board.js");
const INDEX_JS: &str = include_str!("assets/index.js");
const CRIER_JS: &str = include_str!("assets/crier.js");

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// The embedded assets served under `/assets/{file}`: name, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    ("style.css", CSS, STYLE_CSS),
    ("board.js", JS, BOARD_JS),
    ("index.js", JS, INDEX_JS),
    ("crier.js", JS, CRIER_JS),
];

/// The web page's routes, to be merged into the server's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/boards/{board}", get(board))
        .route("/assets/{file}", get(asset))
}

/// An embedded body with its content type. `no-cache` makes browsers revalidate, so a new
/// binary's page is picked up at once; the `nosniff` header keeps the types honest.
fn embedded(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            // A board page may be opened with `?token=` (docs/auth.md): its requests must
            // not carry that URL as their Referer, to other sites or into proxy logs.
            // `strict-origin` sends the origin only; `no-referrer` would make same-origin
            // writes carry `Origin: null`, which the write-intent check refuses.
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("strict-origin"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    embedded(HTML, INDEX_HTML)
}

/// Any board name gets the page; the page itself shows "no such board" states, and the name
/// is only ever put into the DOM as text by the script, never into this HTML.
async fn board(Path(_board): Path<String>) -> Response {
    embedded(HTML, BOARD_HTML)
}

/// The client module a page of another origin may import.
const SHARED_MODULE: &str = "crier.js";

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((name, content_type, body)) => {
            let mut res = embedded(content_type, body);
            // A cross-origin `import` of a module needs CORS. The file is public, static and
            // sent without credentials, so any origin may read it; this grants nothing else
            // (the API still refuses other origins, see docs/protocol.md "Origins").
            if *name == SHARED_MODULE {
                res.headers_mut().insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
            }
            res
        }
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, HeaderValue::from_static(HTML))],
            "not found",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str) -> (StatusCode, Option<String>, Option<String>, String) {
        let app: Router = routes();
        let res = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let header = |name| {
            res.headers()
                .get(name)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
        };
        let (status, ct, cc) = (
            res.status(),
            header(header::CONTENT_TYPE),
            header(header::CACHE_CONTROL),
        );
        let body = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, ct, cc, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn each_route_answers_with_its_content_type() {
        let cases = [
            ("/", HTML, "/assets/index.js"),
            ("/boards/arena", HTML, "/assets/board.js"),
            ("/boards/e2e-arena", HTML, "id=\"board-title\""),
            ("/assets/style.css", CSS, "moved-up"),
            ("/assets/board.js", JS, "from \"./crier.js\""),
            ("/assets/crier.js", JS, "EventSource"),
            ("/assets/index.js", JS, "/api/boards"),
        ];
        for (path, content_type, needle) in cases {
            let (status, ct, cc, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(ct.as_deref(), Some(content_type), "{path}");
            assert_eq!(cc.as_deref(), Some("no-cache"), "{path}");
            assert!(body.contains(needle), "{path} should contain {needle}");
        }
    }

    #[tokio::test]
    async fn only_the_client_module_may_be_read_cross_origin() {
        for (name, _, _) in ASSETS {
            let res = routes::<()>()
                .oneshot(
                    Request::get(format!("/assets/{name}"))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let acao = res.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN);
            if *name == SHARED_MODULE {
                assert_eq!(acao.map(|v| v.to_str().unwrap()), Some("*"));
            } else {
                assert!(acao.is_none(), "{name} must not be readable cross-origin");
            }
        }
    }

    #[tokio::test]
    async fn pages_never_send_their_url_as_referer() {
        let app: Router = routes();
        let res = app
            .oneshot(
                Request::get("/boards/vip?token=abc")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.headers()[header::REFERRER_POLICY], "strict-origin");
    }

    #[tokio::test]
    async fn unknown_asset_is_404() {
        for path in ["/assets/nope.js", "/assets/..%2Fmod.rs", "/assets/"] {
            let (status, _, _, _) = get(path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn pages_reference_only_embedded_assets() {
        for page in [INDEX_HTML, BOARD_HTML] {
            for (i, _) in page.match_indices("/assets/") {
                let rest = &page[i + "/assets/".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == name),
                    "page references /assets/{name}, which is not embedded"
                );
            }
            assert!(!page.contains("http://") && !page.contains("https://"));
        }
    }
}
