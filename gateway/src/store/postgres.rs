//! `PostgresStore`: the shared store of a gateway fleet, on a sized sqlx connection pool.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use uuid::Uuid;

use super::{Inserted, NewConversation, NewMessage, Store, StoreError};
use crate::chat::model::{
    Conversation, ConversationId, ConversationKind, ConversationSummary, Member, MemberRole,
    Message, MessageKind, UserId,
};

const MESSAGE_COLUMNS: &str =
    "id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at";

pub struct PostgresStore {
    pool: PgPool,
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

fn conversation_from(row: &PgRow) -> Result<Conversation, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Conversation {
        id: row.try_get("id")?,
        kind: ConversationKind::parse(&kind).ok_or_else(|| corrupt("conversation kind", &kind))?,
        title: row.try_get("title")?,
        department_id: row.try_get("department_id")?,
        last_seq: row.try_get("last_seq")?,
        created_at: row.try_get("created_at")?,
    })
}

fn member_from(row: &PgRow) -> Result<Member, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(Member {
        conversation_id: row.try_get("conversation_id")?,
        user_id: row.try_get("user_id")?,
        role: MemberRole::parse(&role).ok_or_else(|| corrupt("member role", &role))?,
        last_read_seq: row.try_get("last_read_seq")?,
        joined_at: row.try_get("joined_at")?,
    })
}

fn message_from(row: &PgRow) -> Result<Message, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Message {
        id: row.try_get("id")?,
        conversation_id: row.try_get("conversation_id")?,
        seq: row.try_get("seq")?,
        sender_id: row.try_get("sender_id")?,
        sender_name: row.try_get("sender_name")?,
        kind: MessageKind::parse(&kind).ok_or_else(|| corrupt("message kind", &kind))?,
        content: row.try_get("content")?,
        client_msg_id: row.try_get("client_msg_id")?,
        created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
    })
}

impl PostgresStore {
    /// Connects a pool of at most `pool_size` connections and runs the embedded migrations
    /// (sqlx takes an advisory lock, so several gateways starting at once migrate once).
    pub async fn connect(
        url: &str,
        pool_size: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .min_connections(1)
            // A short acquire timeout turns a database outage into a quick `unavailable` for
            // the sender (who retries with the same clientMsgId) instead of a hung request.
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }

    async fn message_by_client_id(
        conn: &mut sqlx::PgConnection,
        conversation: ConversationId,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND sender_id = $2 \
             AND client_msg_id = $3"
        )))
        .bind(conversation)
        .bind(sender)
        .bind(client_msg_id)
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(message_from).transpose()
    }

    /// One attempt at an idempotent insert. `None` means a concurrent insert of the same key
    /// won the race and its transaction has not settled in our favour: look again.
    async fn try_insert(&self, new: &NewMessage) -> Result<Option<Inserted>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(existing) = Self::message_by_client_id(
            &mut tx,
            new.conversation_id,
            &new.sender_id,
            &new.client_msg_id,
        )
        .await?
        {
            return Ok(Some(Inserted::Existing(existing)));
        }
        // The UPDATE row-locks the conversation until commit: senders to one conversation
        // take seqs one after another, and a rollback below hands the seq back (gap-free).
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
        )
        .bind(new.conversation_id)
        .fetch_optional(&mut *tx)
        .await?;
        let seq = seq.ok_or(StoreError::NoSuchConversation(new.conversation_id))?;
        let message = Message {
            id: Uuid::now_v7(),
            conversation_id: new.conversation_id,
            seq,
            sender_id: new.sender_id.clone(),
            sender_name: new.sender_name.clone(),
            kind: new.kind,
            content: new.content.clone(),
            client_msg_id: new.client_msg_id.clone(),
            created_at: crate::chat::model::now(),
        };
        // A concurrent retry of the same key that committed after our first look makes this
        // insert a no-op (ON CONFLICT waits for an in-flight one to settle, never errors).
        let inserted = sqlx::query(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (conversation_id, sender_id, client_msg_id) DO NOTHING",
        )
        .bind(message.id)
        .bind(message.conversation_id)
        .bind(message.seq)
        .bind(&message.sender_id)
        .bind(&message.sender_name)
        .bind(&message.client_msg_id)
        .bind(message.kind.as_str())
        .bind(&message.content)
        .bind(message.created_at)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // Give the seq back: the other insert is the message.
            tx.rollback().await?;
            let mut conn = self.pool.acquire().await?;
            return Ok(Self::message_by_client_id(
                &mut conn,
                new.conversation_id,
                &new.sender_id,
                &new.client_msg_id,
            )
            .await?
            .map(Inserted::Existing));
        }
        tx.commit().await?;
        Ok(Some(Inserted::New(message)))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation, StoreError> {
        let conversation = Conversation {
            id: Uuid::now_v7(),
            kind: new.kind,
            title: new.title,
            department_id: new.department_id,
            last_seq: 0,
            created_at: crate::chat::model::now(),
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO conversations (id, kind, title, department_id, last_seq, created_at) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(conversation.id)
        .bind(conversation.kind.as_str())
        .bind(&conversation.title)
        .bind(&conversation.department_id)
        .bind(conversation.created_at)
        .execute(&mut *tx)
        .await?;
        for (user, role) in &new.members {
            sqlx::query(
                "INSERT INTO conversation_members (conversation_id, user_id, role, last_read_seq, joined_at) \
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT DO NOTHING",
            )
            .bind(conversation.id)
            .bind(user)
            .bind(role.as_str())
            .bind(conversation.created_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(conversation)
    }

    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        let row = sqlx::query(
            "SELECT id, kind, title, department_id, last_seq, created_at FROM conversations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(conversation_from).transpose()
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.title, c.department_id, c.last_seq, c.created_at, m.last_read_seq \
             FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.user_id = $1 ORDER BY c.last_seq DESC, c.created_at DESC",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let conversation = conversation_from(row)?;
                let last_read_seq: i64 = row.try_get("last_read_seq")?;
                Ok(ConversationSummary {
                    unread: (conversation.last_seq - last_read_seq).max(0),
                    last_read_seq,
                    conversation,
                })
            })
            .collect()
    }

    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id, role, last_read_seq, joined_at) \
             SELECT id, $1, $2, 0, $3 FROM conversations WHERE id = $4 ON CONFLICT DO NOTHING",
        )
        .bind(user)
        .bind(role.as_str())
        .bind(crate::chat::model::now())
        .bind(conversation)
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 1 {
            return Ok(true);
        }
        match self.conversation(conversation).await? {
            Some(_) => Ok(false),
            None => Err(StoreError::NoSuchConversation(conversation)),
        }
    }

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation)
        .bind(user)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        let row = sqlx::query(
            "SELECT conversation_id, user_id, role, last_read_seq, joined_at \
             FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(member_from).transpose()
    }

    async fn members(&self, conversation: ConversationId) -> Result<Vec<Member>, StoreError> {
        let rows = sqlx::query(
            "SELECT conversation_id, user_id, role, last_read_seq, joined_at \
             FROM conversation_members WHERE conversation_id = $1 ORDER BY joined_at, user_id",
        )
        .bind(conversation)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(member_from).collect()
    }

    async fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        // A handful of rounds covers any interleaving of concurrent retries of one key: each
        // round either commits, finds the committed message, or saw the other side roll back.
        for _ in 0..5 {
            if let Some(inserted) = self.try_insert(&new).await? {
                return Ok(inserted);
            }
        }
        Err(StoreError::Corrupt(format!(
            "message {:?} of {:?} neither inserts nor reads back",
            new.client_msg_id, new.sender_id
        )))
    }

    async fn messages_before(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT $3"
        )))
        .bind(conversation)
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut messages = rows
            .iter()
            .map(message_from)
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $2 \
             ORDER BY seq ASC LIMIT $3"
        )))
        .bind(conversation)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_from).collect()
    }

    async fn mark_read(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let watermark: Option<i64> = sqlx::query_scalar(
            "UPDATE conversation_members SET last_read_seq = GREATEST(last_read_seq, $1) \
             WHERE conversation_id = $2 AND user_id = $3 RETURNING last_read_seq",
        )
        .bind(seq)
        .bind(conversation)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        Ok(watermark)
    }

    async fn co_members(&self, user: &str) -> Result<Vec<UserId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT other.user_id FROM conversation_members mine \
             JOIN conversation_members other ON other.conversation_id = mine.conversation_id \
             WHERE mine.user_id = $1 AND other.user_id <> $1 ORDER BY other.user_id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }
}

/// A private database per test run on the local Postgres, dropped afterwards.
#[cfg(test)]
pub(crate) mod testdb {
    use sqlx::Connection;

    /// The server tests create their databases on (trust auth on this machine).
    pub fn admin_url() -> String {
        std::env::var("CONFAB_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    pub struct TestDb {
        pub name: String,
        pub url: String,
    }

    impl TestDb {
        pub async fn create() -> Self {
            let name = format!("confab_test_{}", uuid::Uuid::now_v7().simple());
            let admin = admin_url();
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .expect("the local Postgres answers (scripts/services.sh starts it)");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .expect("create test database");
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            Self {
                url: format!("{base}/{name}"),
                name,
            }
        }

        pub async fn drop_now(self) {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                )))
                .execute(&mut conn)
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::testdb::TestDb;
    use super::*;
    use crate::store::contract;

    #[tokio::test]
    async fn postgres_store_meets_the_store_contract_and_round_trips_times() {
        let db = TestDb::create().await;
        let store = PostgresStore::connect(&db.url, 4, Duration::from_secs(5))
            .await
            .expect("connects and migrates");
        contract::run(&store).await;
        // Microsecond stamps come back equal, not truncated or shifted.
        let c = store
            .create_conversation(NewConversation {
                kind: ConversationKind::Open,
                title: None,
                department_id: None,
                members: vec![("t-alice".into(), MemberRole::Owner)],
            })
            .await
            .expect("create");
        let loaded = store.conversation(c.id).await.expect("load").expect("some");
        assert_eq!(loaded, c);
        let sent = store
            .insert_message(NewMessage {
                conversation_id: c.id,
                sender_id: "t-alice".into(),
                sender_name: "Alice".into(),
                client_msg_id: "t-1".into(),
                kind: MessageKind::Text,
                content: "time".into(),
            })
            .await
            .expect("insert");
        let read = store.messages_after(c.id, 0, 10).await.expect("read");
        assert_eq!(read, vec![sent.message().clone()]);
        drop(store);
        db.drop_now().await;
    }

    #[tokio::test]
    async fn postgres_concurrent_senders_get_distinct_gap_free_seqs() {
        let db = TestDb::create().await;
        let store = PostgresStore::connect(&db.url, 8, Duration::from_secs(5))
            .await
            .expect("connects");
        contract::run_concurrency(Arc::new(store)).await;
        db.drop_now().await;
    }

    #[tokio::test]
    async fn concurrent_retries_of_one_key_return_one_message_and_burn_no_seq() {
        let db = TestDb::create().await;
        let store = Arc::new(
            PostgresStore::connect(&db.url, 8, Duration::from_secs(5))
                .await
                .expect("connects"),
        );
        let c = store
            .create_conversation(NewConversation {
                kind: ConversationKind::Open,
                title: None,
                department_id: None,
                members: vec![],
            })
            .await
            .expect("create");
        for round in 0..10 {
            let tasks: Vec<_> = (0..6)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .insert_message(NewMessage {
                                conversation_id: c.id,
                                sender_id: "racer".into(),
                                sender_name: "Racer".into(),
                                client_msg_id: format!("same-{round}"),
                                kind: MessageKind::Text,
                                content: format!("round {round}"),
                            })
                            .await
                            .expect("insert")
                    })
                })
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.expect("task"));
            }
            let fresh = results
                .iter()
                .filter(|r| matches!(r, Inserted::New(_)))
                .count();
            assert_eq!(fresh, 1, "exactly one insert wins round {round}");
            let ids: std::collections::HashSet<_> =
                results.iter().map(|r| r.message().id).collect();
            assert_eq!(ids.len(), 1, "every retry sees the same message");
            assert_eq!(results[0].message().seq, round + 1);
        }
        let c = store.conversation(c.id).await.expect("load").expect("some");
        assert_eq!(c.last_seq, 10, "no seq burned by a losing retry");
        db.drop_now().await;
    }
}
