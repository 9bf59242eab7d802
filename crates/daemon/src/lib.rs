//! `ferro daemon`: the host daemon. It keeps VM definitions in SQLite under a data directory
//! ([`store`]), runs each VM in its own detached `ferro-vmm` ([`process`]), watches and
//! restarts them per policy ([`supervisor`], [`restart`]), re-adopts them after its own
//! restart, and serves the REST API ([`routes`]) on a unix socket or, with a bearer token, TCP.

#![deny(unsafe_code)]

pub mod clone;
pub mod error;
pub mod images;
pub mod memsnap;
pub mod migrate;
pub mod net;
pub mod operations;
pub mod ops;
pub mod ova;
#[allow(unsafe_code)] // setsid between fork and exec, kill(2)
pub mod process;
pub mod restart;
pub mod routes;
pub mod snapshots;
pub mod store;
pub mod supervisor;
pub mod templates;

use std::path::{Path, PathBuf};

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

pub use error::DaemonError;
pub use supervisor::Supervisor;

/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferro";
/// The API socket's name under the data directory.
pub const SOCKET_NAME: &str = "ferro.sock";

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket (no authentication: its file mode guards it).
    Unix(PathBuf),
    /// TCP `HOST:PORT` (a bearer token is required).
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(Self::Unix(p.into()));
            }
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.contains(':') {
                return Ok(Self::Tcp(a.to_string()));
            }
        }
        Err(format!("'{s}' is not unix:PATH or tcp:HOST:PORT"))
    }
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where the database and the VMs' files live.
    pub data_dir: PathBuf,
    /// Where the API listens (default: `DATA/ferro.sock`).
    pub listen: Option<Listen>,
    /// A file holding the bearer token TCP clients must send.
    pub token_file: Option<PathBuf>,
    /// A file holding the bearer token this daemon sends to other daemons (migrations);
    /// default: `token_file`.
    pub peer_token_file: Option<PathBuf>,
    /// The `ferro-vmm` binary.
    pub vmm: PathBuf,
    /// The bridge of the VMs' NICs and its subnet.
    pub net: net::NetSettings,
}

/// Runs the daemon until SIGTERM or SIGINT. The VMMs keep running after it ends.
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    let sup = Supervisor::open(&cfg.data_dir, cfg.vmm.clone(), cfg.net.clone()).await?;
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|t| t.trim().to_string())
            .map_err(DaemonError::io(format!(
                "cannot read token file {}",
                p.display()
            )))
    };
    let token = cfg.token_file.as_deref().map(read).transpose()?;
    let peer = cfg.peer_token_file.as_deref().map(read).transpose()?;
    sup.set_peer_token(peer.or_else(|| token.clone()));
    let listen = cfg
        .listen
        .clone()
        .unwrap_or_else(|| Listen::Unix(cfg.data_dir.join(SOCKET_NAME)));
    let app = routes::router(sup);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
    };
    match listen {
        Listen::Unix(path) => {
            remove_stale_socket(&path)?;
            let l = tokio::net::UnixListener::bind(&path).map_err(DaemonError::io(format!(
                "cannot listen on {}",
                path.display()
            )))?;
            eprintln!("ferro daemon: listening on unix:{}", path.display());
            axum::serve(l, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(DaemonError::io("serve"))?;
            let _ = std::fs::remove_file(&path);
        }
        Listen::Tcp(addr) => {
            let token = token.ok_or_else(|| {
                DaemonError::BadRequest(
                    "a TCP listener needs --token-file (clients send it as a bearer token)".into(),
                )
            })?;
            let app = app.layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let token = token.clone();
                    async move { bearer(req, next, &token).await }
                },
            ));
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(DaemonError::io(format!("cannot listen on {addr}")))?;
            eprintln!("ferro daemon: listening on tcp:{addr}");
            axum::serve(l, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(DaemonError::io("serve"))?;
        }
    }
    Ok(())
}

fn remove_stale_socket(path: &Path) -> Result<(), DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(DaemonError::io(format!("cannot create {}", dir.display())))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::InvalidState(format!(
            "another daemon answers on {}: stop it first",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

async fn bearer(req: Request, next: Next, token: &str) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.as_bytes() == token.as_bytes());
    if ok || req.uri().path() == "/openapi.json" {
        next.run(req).await
    } else {
        error::error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: pass the daemon's token (ferro --token-file FILE)"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Listen;

    #[test]
    fn listen_forms() {
        assert_eq!("unix:/a/b".parse(), Ok(Listen::Unix("/a/b".into())));
        assert_eq!(
            "tcp:127.0.0.1:80".parse(),
            Ok(Listen::Tcp("127.0.0.1:80".into()))
        );
        assert!("tcp:nohost".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("http://x".parse::<Listen>().is_err());
    }
}
