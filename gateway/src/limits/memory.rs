//! `MemoryLimits`: token buckets of one gateway, with `governor`'s keyed rate limiters.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota as GQuota, RateLimiter};

use super::{LimitClass, LimitSettings, Limits, Throttled};

pub struct MemoryLimits {
    buckets: HashMap<LimitClass, Arc<DefaultKeyedRateLimiter<String>>>,
    clock: DefaultClock,
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("max(1) is never zero")
}

impl MemoryLimits {
    pub fn new(settings: LimitSettings) -> Self {
        let buckets = [
            LimitClass::UserMessages,
            LimitClass::ConnectionEvents,
            LimitClass::UserJoins,
            LimitClass::AddressConnects,
            LimitClass::UserRequests,
        ]
        .into_iter()
        .map(|class| {
            let q = settings.quota(class);
            let quota = GQuota::per_second(nonzero(q.per_second)).allow_burst(nonzero(q.burst));
            (class, Arc::new(RateLimiter::keyed(quota)))
        })
        .collect();
        Self {
            buckets,
            clock: DefaultClock::default(),
        }
    }

    /// Forgets full buckets now and then, so the key maps do not grow with every user ever seen.
    pub fn spawn_housekeeping(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(limits) = weak.upgrade() else { break };
                for bucket in limits.buckets.values() {
                    bucket.retain_recent();
                    bucket.shrink_to_fit();
                }
            }
        });
    }
}

#[async_trait]
impl Limits for MemoryLimits {
    async fn check(&self, class: LimitClass, subject: &str) -> Result<(), Throttled> {
        let Some(bucket) = self.buckets.get(&class) else {
            return Ok(());
        };
        bucket.check_key(&subject.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Throttled {
                retry_after_ms: (wait.as_millis() as u64).max(1),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Quota;

    fn settings(per_second: u32, burst: u32) -> LimitSettings {
        let q = Quota { per_second, burst };
        LimitSettings {
            user_messages: q,
            connection_events: q,
            user_joins: q,
            address_connects: q,
            user_requests: q,
        }
    }

    #[tokio::test]
    async fn a_burst_passes_then_the_next_request_is_throttled_with_a_retry_time() {
        let limits = MemoryLimits::new(settings(1, 3));
        for _ in 0..3 {
            limits
                .check(LimitClass::UserMessages, "alice")
                .await
                .expect("within burst");
        }
        let refused = limits
            .check(LimitClass::UserMessages, "alice")
            .await
            .expect_err("over burst");
        assert!(
            refused.retry_after_ms > 0 && refused.retry_after_ms <= 1000,
            "{refused:?}"
        );
        limits
            .check(LimitClass::UserMessages, "bob")
            .await
            .expect("buckets are per subject");
        limits
            .check(LimitClass::UserJoins, "alice")
            .await
            .expect("buckets are per class");
    }
}
