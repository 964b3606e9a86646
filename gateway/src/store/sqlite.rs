//! `SqliteStore`: the embedded default store, one SQLite file in WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Dispatch;
use tracing::instrument::WithSubscriber;
use uuid::Uuid;

use super::{Inserted, NewConversation, NewMessage, Store, StoreError};
use crate::chat::model::{
    Attachment, Conversation, ConversationId, ConversationKind, ConversationSummary, Member,
    MemberRole, Message, MessageKind, UserId,
};

/// Writes go through a single connection so SQLite never answers `SQLITE_BUSY` between our
/// own writers; reads use a small pool, which WAL lets run beside the writer.
///
/// Messages are written by group commit: sends queue up for one committer task, which writes
/// whatever is waiting (up to [`MAX_BATCH`]) in one transaction and answers each send after the
/// commit. Alone, a send is a batch of one; under load the transaction's begin and commit (and
/// the wait for the one connection) are shared by the batch instead of paid per message.
pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
    inserts: mpsc::Sender<(NewMessage, Reply)>,
    /// Bumped by the committer after each batch: the WAL grew.
    wrote: watch::Sender<()>,
}

/// Where the committer answers one queued send.
type Reply = oneshot::Sender<Result<Inserted, StoreError>>;

/// Most messages in one transaction: enough to share its cost, few enough that a batch's first
/// send does not wait long for its last.
const MAX_BATCH: usize = 128;
/// Sends waiting for the committer; beyond this a send waits to queue (back-pressure).
const QUEUE: usize = 1024;
/// At most one checkpoint in this long (the WAL holds what is written meanwhile).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A checkpoint at least this often, also when only other writes than messages happened.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(5);

fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| corrupt("timestamp", s))
}

fn parse_id(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|_| corrupt("uuid", s))
}

fn conversation_from(row: &SqliteRow) -> Result<Conversation, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Conversation {
        id: parse_id(row.try_get("id")?)?,
        kind: ConversationKind::parse(&kind).ok_or_else(|| corrupt("conversation kind", &kind))?,
        title: row.try_get("title")?,
        department_id: row.try_get("department_id")?,
        last_seq: row.try_get("last_seq")?,
        created_at: parse_time(row.try_get("created_at")?)?,
    })
}

fn member_from(row: &SqliteRow) -> Result<Member, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(Member {
        conversation_id: parse_id(row.try_get("conversation_id")?)?,
        user_id: row.try_get("user_id")?,
        role: MemberRole::parse(&role).ok_or_else(|| corrupt("member role", &role))?,
        last_read_seq: row.try_get("last_read_seq")?,
        joined_at: parse_time(row.try_get("joined_at")?)?,
    })
}

fn message_from(row: &SqliteRow) -> Result<Message, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Message {
        id: parse_id(row.try_get("id")?)?,
        conversation_id: parse_id(row.try_get("conversation_id")?)?,
        seq: row.try_get("seq")?,
        sender_id: row.try_get("sender_id")?,
        sender_name: row.try_get("sender_name")?,
        kind: MessageKind::parse(&kind).ok_or_else(|| corrupt("message kind", &kind))?,
        content: row.try_get("content")?,
        client_msg_id: row.try_get("client_msg_id")?,
        created_at: parse_time(row.try_get("created_at")?)?,
        attachment: super::attachment_from_json(row.try_get("attachment")?)?,
    })
}

fn attachment_from(row: &SqliteRow) -> Result<Attachment, StoreError> {
    let dimension = |column: &str| -> Result<Option<u32>, StoreError> {
        let v: Option<i64> = row.try_get(column)?;
        v.map(|v| u32::try_from(v).map_err(|_| corrupt(column, &v.to_string())))
            .transpose()
    };
    Ok(Attachment {
        id: parse_id(row.try_get("id")?)?,
        conversation_id: parse_id(row.try_get("conversation_id")?)?,
        uploader_id: row.try_get("uploader_id")?,
        name: row.try_get("name")?,
        content_type: row.try_get("content_type")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        width: dimension("width")?,
        height: dimension("height")?,
        created_at: parse_time(row.try_get("created_at")?)?,
    })
}

const ATTACHMENT_COLUMNS: &str =
    "id, conversation_id, uploader_id, name, content_type, size, sha256, width, height, created_at";

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the embedded migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode: a commit survives a crash of the process (kill -9); only a
            // power loss can take the last commits back. Full fsync per message would cap sends.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let store = Self::connect(options).await?;
        store.checkpoint_in_background();
        Ok(store)
    }

    /// The WAL is copied back into the database file by a task of its own, on a reader
    /// connection, rather than by the writer: SQLite's automatic checkpoint runs inside the commit
    /// that crosses 1,000 WAL pages and fsyncs the database file there, so every send queued
    /// behind that commit waited for the disk (the p99 of S2). A PASSIVE checkpoint waits for no
    /// writer, so commits go on beside it.
    fn checkpoint_in_background(&self) {
        let readers = self.readers.clone();
        let mut wrote = self.wrote.subscribe();
        tokio::spawn(
            async move {
                loop {
                    // After writes (at most every CHECKPOINT_EVERY), and now and then anyway.
                    match tokio::time::timeout(CHECKPOINT_IDLE, wrote.changed()).await {
                        Ok(Err(_)) => return, // the store is gone
                        Ok(Ok(())) | Err(_) => {}
                    }
                    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                        .execute(&readers)
                        .await
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; retrying later");
                    }
                    tokio::time::sleep(CHECKPOINT_EVERY).await;
                }
            }
            .with_subscriber(Dispatch::none()),
        );
    }

    /// A private in-memory database, for tests.
    pub async fn in_memory() -> Result<Self, StoreError> {
        let name = format!("file:confab-{}?mode=memory&cache=shared", Uuid::now_v7());
        let options = SqliteConnectOptions::from_str(&name)?
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        Self::connect(options).await
    }

    async fn connect(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // Checkpoints are the background task's (`checkpoint_in_background`), not the
            // committing writer's.
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        let (inserts, queue) = mpsc::channel(QUEUE);
        let (wrote, _) = watch::channel(());
        tokio::spawn(
            commit_batches(writer.clone(), queue, wrote.clone()).with_subscriber(Dispatch::none()),
        );
        Ok(Self {
            writer,
            readers,
            inserts,
            wrote,
        })
    }

    async fn message_by_client_id(
        conn: &mut sqlx::SqliteConnection,
        conversation: ConversationId,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(
            "SELECT id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at, attachment \
             FROM messages WHERE conversation_id = ? AND sender_id = ? AND client_msg_id = ?",
        )
        .bind(conversation.to_string())
        .bind(sender)
        .bind(client_msg_id)
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(message_from).transpose()
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.ping_detached().with_subscriber(Dispatch::none()).await
    }
    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation, StoreError> {
        self.create_conversation_detached(new)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        self.conversation_detached(id)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError> {
        self.conversations_of_detached(user)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<bool, StoreError> {
        self.add_member_detached(conversation, user, role)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, StoreError> {
        self.remove_member_detached(conversation, user)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        self.member_detached(conversation, user)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn members(&self, conversation: ConversationId) -> Result<Vec<Member>, StoreError> {
        self.members_detached(conversation)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Batch("the store's committer has stopped".into());
        self.inserts
            .send((new, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
    async fn messages_before(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.messages_before_detached(conversation, before_seq, limit)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.messages_after_detached(conversation, after_seq, limit)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn messages_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.messages_after_each_detached(cursors, limit)
            .with_subscriber(Dispatch::none())
            .await
    }

    async fn mark_read(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.mark_read_detached(conversation, user, seq)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn co_members(&self, user: &str) -> Result<Vec<UserId>, StoreError> {
        self.co_members_detached(user)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn insert_attachment(&self, new: Attachment) -> Result<Attachment, StoreError> {
        self.insert_attachment_detached(new)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn attachment(&self, id: Uuid) -> Result<Option<Attachment>, StoreError> {
        self.attachment_detached(id)
            .with_subscriber(Dispatch::none())
            .await
    }
}

/// The store's work, run with no subscriber on the calling side. sqlx's SQLite worker thread
/// keeps a handle to the span that was current when a command was sent (`Span::current()`) and
/// can hold it past the reply, which kept a request's spans open: unexported, their durations
/// stretched to the connection's next command. Entering `Span::none()` would not help (it leaves
/// the current span as it is). The cost: sqlx's own events on the calling side (statement logs)
/// are not recorded; the worker thread still logs through the global subscriber.
///
/// The dispatcher is `Dispatch::none()`, a shared static one. A new `NoSubscriber` per call
/// registered a new dispatcher each time, and every registration rebuilds the interest of every
/// callsite in the process: under load that rebuild was most of the gateway's CPU time.
impl SqliteStore {
    async fn ping_detached(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn create_conversation_detached(
        &self,
        new: NewConversation,
    ) -> Result<Conversation, StoreError> {
        let conversation = Conversation {
            id: Uuid::now_v7(),
            kind: new.kind,
            title: new.title,
            department_id: new.department_id,
            last_seq: 0,
            created_at: crate::chat::model::now(),
        };
        let now = timestamp(conversation.created_at);
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO conversations (id, kind, title, department_id, last_seq, created_at) \
             VALUES (?, ?, ?, ?, 0, ?)",
        )
        .bind(conversation.id.to_string())
        .bind(conversation.kind.as_str())
        .bind(&conversation.title)
        .bind(&conversation.department_id)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        for (user, role) in &new.members {
            sqlx::query(
                "INSERT INTO conversation_members (conversation_id, user_id, role, last_read_seq, joined_at) \
                 VALUES (?, ?, ?, 0, ?) ON CONFLICT DO NOTHING",
            )
            .bind(conversation.id.to_string())
            .bind(user)
            .bind(role.as_str())
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(conversation)
    }

    async fn conversation_detached(
        &self,
        id: ConversationId,
    ) -> Result<Option<Conversation>, StoreError> {
        let row = sqlx::query(
            "SELECT id, kind, title, department_id, last_seq, created_at FROM conversations WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(conversation_from).transpose()
    }

    async fn conversations_of_detached(
        &self,
        user: &str,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.title, c.department_id, c.last_seq, c.created_at, m.last_read_seq \
             FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.user_id = ? ORDER BY c.last_seq DESC, c.created_at DESC",
        )
        .bind(user)
        .fetch_all(&self.readers)
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

    async fn add_member_detached(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id, role, last_read_seq, joined_at) \
             SELECT id, ?, ?, 0, ? FROM conversations WHERE id = ? ON CONFLICT DO NOTHING",
        )
        .bind(user)
        .bind(role.as_str())
        .bind(timestamp(crate::chat::model::now()))
        .bind(conversation.to_string())
        .execute(&self.writer)
        .await?;
        if result.rows_affected() == 1 {
            return Ok(true);
        }
        match self.conversation(conversation).await? {
            Some(_) => Ok(false),
            None => Err(StoreError::NoSuchConversation(conversation)),
        }
    }

    async fn remove_member_detached(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "DELETE FROM conversation_members WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(conversation.to_string())
        .bind(user)
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn member_detached(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        let row = sqlx::query(
            "SELECT conversation_id, user_id, role, last_read_seq, joined_at \
             FROM conversation_members WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(conversation.to_string())
        .bind(user)
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(member_from).transpose()
    }

    async fn members_detached(
        &self,
        conversation: ConversationId,
    ) -> Result<Vec<Member>, StoreError> {
        let rows = sqlx::query(
            "SELECT conversation_id, user_id, role, last_read_seq, joined_at \
             FROM conversation_members WHERE conversation_id = ? ORDER BY joined_at, user_id",
        )
        .bind(conversation.to_string())
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(member_from).collect()
    }

    /// One message of a batch, inside the batch's transaction: the stored one when its
    /// `clientMsgId` is known, else the next seq of its conversation.
    async fn insert_one(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        new: NewMessage,
    ) -> Result<Inserted, StoreError> {
        if let Some(existing) =
            Self::message_by_client_id(tx, new.conversation_id, &new.sender_id, &new.client_msg_id)
                .await?
        {
            return Ok(Inserted::Existing(existing));
        }
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
        )
        .bind(new.conversation_id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        let seq = seq.ok_or(StoreError::NoSuchConversation(new.conversation_id))?;
        let message = Message {
            id: Uuid::now_v7(),
            conversation_id: new.conversation_id,
            seq,
            sender_id: new.sender_id,
            sender_name: new.sender_name,
            kind: new.kind,
            content: new.content,
            client_msg_id: new.client_msg_id,
            created_at: crate::chat::model::now(),
            attachment: new.attachment,
        };
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at, attachment) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(message.id.to_string())
        .bind(message.conversation_id.to_string())
        .bind(message.seq)
        .bind(&message.sender_id)
        .bind(&message.sender_name)
        .bind(&message.client_msg_id)
        .bind(message.kind.as_str())
        .bind(&message.content)
        .bind(timestamp(message.created_at))
        .bind(super::attachment_json(message.attachment.as_ref())?)
        .execute(&mut **tx)
        .await?;
        Ok(Inserted::New(message))
    }

    async fn messages_before_detached(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at, attachment \
             FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(conversation.to_string())
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        let mut messages = rows
            .iter()
            .map(message_from)
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn messages_after_detached(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at, attachment \
             FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
        )
        .bind(conversation.to_string())
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(message_from).collect()
    }

    async fn messages_after_each_detached(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        if cursors.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let asked: Vec<(String, i64)> = cursors.iter().map(|(c, a)| (c.to_string(), *a)).collect();
        let asked = serde_json::to_string(&asked)
            .map_err(|e| StoreError::Corrupt(format!("cursors do not encode: {e}")))?;
        // Each cursor's window ends at its `limit`th message (an index seek), so a cursor far
        // behind reads no more than `limit` rows.
        let rows = sqlx::query(
            "WITH k(c, a, o) AS (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), key FROM json_each(?1)) \
             SELECT m.id, m.conversation_id, m.seq, m.sender_id, m.sender_name, m.client_msg_id, m.kind, m.content, m.created_at, m.attachment \
             FROM k JOIN messages m ON m.conversation_id = k.c AND m.seq > k.a \
             AND m.seq <= COALESCE((SELECT seq FROM messages WHERE conversation_id = k.c AND seq > k.a \
             ORDER BY seq LIMIT 1 OFFSET ?2 - 1), 9223372036854775807) \
             ORDER BY k.o, m.seq",
        )
        .bind(asked)
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(message_from).collect()
    }

    async fn mark_read_detached(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let watermark: Option<i64> = sqlx::query_scalar(
            "UPDATE conversation_members SET last_read_seq = MAX(last_read_seq, ?) \
             WHERE conversation_id = ? AND user_id = ? RETURNING last_read_seq",
        )
        .bind(seq)
        .bind(conversation.to_string())
        .bind(user)
        .fetch_optional(&self.writer)
        .await?;
        Ok(watermark)
    }

    async fn co_members_detached(&self, user: &str) -> Result<Vec<UserId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT other.user_id FROM conversation_members mine \
             JOIN conversation_members other ON other.conversation_id = mine.conversation_id \
             WHERE mine.user_id = ? AND other.user_id <> ? ORDER BY other.user_id",
        )
        .bind(user)
        .bind(user)
        .fetch_all(&self.readers)
        .await?;
        Ok(ids)
    }
}

impl SqliteStore {
    async fn insert_attachment_detached(&self, new: Attachment) -> Result<Attachment, StoreError> {
        // On the writer: the insert and the read of a record made before by a retry see one
        // order. A conflict on the retry key inserts nothing and the select finds the first.
        let inserted = sqlx::query(
            "INSERT INTO attachments (id, conversation_id, uploader_id, name, content_type, size, sha256, width, height, created_at) \
             SELECT ?, id, ?, ?, ?, ?, ?, ?, ?, ? FROM conversations WHERE id = ? \
             ON CONFLICT (conversation_id, uploader_id, sha256, name) DO NOTHING",
        )
        .bind(new.id.to_string())
        .bind(&new.uploader_id)
        .bind(&new.name)
        .bind(&new.content_type)
        .bind(new.size)
        .bind(&new.sha256)
        .bind(new.width.map(i64::from))
        .bind(new.height.map(i64::from))
        .bind(timestamp(new.created_at))
        .bind(new.conversation_id.to_string())
        .execute(&self.writer)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(new);
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments \
             WHERE conversation_id = ? AND uploader_id = ? AND sha256 = ? AND name = ?"
        )))
        .bind(new.conversation_id.to_string())
        .bind(&new.uploader_id)
        .bind(&new.sha256)
        .bind(&new.name)
        .fetch_optional(&self.writer)
        .await?;
        match row {
            Some(row) => attachment_from(&row),
            None => Err(StoreError::NoSuchConversation(new.conversation_id)),
        }
    }

    async fn attachment_detached(&self, id: Uuid) -> Result<Option<Attachment>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id = ?"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(attachment_from).transpose()
    }
}

/// The committer: one transaction per batch of queued sends, each answered after the commit.
/// A send whose caller has gone (its request timed out) is not written: it was never acked, and
/// a retry with the same `clientMsgId` writes it then.
async fn commit_batches(
    writer: SqlitePool,
    mut queue: mpsc::Receiver<(NewMessage, Reply)>,
    wrote: watch::Sender<()>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (news, replies): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .filter(|(_, reply): &(NewMessage, Reply)| !reply.is_closed())
            .unzip();
        if news.is_empty() {
            continue;
        }
        match write_batch(&writer, news).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                wrote.send_replace(());
            }
            Err(e) => {
                // Rolled back: nothing of the batch is stored, and every send hears why.
                let why = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Batch(why.clone())));
                }
            }
        }
    }
}

/// Writes a batch in one transaction. A send to a missing conversation fails alone (it wrote
/// nothing); any database error rolls the whole batch back.
async fn write_batch(
    writer: &SqlitePool,
    news: Vec<NewMessage>,
) -> Result<Vec<Result<Inserted, StoreError>>, StoreError> {
    let mut tx = writer.begin().await?;
    let mut results = Vec::with_capacity(news.len());
    for new in news {
        match SqliteStore::insert_one(&mut tx, new).await {
            Err(e @ StoreError::NoSuchConversation(_)) => results.push(Err(e)),
            Err(e) => return Err(e),
            Ok(inserted) => results.push(Ok(inserted)),
        }
    }
    tx.commit().await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_in_memory_store_meets_the_store_contract() {
        let store = SqliteStore::in_memory()
            .await
            .expect("in-memory sqlite opens");
        crate::store::contract::run(&store).await;
    }

    #[tokio::test]
    async fn sqlite_file_store_meets_the_store_contract_and_keeps_data_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("confab.db");
        let store = SqliteStore::open(&path).await.expect("sqlite file opens");
        crate::store::contract::run(&store).await;
        let before = store
            .conversations_of("contract-alice")
            .await
            .expect("list");
        drop(store);
        let reopened = SqliteStore::open(&path).await.expect("sqlite file reopens");
        let after = reopened
            .conversations_of("contract-alice")
            .await
            .expect("list");
        assert_eq!(before, after);
        assert!(!after.is_empty());
    }

    #[tokio::test]
    async fn committed_messages_reach_the_database_file_through_the_background_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db");
        let store = SqliteStore::open(&path).await.expect("opens");
        let room = store
            .create_conversation(NewConversation {
                kind: ConversationKind::Open,
                title: None,
                department_id: None,
                members: vec![("ann".into(), MemberRole::Owner)],
            })
            .await
            .expect("create");
        let size = || std::fs::metadata(&path).expect("db file").len();
        let before = size();
        // Fewer WAL pages than the 1,000 at which SQLite's own checkpoint would run.
        for i in 0..150 {
            let sent = store
                .insert_message(NewMessage {
                    conversation_id: room.id,
                    sender_id: "ann".into(),
                    sender_name: "Ann".into(),
                    client_msg_id: format!("m-{i}"),
                    kind: MessageKind::Text,
                    content: "x".repeat(3_000),
                })
                .await
                .expect("insert");
            assert_eq!(sent.message().seq, i + 1);
        }
        // 450 KB of messages, in the WAL until a checkpoint copies them: the writer runs none,
        // so only the background task can have grown the file.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() < before + 400_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint: the file stayed at {} bytes",
                size()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn sqlite_concurrent_senders_get_distinct_gap_free_seqs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("c.db"))
            .await
            .expect("opens");
        crate::store::contract::run_concurrency(std::sync::Arc::new(store)).await;
    }
}
