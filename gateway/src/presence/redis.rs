//! `RedisPresence`: fleet-wide presence, typing and the node registry in Redis, kept alive by heartbeats.
//!
//! Keys (under a configurable prefix `p`):
//! - `p:presence:conns:<user>` sorted set: connection id → expiry (ms, Redis clock)
//! - `p:presence:users` sorted set: users announced online → latest connection expiry
//! - `p:presence:seen` hash: user → last seen (ms)
//! - `p:typing:<conversation>:<user>` → generation of the running start; `p:typing:gen` counter
//! - `p:nodes` sorted set: node id → heartbeat expiry; `p:node:<id>` hash: address, connections, heartbeat
//!
//! Every node refreshes the expiry of its own connections every third of the TTL and sweeps
//! `p:presence:users` for users whose latest expiry passed. A sweep is one Lua script, so of all
//! the nodes sweeping, exactly one removes a dead node's user and announces them offline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use fred::prelude::{Client, ClientLike, Value};
use fred::types::scripts::Script;

use super::{Maintenance, Presence, PresenceError};
use crate::chat::model::{ConversationId, Status, UserId, UserStatus};

/// Redis's clock, in milliseconds, so nodes with skewed clocks agree on expiry.
const NOW: &str = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS: conns, users. ARGV: conn, ttl_ms, user. Returns 1 when the user is to be announced.
const CONNECT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
local announced = redis.call('ZSCORE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[2], 'GT', expiry, ARGV[3])
if announced then return 0 end
return 1
"#;

/// KEYS: conns, seen. ARGV: conn, user. Returns the connections left.
const DISCONNECT: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('HSET', KEYS[2], ARGV[2], now)
return redis.call('ZCARD', KEYS[1])
"#;

/// KEYS: conns, users. ARGV: user. Returns 1 when the user is to be announced offline.
const SETTLE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"#;

/// KEYS: users, conns of each user. ARGV: ttl_ms, then user, conn per key after the first.
/// Returns users that had been swept although this node still holds them.
const HEARTBEAT: &str = r#"
local ttl = tonumber(ARGV[1])
local expiry = now + ttl
local revived = {}
for i = 2, #KEYS do
  local user = ARGV[2 * i - 2]
  redis.call('ZADD', KEYS[i], expiry, ARGV[2 * i - 1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
  if not redis.call('ZSCORE', KEYS[1], user) then table.insert(revived, user) end
  redis.call('ZADD', KEYS[1], 'GT', expiry, user)
end
return revived
"#;

/// KEYS: users, seen. ARGV: conns key prefix, batch size. Returns users gone offline.
/// (Reads keys it is not given; fine on one Redis, not on Redis Cluster.)
const SWEEP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local gone = {}
for _, user in ipairs(due) do
  local conns = ARGV[1] .. user
  redis.call('ZREMRANGEBYSCORE', conns, '-inf', now)
  local top = redis.call('ZRANGE', conns, -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('ZREM', KEYS[1], user)
    redis.call('HSET', KEYS[2], user, now)
    table.insert(gone, user)
  else
    redis.call('ZADD', KEYS[1], top[2], user)
  end
end
return gone
"#;

/// KEYS: seen, conns of each user. ARGV: users. Returns online (0/1) and last seen per user.
const STATUSES: &str = r#"
local out = {}
for i = 2, #KEYS do
  local online = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
  local seen = redis.call('HGET', KEYS[1], ARGV[i - 1])
  table.insert(out, online > 0 and 1 or 0)
  table.insert(out, seen or '')
end
table.insert(out, now)
return out
"#;

/// KEYS: typing key, generation counter. ARGV: px. Returns {new (0/1), generation}.
const TYPING_START: &str = r#"
local generation = redis.call('INCR', KEYS[2])
local previous = redis.call('SET', KEYS[1], generation, 'PX', tonumber(ARGV[1]), 'GET')
if previous then return {0, generation} end
return {1, generation}
"#;

/// KEYS: typing key. ARGV: generation. Compare-and-delete.
const TYPING_EXPIRE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// KEYS: nodes, node hash. ARGV: node id, ttl_ms, address, connections.
const REGISTER: &str = r#"
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], 'address', ARGV[3], 'connections', ARGV[4], 'heartbeat', now)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"#;

fn script(body: &str) -> Script {
    Script::from_lua(format!("{NOW}{body}"))
}

#[derive(Debug, Clone)]
pub struct RedisPresenceSettings {
    pub url: String,
    /// Key prefix (`confab` in production; tests use a unique one).
    pub prefix: String,
    pub node_id: String,
    /// The address this node serves on, for the node registry.
    pub address: String,
    /// A connection not refreshed within this counts as gone (its node died).
    pub ttl: Duration,
}

/// A live gateway as the node registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub node_id: String,
    pub address: String,
    pub connections: u64,
    pub heartbeat: DateTime<Utc>,
}

struct Scripts {
    connect: Script,
    disconnect: Script,
    settle: Script,
    heartbeat: Script,
    sweep: Script,
    statuses: Script,
    typing_start: Script,
    typing_expire: Script,
    register: Script,
}

pub struct RedisPresence {
    client: Client,
    settings: RedisPresenceSettings,
    scripts: Scripts,
    /// This node's connections (connection id → user): what its heartbeat refreshes.
    local: Mutex<HashMap<String, UserId>>,
    /// Serialises the heartbeat with connect/disconnect, so a heartbeat that read the local
    /// connections just before a disconnect cannot write the closed connection back.
    writes: tokio::sync::Mutex<()>,
}

fn millis(ttl: Duration) -> i64 {
    ttl.as_millis().min(i64::MAX as u128) as i64
}

fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

impl RedisPresence {
    pub async fn connect(settings: RedisPresenceSettings) -> Result<Self, PresenceError> {
        let client = crate::redis::connect(&settings.url).await?;
        Ok(Self {
            client,
            settings,
            scripts: Scripts {
                connect: script(CONNECT),
                disconnect: script(DISCONNECT),
                settle: script(SETTLE),
                heartbeat: script(HEARTBEAT),
                sweep: script(SWEEP),
                statuses: script(STATUSES),
                typing_start: script(TYPING_START),
                typing_expire: script(TYPING_EXPIRE),
                register: script(REGISTER),
            },
            local: Mutex::default(),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.settings.prefix)
    }

    fn conns_key(&self, user: &str) -> String {
        self.key(&format!("presence:conns:{user}"))
    }

    fn typing_key(&self, conversation: ConversationId, user: &str) -> String {
        self.key(&format!("typing:{conversation}:{user}"))
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserId>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run<R: fred::prelude::FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, PresenceError> {
        Ok(script.evalsha_with_reload(&self.client, keys, args).await?)
    }

    /// Every gateway whose heartbeat is current.
    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, PresenceError> {
        use fred::prelude::{HashesInterface, SortedSetsInterface};
        let ids: Vec<String> = self
            .client
            .zrangebyscore(self.key("nodes"), "-inf", "+inf", false, None)
            .await?;
        let mut nodes = Vec::new();
        for id in ids {
            let fields: HashMap<String, String> =
                self.client.hgetall(self.key(&format!("node:{id}"))).await?;
            let (Some(address), Some(connections), Some(heartbeat)) = (
                fields.get("address"),
                fields.get("connections"),
                fields.get("heartbeat"),
            ) else {
                continue;
            };
            nodes.push(NodeEntry {
                node_id: id,
                address: address.clone(),
                connections: connections.parse().unwrap_or_default(),
                heartbeat: heartbeat
                    .parse()
                    .ok()
                    .and_then(from_millis)
                    .unwrap_or_default(),
            });
        }
        Ok(nodes)
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connect(&self, user: &str, conn: &str) -> Result<bool, PresenceError> {
        let _writes = self.writes.lock().await;
        self.local().insert(conn.to_owned(), user.to_owned());
        let announce: i64 = self
            .run(
                &self.scripts.connect,
                vec![self.conns_key(user), self.key("presence:users")],
                vec![
                    conn.to_owned(),
                    millis(self.settings.ttl).to_string(),
                    user.to_owned(),
                ],
            )
            .await?;
        Ok(announce == 1)
    }

    async fn disconnect(&self, user: &str, conn: &str) -> Result<usize, PresenceError> {
        let _writes = self.writes.lock().await;
        self.local().remove(conn);
        let remaining: i64 = self
            .run(
                &self.scripts.disconnect,
                vec![self.conns_key(user), self.key("presence:seen")],
                vec![conn.to_owned(), user.to_owned()],
            )
            .await?;
        Ok(remaining.max(0) as usize)
    }

    async fn settle_offline(&self, user: &str) -> Result<bool, PresenceError> {
        let removed: i64 = self
            .run(
                &self.scripts.settle,
                vec![self.conns_key(user), self.key("presence:users")],
                vec![user.to_owned()],
            )
            .await?;
        Ok(removed == 1)
    }

    async fn is_online(&self, user: &str) -> Result<bool, PresenceError> {
        let statuses = self.statuses(&[user.to_owned()]).await?;
        Ok(statuses
            .get(user)
            .is_some_and(|s| s.status == Status::Online))
    }

    async fn statuses(
        &self,
        users: &[UserId],
    ) -> Result<HashMap<UserId, UserStatus>, PresenceError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let mut keys = vec![self.key("presence:seen")];
        keys.extend(users.iter().map(|u| self.conns_key(u)));
        let values: Vec<Value> = self
            .run(&self.scripts.statuses, keys, users.to_vec())
            .await?;
        let now = values
            .last()
            .and_then(|v| v.as_i64())
            .and_then(from_millis)
            .unwrap_or_else(Utc::now);
        let mut out = HashMap::new();
        for (user, pair) in users.iter().zip(values.chunks(2)) {
            let [online, seen] = pair else { break };
            let online = online.as_i64() == Some(1);
            let seen = seen
                .as_str()
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(from_millis);
            out.insert(
                user.clone(),
                UserStatus {
                    status: if online {
                        Status::Online
                    } else {
                        Status::Offline
                    },
                    last_seen: if online { Some(now) } else { seen },
                },
            );
        }
        Ok(out)
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some(self.settings.ttl / 3)
    }

    async fn maintain(&self) -> Result<Maintenance, PresenceError> {
        let ttl = millis(self.settings.ttl).to_string();
        let mut revived = Vec::new();
        {
            let _writes = self.writes.lock().await;
            let held: Vec<(String, UserId)> = self
                .local()
                .iter()
                .map(|(c, u)| (c.clone(), u.clone()))
                .collect();
            for batch in held.chunks(500) {
                let mut keys = vec![self.key("presence:users")];
                let mut args = vec![ttl.clone()];
                for (conn, user) in batch {
                    keys.push(self.conns_key(user));
                    args.push(user.clone());
                    args.push(conn.clone());
                }
                let back: Vec<String> = self.run(&self.scripts.heartbeat, keys, args).await?;
                revived.extend(back);
            }
        }
        let connections = self.local().len().to_string();
        let _: i64 = self
            .run(
                &self.scripts.register,
                vec![
                    self.key("nodes"),
                    self.key(&format!("node:{}", self.settings.node_id)),
                ],
                vec![
                    self.settings.node_id.clone(),
                    ttl,
                    self.settings.address.clone(),
                    connections,
                ],
            )
            .await?;
        let mut expired = Vec::new();
        loop {
            let gone: Vec<String> = self
                .run(
                    &self.scripts.sweep,
                    vec![self.key("presence:users"), self.key("presence:seen")],
                    vec![self.key("presence:conns:"), "200".into()],
                )
                .await?;
            let more = gone.len() == 200;
            expired.extend(gone);
            if !more {
                break;
            }
        }
        revived.sort();
        revived.dedup();
        Ok(Maintenance { expired, revived })
    }

    async fn ready(&self) -> Result<(), PresenceError> {
        if !self.client.is_connected() {
            return Err(PresenceError::Unavailable("Redis is unreachable".into()));
        }
        let _: String = self.client.ping(None).await?;
        Ok(())
    }

    async fn typing_start(
        &self,
        conversation: ConversationId,
        user: &str,
        ttl: Duration,
    ) -> Result<(bool, u64), PresenceError> {
        // The key outlives the expiry timer (twice the TTL), so the timer's compare-and-delete
        // finds it; if this node dies, Redis forgets the typing by itself.
        let (new, generation): (i64, i64) = self
            .run(
                &self.scripts.typing_start,
                vec![self.typing_key(conversation, user), self.key("typing:gen")],
                vec![(millis(ttl) * 2).to_string()],
            )
            .await?;
        Ok((new == 1, generation.max(0) as u64))
    }

    async fn typing_stop(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        use fred::prelude::KeysInterface;
        let deleted: i64 = self.client.del(self.typing_key(conversation, user)).await?;
        Ok(deleted == 1)
    }

    async fn typing_expire(
        &self,
        conversation: ConversationId,
        user: &str,
        generation: u64,
    ) -> Result<bool, PresenceError> {
        let deleted: i64 = self
            .run(
                &self.scripts.typing_expire,
                vec![self.typing_key(conversation, user)],
                vec![generation.to_string()],
            )
            .await?;
        Ok(deleted == 1)
    }

    async fn is_typing(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, PresenceError> {
        use fred::prelude::KeysInterface;
        let n: i64 = self
            .client
            .exists(self.typing_key(conversation, user))
            .await?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefix: &str, node: &str, ttl: Duration) -> RedisPresenceSettings {
        RedisPresenceSettings {
            url: std::env::var("CONFAB_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            prefix: prefix.to_owned(),
            node_id: node.to_owned(),
            address: format!("http://{node}.test:8080"),
            ttl,
        }
    }

    fn prefix() -> String {
        format!("confab-test-{}", uuid::Uuid::now_v7().simple())
    }

    #[tokio::test]
    async fn redis_presence_meets_the_presence_contract() {
        let p = RedisPresence::connect(settings(&prefix(), "a", Duration::from_secs(30)))
            .await
            .expect("the local Redis answers");
        crate::presence::contract::run(&p).await;
    }

    #[tokio::test]
    async fn presence_spans_nodes_and_announces_online_once_per_user() {
        let prefix = prefix();
        let ttl = Duration::from_secs(30);
        let a = RedisPresence::connect(settings(&prefix, "a", ttl))
            .await
            .expect("a");
        let b = RedisPresence::connect(settings(&prefix, "b", ttl))
            .await
            .expect("b");
        assert!(a.connect("u", "a:1").await.expect("connect"));
        assert!(
            !b.connect("u", "b:1").await.expect("connect"),
            "second node"
        );
        assert!(b.is_online("u").await.expect("online"));
        assert_eq!(a.disconnect("u", "a:1").await.expect("disconnect"), 1);
        assert!(!a.settle_offline("u").await.expect("settle"));
        assert_eq!(b.disconnect("u", "b:1").await.expect("disconnect"), 0);
        let (x, y) = tokio::join!(a.settle_offline("u"), b.settle_offline("u"));
        assert_eq!(
            [x.expect("a"), y.expect("b")]
                .iter()
                .filter(|v| **v)
                .count(),
            1,
            "exactly one node announces offline"
        );
    }

    #[tokio::test]
    async fn a_dead_nodes_users_expire_and_one_survivor_announces_them() {
        let prefix = prefix();
        let ttl = Duration::from_millis(600);
        let dead = RedisPresence::connect(settings(&prefix, "dead", ttl))
            .await
            .expect("dead");
        let a = RedisPresence::connect(settings(&prefix, "a", ttl))
            .await
            .expect("a");
        let b = RedisPresence::connect(settings(&prefix, "b", ttl))
            .await
            .expect("b");
        assert!(dead.connect("victim", "dead:1").await.expect("connect"));
        assert!(a.connect("survivor", "a:1").await.expect("connect"));
        dead.maintain().await.expect("one heartbeat");
        let nodes = a.nodes().await.expect("nodes");
        let entry = nodes
            .iter()
            .find(|n| n.node_id == "dead")
            .expect("registered");
        assert_eq!(entry.connections, 1);
        assert_eq!(entry.address, "http://dead.test:8080");
        drop(dead); // no more heartbeats: as good as kill -9
        let mut expired = Vec::new();
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (x, y) = tokio::join!(a.maintain(), b.maintain());
            expired.extend(x.expect("a").expired);
            expired.extend(y.expect("b").expired);
        }
        assert_eq!(
            expired,
            vec!["victim".to_owned()],
            "announced once, by one node"
        );
        assert!(!a.is_online("victim").await.expect("online"));
        assert!(
            a.is_online("survivor").await.expect("online"),
            "heartbeats keep the living"
        );
        let statuses = b.statuses(&["victim".into()]).await.expect("statuses");
        assert!(statuses["victim"].last_seen.is_some());
        assert!(
            a.nodes()
                .await
                .expect("nodes")
                .iter()
                .all(|n| n.node_id != "dead"),
            "the dead node leaves the registry"
        );
    }
}
