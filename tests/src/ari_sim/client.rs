//! A minimal ARI client for tests: raw REST calls and an events WebSocket reader.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::AriSim;

/// What went wrong talking to ARI.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP request failed before a response.
    #[error("{method} {path}: {source}")]
    Http {
        /// Method used.
        method: String,
        /// Path asked for.
        path: String,
        /// Underlying error.
        source: reqwest::Error,
    },
    /// The WebSocket could not be opened.
    #[error("connecting {url}: {source}")]
    WebSocket {
        /// URL used.
        url: String,
        /// Underlying error.
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Build(reqwest::Error),
}

/// An ARI response: status, body text and parsed JSON.
#[derive(Debug, Clone)]
pub struct AriResponse {
    /// HTTP status.
    pub status: u16,
    /// Response body as text.
    pub text: String,
    /// Response body as JSON, when it is JSON.
    pub json: Option<Value>,
    /// `Location` header, for 201 answers.
    pub location: Option<String>,
    /// `Content-Type` header.
    pub content_type: Option<String>,
}

/// Installs rustls' ring provider once, which the workspace's reqwest build expects.
pub fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// REST side of ARI against one simulator (or any ARI server).
#[derive(Debug, Clone)]
pub struct AriClient {
    http: reqwest::Client,
    base: String,
    username: String,
    password: String,
}

impl AriClient {
    /// A client for `sim`, authenticating with its user name and password.
    pub fn new(sim: &AriSim) -> Result<AriClient, ClientError> {
        Self::with_credentials(&sim.base_url(), sim.username(), sim.password())
    }

    /// A client for the ARI server at `base` (`http://host:port`).
    pub fn with_credentials(
        base: &str,
        username: &str,
        password: &str,
    ) -> Result<AriClient, ClientError> {
        ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(ClientError::Build)?;
        Ok(AriClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password: password.to_string(),
        })
    }

    /// Calls `method` on `path` (relative to `/ari`, may hold a query) with Basic auth and an
    /// optional JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<AriResponse, ClientError> {
        self.call_raw(
            method,
            path,
            body.map(|b| ("application/json", b.to_string())),
            true,
        )
        .await
    }

    /// Like [`AriClient::call`] with a raw body of the given content type, with or without auth.
    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
        auth: bool,
    ) -> Result<AriResponse, ClientError> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let url = if path.starts_with("/ari") {
            format!("{}{path}", self.base)
        } else {
            format!("{}/ari{path}", self.base)
        };
        let mut req = self.http.request(m, &url);
        if auth {
            req = req.basic_auth(&self.username, Some(&self.password));
        }
        if let Some((ctype, text)) = body {
            req = req.header("Content-Type", ctype).body(text);
        }
        let resp = req.send().await.map_err(|source| ClientError::Http {
            method: method.to_string(),
            path: path.to_string(),
            source,
        })?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let location = header("location");
        let content_type = header("content-type");
        let text = resp.text().await.map_err(|source| ClientError::Http {
            method: method.to_string(),
            path: path.to_string(),
            source,
        })?;
        let json = serde_json::from_str(&text).ok();
        Ok(AriResponse {
            status,
            text,
            json,
            location,
            content_type,
        })
    }
}

/// Events from one ARI events WebSocket, buffered as they arrive.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Value>,
    task: JoinHandle<()>,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventStream {
    /// Connects to `url` (see [`AriSim::events_url`]) and starts buffering events.
    pub async fn connect(url: &str) -> Result<EventStream, ClientError> {
        let (ws, _) =
            tokio_tungstenite::connect_async(url)
                .await
                .map_err(|e| ClientError::WebSocket {
                    url: url.to_string(),
                    source: Box::new(e),
                })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(Message::Text(t)) => {
                        let v = serde_json::from_str(t.as_str())
                            .unwrap_or_else(|_| Value::String(t.as_str().to_string()));
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        Ok(EventStream { rx, task })
    }

    /// The next event within `timeout`; `None` on timeout or when the socket closed.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Events up to and including the first matching `pred`, waiting at most `timeout` for it;
    /// `Err` carries what arrived when it did not come.
    pub async fn until<F: Fn(&Value) -> bool>(
        &mut self,
        timeout: Duration,
        pred: F,
    ) -> Result<Vec<Value>, Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(v)) => {
                    let hit = pred(&v);
                    seen.push(v);
                    if hit {
                        return Ok(seen);
                    }
                }
                _ => return Err(seen),
            }
        }
    }

    /// Events already buffered, without waiting.
    pub fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(v) = self.rx.try_recv() {
            out.push(v);
        }
        out
    }

    /// Waits up to `timeout` for the socket to close; true if it did.
    pub async fn closed(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
