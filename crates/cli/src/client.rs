//! A typed client of the daemon's REST API over a unix socket or HTTP, used by the CLI.

use std::path::PathBuf;

use ferro_api::rest::{ApiErrorBody, CreateVm, EditVm, HostInfo, Operation, Vm, VmEvent};
use ferro_api::storage::{CloneVm, CreateTemplate, Image, ImportImage, Template};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// What a client call can fail with.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error("cannot reach the daemon at {host}: {source} (is `ferro daemon` running? set --host or FERRO_HOST)")]
    Connect {
        /// Where we tried.
        host: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Machine-readable code.
        code: String,
        /// The daemon's sentence.
        message: String,
    },
    /// The exchange failed.
    #[error("talking to the daemon: {0}")]
    Http(String),
    /// `--host` is not understood.
    #[error("--host '{0}' is not unix:PATH or http://HOST:PORT")]
    BadHost(String),
}

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Host {
    /// Its unix socket.
    Unix(PathBuf),
    /// `HOST:PORT` over HTTP.
    Tcp(String),
}

impl std::str::FromStr for Host {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("http://") {
            return Ok(Self::Tcp(a.trim_end_matches('/').to_string()));
        }
        if s.starts_with('/') {
            return Ok(Self::Unix(s.into()));
        }
        Err(ClientError::BadHost(s.to_string()))
    }
}

/// The client.
pub struct Client {
    host: Host,
    token: Option<String>,
}

impl Client {
    /// A client of the daemon at `host`, sending `token` as a bearer token if given.
    pub fn new(host: Host, token: Option<String>) -> Self {
        Self { host, token }
    }

    fn host_text(&self) -> String {
        match &self.host {
            Host::Unix(p) => format!("unix:{}", p.display()),
            Host::Tcp(a) => format!("http://{a}"),
        }
    }

    /// One request; returns the status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let connect = |source| ClientError::Connect {
            host: self.host_text(),
            source,
        };
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ferro");
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = match &self.host {
            Host::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(connect)?;
                send(TokioIo::new(s), req).await.map_err(http)?
            }
            Host::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(connect)?;
                send(TokioIo::new(s), req).await.map_err(http)?
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, body))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw(method, path, body).await?;
        check(status, &bytes)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))
    }

    /// Every VM.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.call(Method::GET, "/v1/vms", None).await
    }
    /// One VM.
    pub async fn get_vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.call(Method::GET, &format!("/v1/vms/{name}"), None)
            .await
    }
    /// Defines a VM.
    pub async fn create_vm(&self, req: &CreateVm) -> Result<Vm, ClientError> {
        self.call(Method::POST, "/v1/vms", Some(to_json(req)?))
            .await
    }
    /// Changes a VM.
    pub async fn edit_vm(&self, name: &str, req: &EditVm) -> Result<Vm, ClientError> {
        self.call(
            Method::PATCH,
            &format!("/v1/vms/{name}"),
            Some(to_json(req)?),
        )
        .await
    }
    /// `start`, `reboot`, `pause`, `resume`, or `stop?timeout=..`.
    pub async fn action(&self, name: &str, action: &str) -> Result<Vm, ClientError> {
        self.call(Method::POST, &format!("/v1/vms/{name}/{action}"), None)
            .await
    }
    /// Deletes a VM.
    pub async fn delete_vm(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let (status, bytes) = self
            .raw(
                Method::DELETE,
                &format!("/v1/vms/{name}?force={force}"),
                None,
            )
            .await?;
        check(status, &bytes)
    }
    /// A VM's events.
    pub async fn events(&self, name: &str) -> Result<Vec<VmEvent>, ClientError> {
        self.call(Method::GET, &format!("/v1/vms/{name}/events"), None)
            .await
    }
    /// A VM's console log.
    pub async fn log(&self, name: &str) -> Result<String, ClientError> {
        let (status, bytes) = self
            .raw(Method::GET, &format!("/v1/vms/{name}/log"), None)
            .await?;
        check(status, &bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
    /// Host facts.
    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        self.call(Method::GET, "/v1/host", None).await
    }
    /// Opens VM `name`'s console: an HTTP upgrade after which the connection carries raw
    /// console bytes both ways.
    pub async fn console(
        &self,
        name: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let connect = |source| ClientError::Connect {
            host: self.host_text(),
            source,
        };
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("/v1/vms/{name}/console"))
            .header(hyper::header::HOST, "ferro")
            .header(hyper::header::CONNECTION, "Upgrade")
            .header(hyper::header::UPGRADE, "ferro-console");
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = match &self.host {
            Host::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(connect)?;
                send_upgradable(TokioIo::new(s), req).await.map_err(http)?
            }
            Host::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(connect)?;
                send_upgradable(TokioIo::new(s), req).await.map_err(http)?
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
            check(status, &body)?;
            return Err(ClientError::Http(format!(
                "expected 101 Switching Protocols, got {status}"
            )));
        }
        Ok(TokioIo::new(hyper::upgrade::on(resp).await.map_err(http)?))
    }

    /// Every image.
    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        self.call(Method::GET, "/v1/images", None).await
    }
    /// Starts an import in the background (`?async=true`): the operation to poll.
    pub async fn import_image_async(&self, req: &ImportImage) -> Result<Operation, ClientError> {
        self.call(Method::POST, "/v1/images?async=true", Some(to_json(req)?))
            .await
    }
    /// Starts a clone in the background (`?async=true`): the operation to poll.
    pub async fn clone_vm_async(&self, src: &str, req: &CloneVm) -> Result<Operation, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/vms/{src}/clone?async=true"),
            Some(to_json(req)?),
        )
        .await
    }
    /// One operation.
    pub async fn operation(&self, id: u64) -> Result<Operation, ClientError> {
        self.call(Method::GET, &format!("/v1/operations/{id}"), None)
            .await
    }
    /// Every template.
    pub async fn list_templates(&self) -> Result<Vec<Template>, ClientError> {
        self.call(Method::GET, "/v1/templates", None).await
    }
    /// Makes a template.
    pub async fn create_template(&self, req: &CreateTemplate) -> Result<Template, ClientError> {
        self.call(Method::POST, "/v1/templates", Some(to_json(req)?))
            .await
    }
    /// Clones a VM.
    pub async fn clone_vm(&self, src: &str, req: &CloneVm) -> Result<Vm, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/vms/{src}/clone"),
            Some(to_json(req)?),
        )
        .await
    }
    /// `DELETE path`, expecting no body.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let (status, bytes) = self.raw(Method::DELETE, path, None).await?;
        check(status, &bytes)
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(v).map_err(|e| ClientError::Http(e.to_string()))
}

pub(crate) fn check(status: StatusCode, bytes: &[u8]) -> Result<(), ClientError> {
    if status.is_success() {
        return Ok(());
    }
    let body: ApiErrorBody = serde_json::from_slice(bytes).unwrap_or(ApiErrorBody {
        code: "error".into(),
        message: format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)),
    });
    Err(ClientError::Api {
        status: status.as_u16(),
        code: body.code,
        message: body.message,
    })
}

async fn send_upgradable<S>(
    io: TokioIo<S>,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await
}

async fn send<S>(
    io: TokioIo<S>,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}
