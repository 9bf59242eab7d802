//! The daemon's errors, and how each becomes an HTTP status with `{"code", "message"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferro_api::rest::ApiErrorBody;
use thiserror::Error;

/// Anything an API call or the daemon itself can fail with.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The request is malformed or out of range.
    #[error("{0}")]
    BadRequest(String),
    /// No VM has that name.
    #[error("no VM named '{0}' (see `ferro vm list`)")]
    NotFound(String),
    /// A VM with that name exists.
    #[error("a VM named '{0}' exists already: pick another name or delete it first")]
    Exists(String),
    /// The VM's state does not allow the request.
    #[error("{0}")]
    InvalidState(String),
    /// No image or template has that name.
    #[error("no {what} named '{name}' (see `ferro {what} list`)")]
    NoSuch {
        /// `image` or `template`.
        what: &'static str,
        /// The name asked for.
        name: String,
    },
    /// VM `vm` has no snapshot of that name.
    #[error("VM '{vm}' has no snapshot named '{name}' (see `ferro vm snapshot list {vm}`)")]
    NoSnapshot {
        /// The VM.
        vm: String,
        /// The snapshot asked for.
        name: String,
    },
    /// The request conflicts with what exists (a name taken, an image in use).
    #[error("{0}")]
    Conflict(String),
    /// A file to import is not a usable disk image (unknown, unsupported or corrupt).
    #[error("{message}")]
    BadImage {
        /// `bad_image`, `unsupported_image` or `corrupt_image`.
        code: &'static str,
        /// What is wrong, naming the file.
        message: String,
    },
    /// A snapshot directory is not one this daemon's `ferro-vmm` can run.
    #[error("{message}")]
    BadSnapshot {
        /// `bad_snapshot` (missing, corrupt, not this VM's) or `unsupported_snapshot`
        /// (another format version).
        code: &'static str,
        /// What is wrong, naming the directory.
        message: String,
    },
    /// Another daemon (a migration's peer) refused or could not be reached.
    #[error("{0}")]
    Peer(String),
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
    /// The VMM could not be started or did not answer.
    #[error("{0}")]
    Vmm(String),
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] rusqlite::Error),
    /// A host file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Shorthand for a host I/O failure.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// HTTP status and machine-readable code.
    pub fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            DaemonError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            DaemonError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            DaemonError::Exists(_) => (StatusCode::CONFLICT, "conflict"),
            DaemonError::NoSuch { .. } | DaemonError::NoSnapshot { .. } => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            DaemonError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            DaemonError::BadImage { code, .. } | DaemonError::BadSnapshot { code, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, code)
            }
            DaemonError::Peer(_) => (StatusCode::BAD_GATEWAY, "peer_failed"),
            DaemonError::InvalidState(_) => (StatusCode::CONFLICT, "invalid_state"),
            DaemonError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            DaemonError::Vmm(_) => (StatusCode::INTERNAL_SERVER_ERROR, "vmm_failed"),
            DaemonError::Store(_) | DaemonError::Io { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

/// An error response body with its status.
pub fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ApiErrorBody {
            code: code.to_string(),
            message,
        }),
    )
        .into_response()
}

impl IntoResponse for DaemonError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        error_response(status, code, self.to_string())
    }
}
