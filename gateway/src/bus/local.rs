//! `LocalBus`: the in-process bus of a single gateway; publishing delivers right away.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;

use super::{Bus, BusError, Deliver};
use crate::chat::event::{Envelope, Topic};

/// With one node every envelope is local, so topics need no bookkeeping: the hub already knows
/// which local connections want what.
#[derive(Default)]
pub struct LocalBus {
    deliver: OnceLock<Deliver>,
}

impl LocalBus {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn attach(&self, deliver: Deliver) {
        if self.deliver.set(deliver).is_err() {
            tracing::warn!("LocalBus::attach called twice; keeping the first receiver");
        }
    }

    async fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        let deliver = self
            .deliver
            .get()
            .ok_or_else(|| BusError::Disconnected("no receiver attached".into()))?;
        deliver(envelope);
        Ok(())
    }

    async fn subscribe(&self, _topic: Topic) -> Result<(), BusError> {
        Ok(())
    }

    async fn unsubscribe(&self, _topic: Topic) -> Result<(), BusError> {
        Ok(())
    }

    async fn ready(&self) -> bool {
        self.deliver.get().is_some()
    }

    /// One process: nothing is ever missed.
    fn epoch(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_bus_meets_the_bus_contract() {
        let bus = LocalBus::new();
        crate::bus::contract::run(&bus).await;
    }

    #[tokio::test]
    async fn publish_before_attach_is_an_error_not_a_silent_drop() {
        let bus = LocalBus::new();
        let envelope = crate::bus::contract::envelope_for(uuid::Uuid::now_v7(), 1);
        assert!(matches!(
            bus.publish(Arc::new(envelope)).await,
            Err(BusError::Disconnected(_))
        ));
        assert!(!bus.ready().await);
    }
}
