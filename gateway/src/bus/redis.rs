//! `RedisBus`: events between gateways over Redis pub/sub, one channel per topic key.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::{Client, ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::error::RecvError;

use super::{Bus, BusError, Deliver, SeenEnvelopes, routing_keys};
use crate::chat::event::{Envelope, Topic};

struct Shared {
    node_id: String,
    deliver: OnceLock<Deliver>,
    seen: SeenEnvelopes,
    /// Channels this node holds. Redis may still hand over a message published just after an
    /// UNSUBSCRIBE was sent; checking here makes "nothing arrives for a topic given up" exact.
    held: Mutex<HashSet<String>>,
    /// See [`Bus::epoch`]: bumped on every reconnect of the subscriber (pub/sub is
    /// at-most-once: what was published meanwhile is gone for this node).
    epoch: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn deliver_locally(&self, envelope: Arc<Envelope>) {
        if !self.seen.first_time(envelope.id) {
            return;
        }
        if let Some(deliver) = self.deliver.get() {
            deliver(envelope);
        }
    }
}

/// Pub/sub is at-most-once: what is published while a node's subscriber reconnects is lost to
/// that node, exactly like a RabbitMQ outage, and its clients recover with `sync`.
pub struct RedisBus {
    shared: Arc<Shared>,
    publisher: Client,
    subscriber: SubscriberClient,
    /// Channel names are `<prefix>:bus:<topic key>`.
    prefix: String,
}

impl RedisBus {
    pub async fn connect(url: &str, prefix: &str, node_id: &str) -> Result<Self, BusError> {
        let publisher = crate::redis::connect(url).await?;
        let subscriber = crate::redis::builder(url)?.build_subscriber_client()?;
        subscriber.init().await?;
        // Re-subscribes every held channel after a reconnect.
        subscriber.manage_subscriptions();
        let shared = Arc::new(Shared {
            node_id: node_id.to_owned(),
            deliver: OnceLock::new(),
            seen: SeenEnvelopes::new(4096),
            held: Mutex::new(HashSet::new()),
            epoch: std::sync::atomic::AtomicU64::new(0),
        });
        {
            let mut reconnects = subscriber.reconnect_rx();
            let weak = Arc::downgrade(&shared);
            tokio::spawn(async move {
                while reconnects.recv().await.is_ok() {
                    let Some(shared) = weak.upgrade() else { break };
                    shared
                        .epoch
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
            });
        }
        let mut messages = subscriber.message_rx();
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                let message = match messages.recv().await {
                    Ok(m) => m,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "Redis bus reader fell behind; clients recover with sync"
                        );
                        continue;
                    }
                    Err(RecvError::Closed) => break,
                };
                let Some(shared) = weak.upgrade() else { break };
                let held = shared
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&*message.channel);
                if !held {
                    continue;
                }
                let Some(bytes) = message.value.as_bytes() else {
                    continue;
                };
                match serde_json::from_slice::<Envelope>(bytes) {
                    Ok(e) if e.origin == shared.node_id => {}
                    Ok(e) => shared.deliver_locally(Arc::new(e)),
                    Err(e) => tracing::warn!(error = %e, "dropping an undecodable bus envelope"),
                }
            }
        });
        Ok(Self {
            shared,
            publisher,
            subscriber,
            prefix: prefix.to_owned(),
        })
    }

    fn channel(&self, key: &str) -> String {
        format!("{}:bus:{key}", self.prefix)
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn attach(&self, deliver: Deliver) {
        if self.shared.deliver.set(deliver).is_err() {
            tracing::warn!("RedisBus::attach called twice; keeping the first receiver");
        }
    }

    /// Local recipients first, then one PUBLISH per distinct key (receivers drop copies).
    async fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        self.shared.deliver_locally(envelope.clone());
        if !self.publisher.is_connected() {
            return Err(BusError::Disconnected("Redis is unreachable".into()));
        }
        let payload = serde_json::to_string(&*envelope)?;
        for key in routing_keys(&envelope.route) {
            let _: i64 = self
                .publisher
                .publish(self.channel(&key), payload.as_str())
                .await?;
        }
        Ok(())
    }

    async fn subscribe(&self, topic: Topic) -> Result<(), BusError> {
        let channel = self.channel(&topic.key());
        self.shared
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.clone());
        self.subscriber.subscribe(channel).await?;
        Ok(())
    }

    async fn unsubscribe(&self, topic: Topic) -> Result<(), BusError> {
        let channel = self.channel(&topic.key());
        self.shared
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&channel);
        self.subscriber.unsubscribe(channel).await?;
        Ok(())
    }

    fn epoch(&self) -> u64 {
        self.shared.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn ready(&self) -> bool {
        self.shared.deliver.get().is_some()
            && self.publisher.is_connected()
            && self.subscriber.is_connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn redis_url() -> String {
        std::env::var("CONFAB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    async fn node(prefix: &str, name: &str) -> RedisBus {
        RedisBus::connect(&redis_url(), prefix, name)
            .await
            .expect("the local Redis answers (scripts/services.sh starts it)")
    }

    #[tokio::test]
    async fn redis_bus_meets_the_bus_contract() {
        let prefix = format!("confab-test-{}", uuid::Uuid::now_v7().simple());
        crate::bus::contract::run(&node(&prefix, "a").await).await;
    }

    #[tokio::test]
    async fn redis_bus_carries_envelopes_between_two_nodes() {
        let prefix = format!("confab-test-{}", uuid::Uuid::now_v7().simple());
        let a = node(&prefix, "a").await;
        let b = node(&prefix, "b").await;
        crate::bus::contract::run_two_nodes(&a, &b).await;
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_connect() {
        assert!(
            RedisBus::connect("redis://127.0.0.1:1", "x", "n")
                .await
                .is_err()
        );
    }
}
