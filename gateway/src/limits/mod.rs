//! Rate limits: token buckets per user, per connection and per client address.

mod memory;
mod redis;

use async_trait::async_trait;

pub use memory::MemoryLimits;
pub use redis::RedisLimits;

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitClass {
    /// Messages sent by one user, over all their connections.
    UserMessages,
    /// Events of any kind on one connection.
    ConnectionEvents,
    /// Joins by one user.
    UserJoins,
    /// New connections from one client address.
    AddressConnects,
    /// HTTP API requests by one user.
    UserRequests,
}

/// How fast each class refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    pub user_messages: Quota,
    pub connection_events: Quota,
    pub user_joins: Quota,
    pub address_connects: Quota,
    pub user_requests: Quota,
}

impl LimitSettings {
    pub fn quota(&self, class: LimitClass) -> Quota {
        match class {
            LimitClass::UserMessages => self.user_messages,
            LimitClass::ConnectionEvents => self.connection_events,
            LimitClass::UserJoins => self.user_joins,
            LimitClass::AddressConnects => self.address_connects,
            LimitClass::UserRequests => self.user_requests,
        }
    }
}

/// Refusal: come back after this many milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after_ms: u64,
}

#[async_trait]
pub trait Limits: Send + Sync + 'static {
    /// Takes one token from the bucket `(class, subject)`.
    async fn check(&self, class: LimitClass, subject: &str) -> Result<(), Throttled>;
}
