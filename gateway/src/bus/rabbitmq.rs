//! `RabbitBus`: events between gateways over RabbitMQ — a topic exchange, one exclusive queue per node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use super::{Bus, BusError, Deliver, SeenEnvelopes, is_committed_message, routing_keys};
use crate::chat::event::{Envelope, Topic};

/// How long a publish waits for the broker's confirm before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RabbitSettings {
    pub url: String,
    /// Exchange names are `<prefix>.events` and `<prefix>.messages` (`confab` in production;
    /// tests use a unique prefix so runs never share routing).
    pub prefix: String,
    /// This gateway's id: its own envelopes coming back from the broker are skipped.
    pub node_id: String,
}

/// What a live connection needs; replaced wholesale on reconnect.
struct Live {
    channel: Channel,
    queue: String,
}

/// How many routing keys the users are spread over (see [`broker_key`]).
const USER_KEY_BUCKETS: u32 = 64;

/// The broker routing key of a topic key. A user's topic (`user.<id>`) maps to one of
/// [`USER_KEY_BUCKETS`] shared keys: a binding is a broker transaction (tens per second on a
/// busy RabbitMQ), and one binding per connected user made a node that takes in thousands of
/// users at once (a reconnect storm, a drained neighbour) wait tens of seconds for its
/// bindings. A node so receives user-addressed events of other users in its buckets too; the
/// hub delivers them to nobody. Conversation and department keys are kept as they are. The
/// hash is FNV-1a, fixed here, so every node and version agrees on the bucket.
fn broker_key(key: &str) -> String {
    let Some(user) = key.strip_prefix("user.") else {
        return key.to_owned();
    };
    let mut hash: u32 = 0x811c_9dc5;
    for b in user.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("users.{}", hash % USER_KEY_BUCKETS)
}

struct Shared {
    settings: RabbitSettings,
    events_exchange: String,
    messages_exchange: String,
    deliver: OnceLock<Deliver>,
    seen: SeenEnvelopes,
    /// See [`Bus::epoch`]: bumped when the connection is lost and when it is back.
    epoch: std::sync::atomic::AtomicU64,
    /// Routing keys this node holds; bound on every (re)connect.
    /// The live connection, and each broker routing key held here with the number of topics
    /// that need it (several users share a key, see [`broker_key`]).
    state: Mutex<(Option<Live>, HashMap<String, usize>)>,
    connected: AtomicBool,
}

pub struct RabbitBus {
    shared: Arc<Shared>,
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

    /// Opens a connection, declares the exchanges and this node's queue, binds every held
    /// key and starts consuming. Returns when the node is fully wired.
    async fn connect(self: &Arc<Self>) -> Result<Connection, BusError> {
        let connection = Connection::connect(
            &self.settings.url,
            ConnectionProperties::default()
                .with_connection_name(format!("confab-gateway {}", self.settings.node_id).into()),
        )
        .await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.messages_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        // Server-named, exclusive and auto-delete: the queue dies with the connection, so a
        // crashed node leaves nothing behind and a reconnect starts from a clean queue.
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue_name = queue.name().to_string();
        let mut state = self.state.lock().await;
        for key in state.1.keys() {
            channel
                .queue_bind(
                    queue_name.as_str().into(),
                    self.events_exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        // Auto-ack: an envelope lost with a dying connection is recovered by the client's
        // `sync`, and not acking keeps delivery in order and cheap.
        let mut consumer = channel
            .basic_consume(
                queue_name.as_str().into(),
                format!("confab-{}", self.settings.node_id).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        state.0 = Some(Live {
            channel,
            queue: queue_name,
        });
        drop(state);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let Ok(delivery) = delivery else { break };
                let Some(shared) = weak.upgrade() else { break };
                match serde_json::from_slice::<Envelope>(&delivery.data) {
                    // Our own envelopes were delivered locally when published.
                    Ok(e) if e.origin == shared.settings.node_id => {}
                    Ok(e) => shared.deliver_locally(Arc::new(e)),
                    Err(e) => tracing::warn!(error = %e, "dropping an undecodable bus envelope"),
                }
            }
        });
        self.connected.store(true, Ordering::Release);
        Ok(connection)
    }

    /// Keeps the node connected: waits for the connection to fail, then reconnects with
    /// exponential backoff, re-declaring and re-binding everything held.
    async fn supervise(self: Arc<Self>, mut connection: Connection) {
        loop {
            while connection.status().connected() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if Arc::strong_count(&self) == 1 {
                    return;
                }
            }
            self.connected.store(false, Ordering::Release);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.state.lock().await.0 = None;
            tracing::warn!("RabbitMQ connection lost; local delivery goes on, reconnecting");
            let mut backoff = Duration::from_millis(100);
            connection = loop {
                if Arc::strong_count(&self) == 1 {
                    return;
                }
                match self.connect().await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "RabbitMQ reconnect failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
            self.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!("RabbitMQ connection restored");
        }
    }

    async fn channel(&self) -> Option<Channel> {
        self.state
            .lock()
            .await
            .0
            .as_ref()
            .map(|l| l.channel.clone())
    }

    async fn publish_confirmed(
        &self,
        channel: &Channel,
        exchange: &str,
        key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BusError> {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await?;
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Nack(_))) => Err(BusError::Rejected("broker nacked".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(BusError::Disconnected(
                "no publisher confirm in time".into(),
            )),
        }
    }
}

impl RabbitBus {
    /// Connects (failing fast when the broker is unreachable) and keeps the connection up.
    pub async fn connect(settings: RabbitSettings) -> Result<Self, BusError> {
        let shared = Arc::new(Shared {
            events_exchange: format!("{}.events", settings.prefix),
            messages_exchange: format!("{}.messages", settings.prefix),
            settings,
            deliver: OnceLock::new(),
            seen: SeenEnvelopes::new(4096),
            epoch: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new((None, HashMap::new())),
            connected: AtomicBool::new(false),
        });
        let connection = shared.connect().await?;
        tokio::spawn(Shared::supervise(shared.clone(), connection));
        Ok(Self { shared })
    }

    /// The fan-out exchange every committed message goes to, for downstream consumers.
    pub fn messages_exchange(&self) -> &str {
        &self.shared.messages_exchange
    }
}

#[async_trait]
impl Bus for RabbitBus {
    fn attach(&self, deliver: Deliver) {
        if self.shared.deliver.set(deliver).is_err() {
            tracing::warn!("RabbitBus::attach called twice; keeping the first receiver");
        }
    }

    /// Local recipients get the envelope at once, broker or not; other nodes get it once the
    /// broker confirms. An error means other nodes may miss it (their clients `sync`).
    async fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        let shared = &self.shared;
        shared.deliver_locally(envelope.clone());
        let channel = shared
            .channel()
            .await
            .ok_or_else(|| BusError::Disconnected("RabbitMQ is unreachable".into()))?;
        let payload = serde_json::to_vec(&*envelope)?;
        let properties = BasicProperties::default().with_content_type("application/json".into());
        let mut keys: Vec<String> = Vec::new();
        for key in routing_keys(&envelope.route) {
            let key = broker_key(&key);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for key in keys {
            shared
                .publish_confirmed(
                    &channel,
                    &shared.events_exchange,
                    &key,
                    &payload,
                    properties.clone(),
                )
                .await?;
        }
        if is_committed_message(&envelope) {
            // Persistent, for consumers whose durable queues outlive a broker restart.
            shared
                .publish_confirmed(
                    &channel,
                    &shared.messages_exchange,
                    "",
                    &payload,
                    properties.with_delivery_mode(2),
                )
                .await?;
        }
        Ok(())
    }

    async fn subscribe(&self, topic: Topic) -> Result<(), BusError> {
        let key = broker_key(&topic.key());
        let mut state = self.shared.state.lock().await;
        let holders = state.1.entry(key.clone()).or_insert(0);
        *holders += 1;
        if *holders > 1 {
            return Ok(()); // bound already, for another topic sharing the key
        }
        // While disconnected the key is only remembered: the reconnect binds it.
        if let Some(live) = &state.0 {
            live.channel
                .queue_bind(
                    live.queue.as_str().into(),
                    self.shared.events_exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    async fn unsubscribe(&self, topic: Topic) -> Result<(), BusError> {
        let key = broker_key(&topic.key());
        let mut state = self.shared.state.lock().await;
        match state.1.get_mut(&key) {
            Some(holders) if *holders > 1 => {
                *holders -= 1;
                return Ok(()); // another topic still needs the key
            }
            Some(_) => {
                state.1.remove(&key);
            }
            None => return Ok(()),
        }
        if let Some(live) = &state.0 {
            live.channel
                .queue_unbind(
                    live.queue.as_str().into(),
                    self.shared.events_exchange.as_str().into(),
                    key.as_str().into(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    async fn ready(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire) && self.shared.deliver.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn amqp_url() -> String {
        std::env::var("CONFAB_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    async fn node(prefix: &str, name: &str) -> RabbitBus {
        RabbitBus::connect(RabbitSettings {
            url: amqp_url(),
            prefix: prefix.to_owned(),
            node_id: format!("{name}-{}", uuid::Uuid::now_v7().simple()),
        })
        .await
        .expect("the local RabbitMQ answers (scripts/services.sh starts it)")
    }

    fn prefix() -> String {
        format!("confab-test-{}", uuid::Uuid::now_v7().simple())
    }

    #[test]
    fn users_share_a_few_routing_keys_and_other_topics_keep_theirs() {
        assert_eq!(broker_key("conv.abc"), "conv.abc");
        assert_eq!(broker_key("dept.billing"), "dept.billing");
        // Fixed across nodes and versions: FNV-1a of the id.
        assert_eq!(broker_key("user.alice"), broker_key("user.alice"));
        let buckets: std::collections::HashSet<String> = (0..2000)
            .map(|i| broker_key(&format!("user.u{i}")))
            .collect();
        assert_eq!(buckets.len(), USER_KEY_BUCKETS as usize, "{buckets:?}");
        assert!(buckets.iter().all(|k| k.starts_with("users.")));
    }

    #[tokio::test]
    async fn a_shared_user_key_stays_bound_until_its_last_user_leaves() {
        let p = prefix();
        let a = node(&p, "a").await;
        let b = node(&p, "b").await;
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = got.clone();
        b.attach(Arc::new(move |e: Arc<Envelope>| {
            sink.lock().expect("lock").push(e.id);
        }));
        a.attach(Arc::new(|_| {}));
        // Two users of one bucket on b.
        let first = "u0".to_owned();
        let second = (1..)
            .map(|i| format!("u{i}"))
            .find(|u| broker_key(&format!("user.{u}")) == broker_key("user.u0"))
            .expect("a second user in the bucket");
        b.subscribe(Topic::User(first.clone())).await.expect("sub");
        b.subscribe(Topic::User(second.clone())).await.expect("sub");
        b.unsubscribe(Topic::User(first.clone()))
            .await
            .expect("unsub");
        let envelope = |user: &str| {
            Arc::new(Envelope {
                id: uuid::Uuid::now_v7(),
                origin: "a".into(),
                route: crate::chat::event::Route::Users {
                    ids: vec![user.to_owned()],
                },
                event: crate::chat::event::Event::UserOnline(crate::chat::event::UserRef {
                    user_id: user.to_owned(),
                }),
                committed_at_us: None,
                membership: None,
            })
        };
        let to_second = envelope(&second);
        a.publish(to_second.clone()).await.expect("publish");
        for _ in 0..100 {
            if !got.lock().expect("lock").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *got.lock().expect("lock"),
            vec![to_second.id],
            "still bound for the second user"
        );
        b.unsubscribe(Topic::User(second.clone()))
            .await
            .expect("unsub");
        a.publish(envelope(&second)).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            got.lock().expect("lock").len(),
            1,
            "unbound with its last user"
        );
    }

    #[tokio::test]
    async fn rabbit_bus_meets_the_bus_contract() {
        let p = prefix();
        let bus = node(&p, "a").await;
        crate::bus::contract::run(&bus).await;
    }

    #[tokio::test]
    async fn rabbit_bus_carries_envelopes_between_two_nodes() {
        let p = prefix();
        let a = node(&p, "a").await;
        let b = node(&p, "b").await;
        crate::bus::contract::run_two_nodes(&a, &b).await;
    }

    #[tokio::test]
    async fn committed_messages_reach_the_fanout_exchange() {
        let p = prefix();
        let a = node(&p, "a").await;
        a.attach(Arc::new(|_| {}));
        // A downstream consumer: its own queue bound to the fan-out exchange.
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue");
        ch.queue_bind(
            q.name().clone(),
            a.messages_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "downstream".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let conversation = uuid::Uuid::now_v7();
        let sent = crate::bus::contract::envelope_for(conversation, 7);
        a.publish(Arc::new(sent.clone())).await.expect("publish");
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("in time")
            .expect("some")
            .expect("delivery");
        let got: Envelope = serde_json::from_slice(&delivery.data).expect("json");
        assert_eq!(got, sent);
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    }

    #[tokio::test]
    async fn an_unreachable_broker_fails_connect() {
        let result = RabbitBus::connect(RabbitSettings {
            url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            prefix: prefix(),
            node_id: "x".into(),
        })
        .await;
        assert!(result.is_err());
    }
}
