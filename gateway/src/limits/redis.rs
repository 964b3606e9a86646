//! `RedisLimits`: token buckets shared by every gateway, one Lua script per check.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::Client;
use fred::types::scripts::Script;

use super::{LimitClass, LimitSettings, Limits, MemoryLimits, Throttled};
use crate::telemetry::{Backend, Metrics};

/// KEYS: bucket. ARGV: tokens per second, burst. A hash {tokens, at} refilled lazily on each
/// check, by Redis's clock. Returns 0 when a token was taken, else milliseconds until one is.
const TOKEN_BUCKET: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return wait
"#;

/// Per-user and per-address buckets are shared; a connection lives on one node, so its
/// bucket stays in memory there (no Redis round trip per event, no id clash across nodes).
pub struct RedisLimits {
    local: MemoryLimits,
    client: Client,
    settings: LimitSettings,
    prefix: String,
    script: Script,
    /// Counts the failures this backend swallows (it fails open).
    metrics: Arc<Metrics>,
}

fn class_name(class: LimitClass) -> &'static str {
    match class {
        LimitClass::UserMessages => "user-messages",
        LimitClass::ConnectionEvents => "connection-events",
        LimitClass::UserJoins => "user-joins",
        LimitClass::AddressConnects => "address-connects",
        LimitClass::UserRequests => "user-requests",
    }
}

impl RedisLimits {
    pub async fn connect(
        url: &str,
        prefix: &str,
        settings: LimitSettings,
    ) -> Result<Self, fred::error::Error> {
        Ok(Self {
            local: MemoryLimits::new(settings),
            client: crate::redis::connect(url).await?,
            settings,
            prefix: prefix.to_owned(),
            script: Script::from_lua(TOKEN_BUCKET),
            metrics: Metrics::disabled(),
        })
    }

    /// Counts Redis failures (the checks still fail open) in `confab_backend_errors_total`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

#[async_trait]
impl Limits for RedisLimits {
    /// Fails open: a Redis outage must not stop people from chatting, and the per-connection
    /// bucket of each node still bounds what one client can do.
    async fn check(&self, class: LimitClass, subject: &str) -> Result<(), Throttled> {
        if class == LimitClass::ConnectionEvents {
            return self.local.check(class, subject).await;
        }
        let quota = self.settings.quota(class);
        let key = format!("{}:rl:{}:{subject}", self.prefix, class_name(class));
        let result: Result<i64, _> = tokio::time::timeout(
            Duration::from_secs(1),
            self.script.evalsha_with_reload(
                &self.client,
                vec![key],
                vec![quota.per_second.max(1), quota.burst.max(1)],
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                "rate limit check timed out",
            ))
        });
        match result {
            Ok(0) => Ok(()),
            Ok(wait) => Err(Throttled {
                retry_after_ms: wait.max(1) as u64,
            }),
            Err(e) => {
                self.metrics.backend_error(Backend::Limits, "check");
                tracing::warn!(error = %e, "shared rate limit unavailable; allowing");
                Ok(())
            }
        }
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
    async fn two_nodes_draw_from_one_shared_bucket() {
        let url = std::env::var("CONFAB_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("confab-test-{}", uuid::Uuid::now_v7().simple());
        let a = RedisLimits::connect(&url, &prefix, settings(1, 4))
            .await
            .expect("a");
        let b = RedisLimits::connect(&url, &prefix, settings(1, 4))
            .await
            .expect("b");
        for node in [&a, &b, &a, &b] {
            node.check(LimitClass::UserMessages, "alice")
                .await
                .expect("within the shared burst");
        }
        let refused = b
            .check(LimitClass::UserMessages, "alice")
            .await
            .expect_err("the fifth token is not there on either node");
        assert!(
            refused.retry_after_ms > 0 && refused.retry_after_ms <= 1000,
            "{refused:?}"
        );
        a.check(LimitClass::UserMessages, "bob")
            .await
            .expect("buckets are per subject");
        a.check(LimitClass::UserJoins, "alice")
            .await
            .expect("buckets are per class");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        a.check(LimitClass::UserMessages, "alice")
            .await
            .expect("refilled after a second");
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_connect() {
        assert!(
            RedisLimits::connect("redis://127.0.0.1:1", "x", settings(1, 1))
                .await
                .is_err()
        );
    }
}
