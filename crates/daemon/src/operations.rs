//! Long operations (image imports, full clones) run in the background when the request asks
//! for it (`?async=true`): the route answers 202 with an [`Operation`] and `Location:
//! /v1/operations/{id}`, the work updates its progress through a [`Tracker`], and
//! `GET /v1/operations/{id}` shows it until [`KEEP`] after it ended. Operations live in the
//! daemon's memory only: a daemon restart forgets them (and the work they did not finish
//! leaves nothing behind, as a failed synchronous call does not).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferro_api::rest::{ApiErrorBody, Operation, OperationState};

use crate::error::DaemonError;
use crate::store::now_ms;

/// How long a finished operation stays visible.
pub const KEEP: Duration = Duration::from_secs(600);
/// At most this many finished operations are kept.
const MAX_FINISHED: usize = 100;

#[derive(Default)]
struct State {
    next: u64,
    ops: BTreeMap<u64, (Operation, Option<Instant>)>,
}

/// The daemon's operations; cheap to clone.
#[derive(Clone, Default)]
pub struct Operations(Arc<Mutex<State>>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a piece of work reports its progress: to an operation, or nowhere (a synchronous
/// call).
#[derive(Clone, Default)]
pub struct Tracker(Option<(Operations, u64)>);

impl Tracker {
    /// A tracker that reports nowhere.
    pub fn none() -> Self {
        Self(None)
    }

    /// The operation's id, if there is one.
    pub fn id(&self) -> Option<u64> {
        self.0.as_ref().map(|(_, id)| *id)
    }

    /// Sets the percentage done (clamped to 0..=100; it never goes back) and what is being
    /// done.
    pub fn set(&self, percent: f64, message: &str) {
        if let Some((ops, id)) = &self.0 {
            if let Some((op, None)) = lock(&ops.0).ops.get_mut(id) {
                let p = if percent.is_finite() {
                    percent.clamp(0.0, 100.0)
                } else {
                    0.0
                };
                op.progress = op.progress.max(p);
                if op.message != message {
                    op.message = message.to_string();
                }
            }
        }
    }

    /// A tracker for part `i` of `n` equal parts of this one's work.
    pub fn part(&self, i: usize, n: usize) -> Part {
        Part {
            t: self.clone(),
            i,
            n: n.max(1),
        }
    }
}

/// One of `n` equal parts of an operation's work.
#[derive(Clone)]
pub struct Part {
    t: Tracker,
    i: usize,
    n: usize,
}

impl Part {
    /// This part is `percent` done.
    pub fn set(&self, percent: f64, message: &str) {
        let whole = (self.i as f64 + percent.clamp(0.0, 100.0) / 100.0) / self.n as f64 * 100.0;
        self.t.set(whole, message);
    }
}

impl Operations {
    /// Starts tracking a new operation.
    pub fn begin(&self, kind: &str, target: &str) -> (Operation, Tracker) {
        let mut st = lock(&self.0);
        st.next += 1;
        let id = st.next;
        let op = Operation {
            id,
            kind: kind.to_string(),
            target: target.to_string(),
            state: OperationState::Running,
            progress: 0.0,
            message: "starting".to_string(),
            result: None,
            error: None,
            status: None,
            started_ms: now_ms(),
        };
        st.ops.insert(id, (op.clone(), None));
        (op, Tracker(Some((self.clone(), id))))
    }

    /// Records how the operation of `t` ended.
    pub fn finish(&self, t: &Tracker, result: Result<serde_json::Value, DaemonError>) {
        let Some(id) = t.id() else { return };
        let mut st = lock(&self.0);
        if let Some((op, ended)) = st.ops.get_mut(&id) {
            match result {
                Ok(v) => {
                    op.state = OperationState::Succeeded;
                    op.progress = 100.0;
                    op.message = "done".to_string();
                    op.result = Some(v);
                }
                Err(e) => {
                    let (status, code) = e.status_code();
                    op.state = OperationState::Failed;
                    op.message = "failed".to_string();
                    op.status = Some(status.as_u16());
                    op.error = Some(ApiErrorBody {
                        code: code.to_string(),
                        message: e.to_string(),
                    });
                }
            }
            *ended = Some(Instant::now());
        }
        prune(&mut st);
    }

    /// One operation.
    pub fn get(&self, id: u64) -> Option<Operation> {
        let mut st = lock(&self.0);
        prune(&mut st);
        st.ops.get(&id).map(|(op, _)| op.clone())
    }

    /// Every operation still known, oldest first.
    pub fn list(&self) -> Vec<Operation> {
        let mut st = lock(&self.0);
        prune(&mut st);
        st.ops.values().map(|(op, _)| op.clone()).collect()
    }
}

fn prune(st: &mut State) {
    st.ops
        .retain(|_, (_, ended)| ended.is_none_or(|t| t.elapsed() < KEEP));
    let finished: Vec<u64> = st
        .ops
        .iter()
        .filter(|(_, (_, e))| e.is_some())
        .map(|(id, _)| *id)
        .collect();
    for id in finished
        .iter()
        .take(finished.len().saturating_sub(MAX_FINISHED))
    {
        st.ops.remove(id);
    }
}

/// Parses the progress `qemu-img convert -p` prints: `    (12.34/100%)` lines ended by
/// `\r`. Returns the last percentage in `chunk`.
pub fn parse_qemu_progress(chunk: &str) -> Option<f64> {
    chunk
        .split(['\r', '\n'])
        .filter_map(|l| {
            let l = l.trim();
            let inner = l.strip_prefix('(')?.strip_suffix("/100%)")?;
            inner.parse::<f64>().ok()
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            parse_qemu_progress("    (0.00/100%)\r    (12.50/100%)\r"),
            Some(12.5)
        );
        assert_eq!(parse_qemu_progress("    (100.00/100%)\r\n"), Some(100.0));
        assert_eq!(parse_qemu_progress("garbage"), None);
        assert_eq!(parse_qemu_progress("(x/100%)"), None);
    }

    #[test]
    fn operations_run_and_end() {
        let ops = Operations::default();
        let (op, t) = ops.begin("image_import", "a");
        assert_eq!(op.state, OperationState::Running);
        t.part(1, 2).set(50.0, "converting");
        let now = ops.get(op.id).unwrap();
        assert_eq!((now.progress, now.message.as_str()), (75.0, "converting"));
        t.set(10.0, "x");
        assert_eq!(ops.get(op.id).unwrap().progress, 75.0, "never goes back");
        ops.finish(&t, Err(DaemonError::Conflict("taken".into())));
        let end = ops.get(op.id).unwrap();
        assert_eq!(end.state, OperationState::Failed);
        assert_eq!(end.status, Some(409));
        assert_eq!(end.error.unwrap().code, "conflict");
        let (_, t2) = ops.begin("vm_clone", "b");
        ops.finish(&t2, Ok(serde_json::json!({"name": "b"})));
        assert_eq!(ops.list().len(), 2);
        Tracker::none().set(5.0, "nothing happens");
    }
}
