//! Token expiry of live connections: one timer task for the whole gateway sends
//! `token_expiring` ahead of each session's `exp` and closes it at `exp`, so an idle connection
//! keeps no timer and no task of its own for it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::Session;
use super::protocol::{ErrorReply, TokenExpiring};
use crate::chat::ChatService;
use crate::chat::error::ChatError;
use crate::chat::event::Outgoing;
use crate::chat::hub::CloseReason;

/// Unix milliseconds: when the next look at a session is due.
type Due = i64;

/// The sessions whose token runs out, by when they are next looked at. A session's key is its
/// current entry (`Session::due`), so a renewal replaces the entry and a close removes it.
pub struct Expiries {
    warning: Duration,
    due: Mutex<BTreeMap<(Due, usize), Weak<Session>>>,
    /// An entry earlier than the one the timer sleeps for was added.
    sooner: Arc<Notify>,
    started: std::sync::Once,
}

/// What a session is owed when its entry comes due.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Warn {
        exp: i64,
    },
    Expire,
    /// Not yet (a renewal moved `exp`): look again then.
    Later(Due),
}

/// The step for a session whose token runs out at `exp` (Unix seconds), warned already for
/// `warned_for`, at `now` (Unix ms).
fn step(exp: i64, warned_for: i64, warning: Duration, now: Due) -> Step {
    let at = exp.saturating_mul(1000);
    if now >= at {
        return Step::Expire;
    }
    let warn_at = at.saturating_sub(warning.as_millis() as i64);
    if warned_for == exp {
        Step::Later(at)
    } else if now >= warn_at {
        Step::Warn { exp }
    } else {
        Step::Later(warn_at)
    }
}

fn now_ms() -> Due {
    chrono::Utc::now().timestamp_millis()
}

fn key_of(session: &Session) -> usize {
    std::ptr::from_ref(session) as usize
}

impl Expiries {
    pub fn new(warning: Duration) -> Arc<Self> {
        Arc::new(Self {
            warning,
            due: Mutex::new(BTreeMap::new()),
            sooner: Arc::new(Notify::new()),
            started: std::sync::Once::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Due, usize), Weak<Session>>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `session` for its current `exp` (again after a `refresh_token`). Its first
    /// look is due at once, so a token already inside the warning window is warned now.
    pub fn watch(self: &Arc<Self>, session: &Arc<Session>) {
        self.started.call_once(|| {
            tokio::spawn(run(Arc::downgrade(self), self.sooner.clone()));
        });
        self.schedule(session, now_ms());
        self.sooner.notify_one();
    }

    fn schedule(&self, session: &Arc<Session>, due: Due) {
        let key = key_of(session);
        let mut entries = self.lock();
        let old = session.due.swap(due, Ordering::AcqRel);
        if old != 0 {
            entries.remove(&(old, key));
        }
        entries.insert((due, key), Arc::downgrade(session));
    }

    /// Stops watching: the connection is gone.
    pub fn forget(&self, session: &Session) {
        let mut entries = self.lock();
        let old = session.due.swap(0, Ordering::AcqRel);
        if old != 0 {
            entries.remove(&(old, key_of(session)));
        }
    }

    /// Sessions watched (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every entry due by `now` and does what each is owed; returns when the next is due.
    fn fire(&self, now: Due) -> Option<Due> {
        let mut owed = Vec::new();
        {
            let mut entries = self.lock();
            while let Some(entry) = entries.first_entry() {
                let (due, _) = *entry.key();
                if due > now {
                    break;
                }
                let weak = entry.remove();
                let Some(session) = weak.upgrade() else {
                    continue;
                };
                // Its entry is gone: a close racing this one finds nothing to remove.
                if session
                    .due
                    .compare_exchange(due, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    owed.push(session);
                }
            }
        }
        for session in owed {
            let exp = session.exp.load(Ordering::Acquire);
            let warned_for = session.warned_for.load(Ordering::Acquire);
            match step(exp, warned_for, self.warning, now) {
                Step::Later(due) => self.schedule(&session, due),
                Step::Warn { exp } => {
                    session.warned_for.store(exp, Ordering::Release);
                    let seconds_left = (exp - now / 1000).max(0);
                    ChatService::direct(
                        session.out.as_ref(),
                        &Outgoing::new("token_expiring", &TokenExpiring { exp, seconds_left }),
                    );
                    self.schedule(&session, exp.saturating_mul(1000));
                }
                Step::Expire => {
                    let expired = Outgoing::new(
                        "session_expired",
                        &ErrorReply::from(&ChatError::Unauthorized("token expired".into())),
                    );
                    ChatService::direct(session.out.as_ref(), &expired);
                    session.out.close(CloseReason::Expired);
                }
            }
        }
        self.lock().first_key_value().map(|((due, _), _)| *due)
    }
}

/// The timer: sleeps until the earliest entry (or until a sooner one is added), for as long as
/// the gateway exists.
async fn run(expiries: Weak<Expiries>, sooner: Arc<Notify>) {
    loop {
        let sooner = sooner.notified();
        let mut sooner = std::pin::pin!(sooner);
        sooner.as_mut().enable();
        let Some(this) = expiries.upgrade() else {
            return;
        };
        let now = now_ms();
        let next = this.fire(now);
        drop(this);
        match next {
            Some(due) => {
                let wait = Duration::from_millis((due - now).max(0) as u64);
                tokio::select! {
                    () = sooner => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
            None => sooner.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARN: Duration = Duration::from_secs(60);

    #[test]
    fn a_token_is_warned_a_warning_ahead_then_expired_at_exp() {
        let exp = 1_000;
        assert_eq!(step(exp, 0, WARN, 100_000), Step::Later(940_000));
        assert_eq!(step(exp, 0, WARN, 940_000), Step::Warn { exp });
        assert_eq!(step(exp, exp, WARN, 940_001), Step::Later(1_000_000));
        assert_eq!(step(exp, exp, WARN, 1_000_000), Step::Expire);
    }

    #[test]
    fn a_token_inside_the_window_is_warned_at_once_and_a_renewal_is_warned_again() {
        assert_eq!(step(1_000, 0, WARN, 990_000), Step::Warn { exp: 1_000 });
        // Renewed to 2,000 after the warning for 1,000: the next warning is for 2,000.
        assert_eq!(step(2_000, 1_000, WARN, 990_000), Step::Later(1_940_000));
        assert_eq!(
            step(2_000, 1_000, WARN, 1_940_000),
            Step::Warn { exp: 2_000 }
        );
    }

    #[test]
    fn an_expired_token_expires_even_if_never_warned() {
        assert_eq!(step(1_000, 0, WARN, 1_000_000), Step::Expire);
        assert_eq!(step(0, 0, WARN, 5), Step::Expire);
    }
}
