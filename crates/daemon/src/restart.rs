//! Restart policy: whether a VM whose VMM ended comes back, after how long, and when a crash
//! loop makes the daemon give up. Pure, so it is tested without processes.

use std::time::{Duration, Instant};

use ferro_api::rest::RestartPolicy;

/// Restarts allowed within [`LOOP_WINDOW`] before the daemon gives up.
pub const LOOP_LIMIT: usize = 5;
/// The window of the crash-loop limit.
pub const LOOP_WINDOW: Duration = Duration::from_secs(60);
/// Longest wait before a restart.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a VMM ended, as the daemon saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0: the guest powered off (or `quit`).
    Clean,
    /// A non-zero exit status.
    Failed(i32),
    /// Killed by a signal, or gone without saying why.
    Killed,
}

/// What to do about an unrequested end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave it stopped (clean end, no restart wanted).
    Stop,
    /// Leave it crashed.
    Crashed,
    /// Restart after the delay.
    Restart(Duration),
    /// The crash-loop limit is reached: leave it crashed.
    GiveUp,
}

/// Recent restarts of one VM.
#[derive(Debug, Default, Clone)]
pub struct History {
    restarts: Vec<Instant>,
}

impl History {
    /// Decides, at `now`, what `policy` says about `outcome`, and records a restart.
    pub fn decide(&mut self, policy: RestartPolicy, outcome: Outcome, now: Instant) -> Decision {
        let failed = outcome != Outcome::Clean;
        let wanted = match policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Always => true,
        };
        if !wanted {
            return if failed {
                Decision::Crashed
            } else {
                Decision::Stop
            };
        }
        self.restarts
            .retain(|t| now.saturating_duration_since(*t) < LOOP_WINDOW);
        if self.restarts.len() >= LOOP_LIMIT {
            return Decision::GiveUp;
        }
        // The first restart is at once; then 250 ms, 500 ms, 1 s, ... up to MAX_BACKOFF.
        let n = self.restarts.len() as u32;
        let delay = match n {
            0 => Duration::ZERO,
            n => (Duration::from_millis(250) * 2u32.saturating_pow(n - 1)).min(MAX_BACKOFF),
        };
        self.restarts.push(now);
        Decision::Restart(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let now = Instant::now();
        let mut h = History::default();
        assert_eq!(
            h.decide(RestartPolicy::Never, Outcome::Killed, now),
            Decision::Crashed
        );
        assert_eq!(
            h.decide(RestartPolicy::Never, Outcome::Clean, now),
            Decision::Stop
        );
        assert_eq!(
            h.decide(RestartPolicy::OnFailure, Outcome::Clean, now),
            Decision::Stop
        );
        assert_eq!(
            h.decide(RestartPolicy::OnFailure, Outcome::Failed(3), now),
            Decision::Restart(Duration::ZERO)
        );
        assert_eq!(
            h.decide(RestartPolicy::Always, Outcome::Clean, now),
            Decision::Restart(Duration::from_millis(250))
        );
    }

    #[test]
    fn crash_loop_gives_up_and_recovers() {
        let t0 = Instant::now();
        let mut h = History::default();
        for _ in 0..LOOP_LIMIT {
            assert!(matches!(
                h.decide(RestartPolicy::Always, Outcome::Killed, t0),
                Decision::Restart(_)
            ));
        }
        assert_eq!(
            h.decide(RestartPolicy::Always, Outcome::Killed, t0),
            Decision::GiveUp
        );
        let later = t0 + LOOP_WINDOW + Duration::from_secs(1);
        assert_eq!(
            h.decide(RestartPolicy::Always, Outcome::Killed, later),
            Decision::Restart(Duration::ZERO)
        );
    }
}
