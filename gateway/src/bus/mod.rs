//! Carries events between gateways: publish an envelope, receive the ones routed to topics held here.

mod local;
mod rabbitmq;
mod redis;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use thiserror::Error;

use crate::chat::event::{Envelope, Event, Route, Topic};
use uuid::Uuid;

pub use local::LocalBus;
pub use rabbitmq::{RabbitBus, RabbitSettings};
pub use redis::RedisBus;

#[derive(Debug, Error)]
pub enum BusError {
    #[error("the bus is not connected: {0}")]
    Disconnected(String),
    #[error("the bus refused the message: {0}")]
    Rejected(String),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("Redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("envelope does not encode: {0}")]
    Encoding(#[from] serde_json::Error),
}

/// Receives every envelope routed to this node, in publish order per topic.
pub type Deliver = Arc<dyn Fn(Arc<Envelope>) + Send + Sync>;

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sets where incoming envelopes go. Called once, before any publish.
    fn attach(&self, deliver: Deliver);
    /// Publishes an envelope; resolves once the bus has accepted it (publisher confirm).
    async fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError>;
    /// Starts receiving envelopes routed to `topic` (this node gained a local subscriber).
    async fn subscribe(&self, topic: Topic) -> Result<(), BusError>;
    /// Stops receiving `topic` (this node's last local subscriber left).
    async fn unsubscribe(&self, topic: Topic) -> Result<(), BusError>;
    /// Whether the bus can publish right now, for readiness.
    async fn ready(&self) -> bool;
    /// Moves on whenever this node may have missed envelopes (its broker connection was lost
    /// or restored): what was kept up to date by envelopes (the conversation cache) is dropped.
    fn epoch(&self) -> u64 {
        0
    }
}

/// The distinct bus keys a route is published under. A node holding several of them (a
/// conversation and one of its `also_users`) gets the envelope more than once and drops the
/// copies with [`SeenEnvelopes`]; publishing once per key keeps routing in the broker, so no
/// node receives what it holds no key for.
pub(crate) fn routing_keys(route: &Route) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for topic in route.topics() {
        let key = topic.key();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// Whether an envelope is a committed message for downstream consumers (notifications,
/// search): the conversation copy only, so a support message is not exported twice.
pub(crate) fn is_committed_message(envelope: &Envelope) -> bool {
    matches!(
        (&envelope.event, &envelope.route),
        (Event::NewMessage(_), Route::Conversation { .. })
    )
}

/// The ids of the last envelopes delivered here, to drop the extra copies of an envelope
/// published under several keys this node holds. Copies arrive close together (one publisher,
/// one queue), so a few thousand recent ids are plenty.
pub(crate) struct SeenEnvelopes {
    inner: Mutex<(VecDeque<Uuid>, HashSet<Uuid>)>,
    capacity: usize,
}

impl SeenEnvelopes {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
        }
    }

    /// `true` the first time an id is offered.
    pub(crate) fn first_time(&self, id: Uuid) -> bool {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (order, set) = &mut *guard;
        if !set.insert(id) {
            return false;
        }
        order.push_back(id);
        if order.len() > self.capacity
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
pub(crate) mod contract;
