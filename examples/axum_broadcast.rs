//! The baseline crier is measured against (docs/BENCHMARKS.md): a plain axum 0.8 server
//! with its `ws` feature and one `tokio::sync::broadcast` channel. It speaks just enough
//! of crier's protocol for `crier bench` to run against it unchanged: `GET /ws?topic=..`
//! answers a `subscribed` reply, then forwards every publication as a text frame;
//! `POST /api/publish/{topic}` wraps the body in crier's envelope with a global offset.
//! One channel for all topics, no per-client byte limit (a lagging receiver skips
//! messages instead), no SSE. It is the baseline, not a product.
//!
//! `cargo run --release --example axum_broadcast -- 127.0.0.1:7801`

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{broadcast, Mutex};

struct App {
    tx: broadcast::Sender<(Arc<str>, Utf8Bytes)>,
    /// The global offset; held while sending so offsets enter the channel in order.
    offset: Mutex<u64>,
}

#[derive(serde::Deserialize)]
struct Sub {
    topic: String,
}

async fn ws(
    upgrade: WebSocketUpgrade,
    Query(sub): Query<Sub>,
    State(app): State<Arc<App>>,
) -> Response {
    upgrade.on_upgrade(move |socket| client(socket, sub.topic, app))
}

async fn client(mut socket: WebSocket, topic: String, app: Arc<App>) {
    // Subscribe and read the offset under the same lock so nothing falls in between.
    let (mut rx, offset) = {
        let offset = app.offset.lock().await;
        (app.tx.subscribe(), *offset)
    };
    let reply = format!(r#"{{"op":"subscribed","topic":"{topic}","offset":{offset}}}"#);
    if socket.send(Message::Text(reply.into())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok((t, text)) if *t == *topic => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn publish(
    Path(topic): Path<String>,
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<String, StatusCode> {
    serde_json::from_slice::<&serde_json::value::RawValue>(&body)
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let data = std::str::from_utf8(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
    let mut offset = app.offset.lock().await;
    *offset += 1;
    let envelope = format!(
        r#"{{"topic":"{topic}","offset":{},"data":{}}}"#,
        *offset,
        data.trim()
    );
    let subscribers = app
        .tx
        .send((topic.as_str().into(), envelope.into()))
        .unwrap_or(0);
    Ok(format!(
        r#"{{"topic":"{topic}","offset":{},"subscribers":{subscribers}}}"#,
        *offset
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7801".to_string());
    let (tx, _) = broadcast::channel(1024);
    let app = Arc::new(App {
        tx,
        offset: Mutex::new(0),
    });
    let router = Router::new()
        .route("/ws", get(ws))
        .route("/api/publish/{topic}", post(publish))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("axum baseline listening on http://{listen}");
    axum::serve(listener, router).await?;
    Ok(())
}
