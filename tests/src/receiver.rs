//! A webhook receiver on 127.0.0.1 that records every request and answers as the test
//! tells it to (a status code, a hang, a redirect). Plain HTTP/1.1 over tokio, one
//! request per connection, so its behaviour is fully under the test's control.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

/// How the receiver answers.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// Answer with this status and a `Retry-After` header.
    RetryAfter(u16, String),
    /// Hold the connection open for this long before answering 200.
    Hang(Duration),
    /// Answer 302 pointing at this location.
    Redirect(String),
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub at: std::time::SystemTime,
}

impl ReceivedWebhook {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("webhook body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    received: Vec<ReceivedWebhook>,
    /// Replies used in order; the last one repeats.
    script: Vec<Reply>,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver that answers 200 to everything.
    pub async fn start() -> Self {
        Self::scripted(vec![Reply::Status(200)]).await
    }

    /// Starts a receiver that answers with `script` in order, repeating the last reply.
    pub async fn scripted(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let port = listener.local_addr().expect("receiver address").port();
        let state = Arc::new(Mutex::new(State {
            received: Vec::new(),
            script,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, shared).await;
                });
            }
        });
        Self { port, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.state.lock().expect("receiver state").received.clone()
    }

    pub fn set_script(&self, script: Vec<Reply>) {
        self.state.lock().expect("receiver state").script = script;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    let reply = {
        let mut s = state.lock().expect("receiver state");
        s.received.push(ReceivedWebhook {
            method,
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            at: std::time::SystemTime::now(),
        });
        if s.script.len() > 1 {
            s.script.remove(0)
        } else {
            s.script.first().cloned().unwrap_or(Reply::Status(200))
        }
    };
    let response = match reply {
        Reply::Status(code) => format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK"),
        Reply::RetryAfter(code, after) => format!(
            "HTTP/1.1 {code} X\r\nretry-after: {after}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
        }
        Reply::Redirect(location) => format!(
            "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ),
    };
    let mut stream = reader.into_inner();
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
