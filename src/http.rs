//! The `[http]` endpoint: a small read-only HTTP/1.1 server for `/metrics` and the
//! status page, on hyper's server with HTTP/1 only.
//!
//! Invariants:
//! - The server knows nothing of what it serves: the agent hands it [`Routes`], one
//!   handler per path, each returning a [`Page`]. A new page is a new route; the server
//!   does not change.
//! - Read-only: `GET` and `HEAD` only (anything else is `405`), an unknown path is `404`.
//! - Bounded: at most `max_connections` connections at once (more wait in the listen
//!   backlog), a request head must arrive within [`HEADER_TIMEOUT`], and a connection
//!   lives at most [`CONNECTION_LIFETIME`], so a slow client cannot hold a slot.
//! - Off unless configured: no `[http]` section, no listening socket. The default bind is
//!   loopback (`127.0.0.1:9771`), so turning it on exposes nothing to the network.
//! - With an [`Authenticate`] (the agent gives one for any bind outside loopback) every
//!   request needs HTTP basic credentials it accepts, or gets `401`; the check runs
//!   before the route, so no page is computed for a stranger.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::problem::{Invalid, Problems};

/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection is kept, keep-alive included (a scraper reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// `[http]`: where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port. Default `127.0.0.1:9771` (loopback only).
    pub bind: SocketAddr,
    /// Connections served at once. Default 8.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9771)),
            max_connections: 8,
        }
    }
}

impl HttpConfig {
    /// Problems, with key paths under `http`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        problems
            .at("http")
            .at_least("max_connections", self.max_connections, 1);
        problems.into_vec()
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a route answers: a `200` with this body.
#[derive(Debug, Clone)]
pub struct Page {
    pub content_type: &'static str,
    pub body: Bytes,
}

/// Checks a user name and password (HTTP basic).
pub type Authenticate = Arc<dyn Fn(&str, &[u8]) -> bool + Send + Sync>;

impl HttpConfig {
    /// Whether the bind needs credentials: anything but a loopback address.
    pub fn needs_login(&self) -> bool {
        !self.bind.ip().is_loopback()
    }
}

type PageFuture = Pin<Box<dyn Future<Output = Page> + Send>>;
type Handler = Arc<dyn Fn() -> PageFuture + Send + Sync>;

/// The pages served, by exact path, and who may see them.
#[derive(Clone, Default)]
pub struct Routes {
    pages: BTreeMap<&'static str, Handler>,
    login: Option<Authenticate>,
}

impl Routes {
    /// Serves `handler`'s page at `path`.
    #[must_use]
    pub fn get<F, Fut>(mut self, path: &'static str, handler: F) -> Routes
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Page> + Send + 'static,
    {
        self.pages
            .insert(path, Arc::new(move || Box::pin(handler()) as PageFuture));
        self
    }

    /// Every request must carry basic credentials `login` accepts.
    #[must_use]
    pub fn login(mut self, login: Authenticate) -> Routes {
        self.login = Some(login);
        self
    }

    fn admitted(&self, request: &Request<Incoming>) -> bool {
        let Some(login) = &self.login else {
            return true;
        };
        let credentials = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Basic "))
            .and_then(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
            });
        let Some(credentials) = credentials else {
            return false;
        };
        let Some(colon) = credentials.iter().position(|b| *b == b':') else {
            return false;
        };
        let (user, password) = (&credentials[..colon], &credentials[colon + 1..]);
        std::str::from_utf8(user).is_ok_and(|user| login(user, password))
    }

    async fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET or HEAD\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if !self.admitted(request) {
            let mut response = plain(StatusCode::UNAUTHORIZED, "login required\n");
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fieldbridge\", charset=\"UTF-8\""),
            );
            return response;
        }
        let Some(handler) = self.pages.get(request.uri().path()) else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        let page = handler().await;
        let mut response = Response::new(Full::new(page.body));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(page.content_type));
        response
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The running endpoint.
pub struct HttpHandle {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpHandle {
    /// Where it listens (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for the accept loop and every connection to end (after the stop token
    /// given to [`start`]); then nothing the routes hold is referenced any more.
    pub async fn stopped(self) {
        if let Err(err) = self.task.await {
            tracing::error!(error = %err, "http endpoint task failed");
        }
    }
}

/// Binds `config.bind` and serves `routes` until `stop`.
///
/// # Errors
/// The address cannot be bound (in use, not an address of this machine, no permission).
pub async fn start(
    config: &HttpConfig,
    routes: Routes,
    stop: CancellationToken,
) -> Result<HttpHandle, Error> {
    let bind_error = |source| Error::Bind {
        addr: config.bind,
        source,
    };
    let listener = TcpListener::bind(config.bind).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let task = tokio::spawn(accept_loop(listener, routes, slots, stop));
    Ok(HttpHandle { local_addr, task })
}

async fn accept_loop(
    listener: TcpListener,
    routes: Routes,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let connections = TaskTracker::new();
    serve(&listener, &routes, &slots, &stop, &connections).await;
    connections.close();
    connections.wait().await;
}

/// Accepts until `stop`, each connection a task in `connections`.
async fn serve(
    listener: &TcpListener,
    routes: &Routes,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    connections: &TaskTracker,
) {
    let mut failing = false;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "http endpoint cannot accept connections");
                    failing = true;
                }
                // Out of file descriptors, say: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let routes = routes.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(routes.answer(&request).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
            }
        });
    }
}
