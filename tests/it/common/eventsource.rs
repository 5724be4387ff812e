//! An SSE client that reads a stream the way the EventSource spec does: hyper decodes the
//! HTTP body, lines end at CR, LF or CRLF, `data` fields join with LF, a blank line
//! dispatches, and the `id` field sets the last event id even on an event without data.
//! Dropping it cuts the TCP connection at once, like a network that goes away.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::within;

#[derive(Debug, Clone, Default)]
pub struct Event {
    /// The `event:` name; None for an unnamed (`message`) event.
    pub event: Option<String>,
    /// The `id:` field of this event, if it had one.
    pub id: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

pub struct EventStream {
    body: Incoming,
    buf: Vec<u8>,
    /// What an EventSource would send back as `Last-Event-ID`.
    pub last_id: Option<String>,
    pub comments: Vec<String>,
    pending: Event,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // Drops the socket without finishing anything: an abrupt cut.
        self.conn.abort();
    }
}

/// Opens `GET /sse{query}` from `from` (a loopback source address) with extra request
/// headers. A refusal comes back as its status and JSON body.
pub async fn open(
    addr: SocketAddr,
    from: Option<IpAddr>,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<EventStream, (u16, Value)> {
    match try_open(addr, from, query, headers).await {
        Ok(es) => Ok(es),
        Err(Refused::Status(status, body)) => Err((status, body)),
        Err(Refused::Io(e)) => panic!("sse request failed: {e}"),
    }
}

/// Why `try_open` got no stream.
#[derive(Debug)]
pub enum Refused {
    /// The connection failed or broke before the response head (a node that died).
    Io(String),
    /// The server answered with this status and JSON body.
    Status(u16, Value),
}

/// `open` for a server that may be gone: a failed connection is an answer too.
pub async fn try_open(
    addr: SocketAddr,
    from: Option<IpAddr>,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<EventStream, Refused> {
    let io = |e: &dyn std::fmt::Display| Refused::Io(e.to_string());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let tcp = within("sse connect", socket.connect(addr))
        .await
        .map_err(|e| io(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| io(&e))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::get(format!("/sse{query}"))
        .header("host", addr.to_string())
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = within(
        "sse response head",
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .map_err(|e| io(&e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = within("error body", resp.into_body().collect())
            .await
            .map_err(|e| io(&e))?
            .to_bytes();
        conn.abort();
        return Err(Refused::Status(
            status,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        ));
    }
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(ct, "text/event-stream");
    Ok(EventStream {
        body: resp.into_body(),
        buf: Vec::new(),
        last_id: None,
        comments: Vec::new(),
        pending: Event::default(),
        conn,
    })
}

impl EventStream {
    /// The next dispatched event (named or not); None when the stream ends.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.parse_buffered() {
                return Some(e);
            }
            let frame = within("sse body frame", self.body.frame()).await?;
            let Ok(frame) = frame else { return None };
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// The next unnamed event (what `EventSource.onmessage` sees) as JSON.
    pub async fn next_message(&mut self) -> Option<Value> {
        loop {
            let e = self.next().await?;
            if e.event.is_none() {
                return Some(e.json());
            }
        }
    }

    /// Consumes complete lines from the buffer until an event is dispatched.
    fn parse_buffered(&mut self) -> Option<Event> {
        loop {
            let end = self.buf.iter().position(|&b| b == b'\n' || b == b'\r')?;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                match self.buf.get(end + 1) {
                    // A CR at the end of what arrived may be half of a CRLF.
                    None => return None,
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                }
            }
            let line = String::from_utf8(self.buf[..end].to_vec()).expect("SSE is UTF-8");
            self.buf.drain(..next);
            if line.is_empty() {
                let e = std::mem::take(&mut self.pending);
                if !e.data.is_empty() {
                    return Some(e);
                }
                continue;
            }
            if let Some(c) = line.strip_prefix(':') {
                self.comments.push(c.trim().to_string());
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => {
                    if !self.pending.data.is_empty() {
                        self.pending.data.push('\n');
                    }
                    self.pending.data.push_str(value);
                }
                "event" => self.pending.event = Some(value.to_string()),
                "id" if !value.contains('\0') => {
                    self.pending.id = Some(value.to_string());
                    self.last_id = Some(value.to_string());
                }
                _ => {}
            }
        }
    }
}
