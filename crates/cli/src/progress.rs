//! Waiting for a daemon operation (`202` + `/v1/operations/{id}`): a progress bar on a
//! terminal, a plain line per 10 % otherwise, nothing with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use ferro_api::rest::{Operation, OperationState};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;

use crate::client::{Client, ClientError};

/// How the progress is shown.
enum Show {
    Bar(ProgressBar),
    Lines { last: i64 },
    Quiet,
}

impl Show {
    fn new(label: &str, quiet: bool) -> Self {
        if quiet {
            return Show::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(1000);
            let style =
                ProgressStyle::with_template("{prefix} [{bar:40}] {percent:>3}% {msg} ({elapsed})")
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Show::Bar(bar)
        } else {
            eprintln!("{label} ...");
            Show::Lines { last: -1 }
        }
    }

    fn update(&mut self, label: &str, op: &Operation) {
        match self {
            Show::Bar(b) => {
                b.set_position((op.progress * 10.0) as u64);
                b.set_message(op.message.clone());
            }
            Show::Lines { last } => {
                let step = (op.progress / 10.0).floor() as i64;
                if step > *last {
                    *last = step;
                    eprintln!("{label}: {:>3.0}% {}", op.progress, op.message);
                }
            }
            Show::Quiet => {}
        }
    }

    fn end(&self) {
        if let Show::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// Polls operation `op` until it ends, showing its progress as `label`; returns its result
/// as `T`, or the error the synchronous call would have given.
pub async fn wait<T: DeserializeOwned>(
    c: &Client,
    mut op: Operation,
    label: &str,
    quiet: bool,
) -> Result<T> {
    let mut show = Show::new(label, quiet);
    loop {
        show.update(label, &op);
        match op.state {
            OperationState::Running => {}
            OperationState::Succeeded => {
                show.end();
                let v = op.result.unwrap_or_default();
                return Ok(serde_json::from_value(v)
                    .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))?);
            }
            OperationState::Failed => {
                show.end();
                let e = op.error.unwrap_or(ferro_api::rest::ApiErrorBody {
                    code: "error".into(),
                    message: "the operation failed".into(),
                });
                return Err(ClientError::Api {
                    status: op.status.unwrap_or(500),
                    code: e.code,
                    message: e.message,
                }
                .into());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        op = c.operation(op.id).await?;
    }
}
