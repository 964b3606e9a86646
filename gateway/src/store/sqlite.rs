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

use super::{
    Changed, Inserted, NewConversation, NewDeletion, NewEdit, NewMessage, NewReaction, Refusal,
    Store, StoreError, mentions_from, mentions_to, reply_from,
};
use crate::chat::model::{
    Attachment, Change, Conversation, ConversationId, ConversationKind, ConversationSummary,
    Deletion, Edit, Member, MemberRole, Message, MessageKind, Reaction, ReactionCount, UserId,
};

/// A message's columns, the table aliased `m`.
const MESSAGE_COLUMNS: &str = "m.id, m.conversation_id, m.seq, m.sender_id, m.sender_name, \
     m.client_msg_id, m.kind, m.content, m.created_at, m.edited_at, m.version, m.deleted_at, \
     m.reply_to_seq, m.reply_sender_id, m.reply_sender_name, m.reply_quote, m.mentions, \
     m.attachment";

/// A change entry's columns.
const CHANGE_COLUMNS: &str = "x.conversation_id, x.seq, x.kind, x.target, x.actor_id, \
     x.content, x.version, x.emoji, x.reaction_on, x.reaction_count, x.created_at";

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

/// Cursors as the JSON array `after_each_sql` reads: `[["<conversation>", afterSeq], …]`.
/// User ids as the JSON array `json_each(?)` reads.
fn users_json(users: &[UserId]) -> Result<String, StoreError> {
    serde_json::to_string(users)
        .map_err(|e| StoreError::Corrupt(format!("user ids do not encode: {e}")))
}

fn cursors_json(cursors: &[(ConversationId, i64)]) -> Result<String, StoreError> {
    let asked: Vec<(String, i64)> = cursors.iter().map(|(c, a)| (c.to_string(), *a)).collect();
    serde_json::to_string(&asked)
        .map_err(|e| StoreError::Corrupt(format!("cursors do not encode: {e}")))
}

fn summary_from(row: &SqliteRow) -> Result<ConversationSummary, StoreError> {
    Ok(ConversationSummary {
        unread: row.try_get("unread")?,
        mentions: row.try_get("mentions")?,
        last_read_seq: row.try_get("last_read_seq")?,
        conversation: conversation_from(row)?,
    })
}

/// The entries of log `table` (aliased `alias`, selecting `columns`) after each cursor of
/// `?1` ([`cursors_json`]), at most `?2` per cursor, in cursor then seq order. Each cursor's
/// window ends at its `?2`th entry (an index seek), so a cursor far behind reads no more rows.
fn after_each_sql(table: &str, alias: &str, columns: &str) -> String {
    format!(
        "WITH k(c, a, o) AS (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), key FROM json_each(?1)) \
         SELECT {columns} \
         FROM k JOIN {table} {alias} ON {alias}.conversation_id = k.c AND {alias}.seq > k.a \
         AND {alias}.seq <= COALESCE((SELECT seq FROM {table} WHERE conversation_id = k.c AND seq > k.a \
         ORDER BY seq LIMIT 1 OFFSET ?2 - 1), 9223372036854775807) \
         ORDER BY k.o, {alias}.seq"
    )
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
        members_version: row.try_get("members_version")?,
    })
}

fn member_from(row: &SqliteRow) -> Result<Member, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(Member {
        conversation_id: parse_id(row.try_get("conversation_id")?)?,
        user_id: row.try_get("user_id")?,
        role: MemberRole::parse(&role).ok_or_else(|| corrupt("member role", &role))?,
        last_read_seq: row.try_get("last_read_seq")?,
        last_received_seq: row.try_get("last_received_seq")?,
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
        edited_at: row
            .try_get::<Option<&str>, _>("edited_at")?
            .map(parse_time)
            .transpose()?,
        version: row.try_get("version")?,
        deleted: row.try_get::<Option<&str>, _>("deleted_at")?.is_some(),
        reply_to: reply_from(
            row.try_get("reply_to_seq")?,
            row.try_get("reply_sender_id")?,
            row.try_get("reply_sender_name")?,
            row.try_get("reply_quote")?,
        )
        .map(Box::new),
        mentions: mentions_from(row.try_get("mentions")?)?,
        reactions: Vec::new(),
    })
}

fn change_from(row: &SqliteRow) -> Result<Change, StoreError> {
    let kind: String = row.try_get("kind")?;
    let conversation_id = parse_id(row.try_get("conversation_id")?)?;
    let seq: i64 = row.try_get("seq")?;
    let target: i64 = row.try_get("target")?;
    let user_id: String = row.try_get("actor_id")?;
    let at = parse_time(row.try_get("created_at")?)?;
    Ok(match kind.as_str() {
        "edit" => Change::MessageUpdated(Edit {
            conversation_id,
            seq,
            target,
            user_id,
            content: row.try_get("content")?,
            edited_at: at,
            version: row.try_get::<Option<i64>, _>("version")?.unwrap_or(0),
        }),
        "delete" => Change::MessageDeleted(Deletion {
            conversation_id,
            seq,
            target,
            user_id,
            deleted_at: at,
        }),
        "reaction" => Change::ReactionUpdated(Reaction {
            conversation_id,
            seq,
            target,
            emoji: row
                .try_get::<Option<String>, _>("emoji")?
                .unwrap_or_default(),
            user_id,
            on: row
                .try_get::<Option<bool>, _>("reaction_on")?
                .unwrap_or(false),
            count: row
                .try_get::<Option<i64>, _>("reaction_count")?
                .unwrap_or(0),
            reacted_at: at,
        }),
        other => return Err(corrupt("change kind", other)),
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
                    if let Ok(Err(_)) = tokio::time::timeout(CHECKPOINT_IDLE, wrote.changed()).await
                    {
                        return; // the store is gone
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
        // A deleted message's body must not stay in the file's free space: SQLite zeroes what
        // it frees (a per-connection setting, so on every connection of both pools).
        let options = options.pragma("secure_delete", "ON");
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m \
             WHERE m.conversation_id = ? AND m.sender_id = ? AND m.client_msg_id = ?"
        )))
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
    async fn conversations_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationSummary)>, StoreError> {
        self.conversations_of_each_detached(users)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<Option<i64>, StoreError> {
        self.add_member_detached(conversation, user, role)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<i64>, StoreError> {
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
    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError> {
        self.conversation_ids_of_detached(user)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn conversation_ids_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationId)>, StoreError> {
        self.conversation_ids_of_each_detached(users)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn message_at(
        &self,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<Message>, StoreError> {
        self.message_at_detached(conversation, seq)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn edit_message(&self, edit: NewEdit) -> Result<Changed, StoreError> {
        self.edit_message_detached(edit)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn delete_message(&self, deletion: NewDeletion) -> Result<Changed, StoreError> {
        self.delete_message_detached(deletion)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn react(&self, reaction: NewReaction) -> Result<Changed, StoreError> {
        self.react_detached(reaction)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn changes_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        self.changes_after_each_detached(cursors, limit)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn reactions_of(
        &self,
        conversation: ConversationId,
        seqs: &[i64],
        viewer: &str,
    ) -> Result<Vec<(i64, ReactionCount)>, StoreError> {
        self.reactions_of_detached(conversation, seqs, viewer)
            .with_subscriber(Dispatch::none())
            .await
    }
    async fn mark_received(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<Vec<(UserId, i64)>>, StoreError> {
        self.mark_received_detached(conversation, user, seq)
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
            members_version: 0,
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
            "SELECT id, kind, title, department_id, last_seq, created_at, members_version FROM conversations WHERE id = ?",
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(super::summaries_sql("m.user_id = ?")))
            .bind(user)
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(summary_from).collect()
    }

    async fn conversations_of_each_detached(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationSummary)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let asked = users_json(users)?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(super::summaries_sql(
            "m.user_id IN (SELECT value FROM json_each(?))",
        )))
        .bind(asked)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("user_id")?, summary_from(row)?)))
            .collect()
    }

    async fn add_member_detached(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let result = sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id, role, last_read_seq, joined_at) \
             SELECT id, ?, ?, 0, ? FROM conversations WHERE id = ? ON CONFLICT DO NOTHING",
        )
        .bind(user)
        .bind(role.as_str())
        .bind(timestamp(crate::chat::model::now()))
        .bind(conversation.to_string())
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 1 {
            let version = Self::next_members_version(&mut tx, conversation).await?;
            tx.commit().await?;
            return Ok(Some(version));
        }
        drop(tx);
        match self.conversation(conversation).await? {
            Some(_) => Ok(None),
            None => Err(StoreError::NoSuchConversation(conversation)),
        }
    }

    async fn remove_member_detached(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let result = sqlx::query(
            "DELETE FROM conversation_members WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(conversation.to_string())
        .bind(user)
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() != 1 {
            return Ok(None);
        }
        let version = Self::next_members_version(&mut tx, conversation).await?;
        tx.commit().await?;
        Ok(Some(version))
    }

    /// Moves the conversation's membership version, inside the change's transaction.
    async fn next_members_version(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        conversation: ConversationId,
    ) -> Result<i64, StoreError> {
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations SET members_version = members_version + 1 WHERE id = ? \
             RETURNING members_version",
        )
        .bind(conversation.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        version.ok_or(StoreError::NoSuchConversation(conversation))
    }

    async fn member_detached(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        let row = sqlx::query(
            "SELECT conversation_id, user_id, role, last_read_seq, last_received_seq, joined_at \
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
            "SELECT conversation_id, user_id, role, last_read_seq, last_received_seq, joined_at \
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
        let next: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? \
             RETURNING last_seq, members_version",
        )
        .bind(new.conversation_id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        let (seq, members_version) =
            next.ok_or(StoreError::NoSuchConversation(new.conversation_id))?;
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
            reply_to: new.reply_to.map(Box::new),
            mentions: new.mentions,
            ..Message::default()
        };
        let reply = message.reply_to.as_ref();
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at, attachment, \
             reply_to_seq, reply_sender_id, reply_sender_name, reply_quote, mentions) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(reply.map(|r| r.seq))
        .bind(reply.map(|r| r.sender_id.as_str()))
        .bind(reply.map(|r| r.sender_name.as_str()))
        .bind(reply.and_then(|r| r.quote.as_deref()))
        .bind(mentions_to(&message.mentions))
        .execute(&mut **tx)
        .await?;
        for user in message.mentions.iter().filter(|u| **u != message.sender_id) {
            sqlx::query(
                "INSERT INTO message_mentions (conversation_id, user_id, seq) VALUES (?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(message.conversation_id.to_string())
            .bind(user)
            .bind(message.seq)
            .execute(&mut **tx)
            .await?;
        }
        Ok(Inserted::New(message, members_version))
    }

    async fn messages_before_detached(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m \
             WHERE m.conversation_id = ? AND m.seq < ? ORDER BY m.seq DESC LIMIT ?"
        )))
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m \
             WHERE m.conversation_id = ? AND m.seq > ? ORDER BY m.seq ASC LIMIT ?"
        )))
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(after_each_sql(
            "messages",
            "m",
            MESSAGE_COLUMNS,
        )))
        .bind(cursors_json(cursors)?)
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

/// The message lifecycle: each change takes the conversation's next seq in the transaction that
/// makes it, on the one writer connection (so it is serialised with the batch committer).
impl SqliteStore {
    async fn conversation_ids_of_detached(
        &self,
        user: &str,
    ) -> Result<Vec<ConversationId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT conversation_id FROM conversation_members WHERE user_id = ?",
        )
        .bind(user)
        .fetch_all(&self.readers)
        .await?;
        ids.iter().map(|id| parse_id(id)).collect()
    }

    async fn conversation_ids_of_each_detached(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationId)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let asked = users_json(users)?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT user_id, conversation_id FROM conversation_members \
             WHERE user_id IN (SELECT value FROM json_each(?))",
        )
        .bind(asked)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter()
            .map(|(user, id)| Ok((user, parse_id(&id)?)))
            .collect()
    }

    async fn message_at_detached(
        &self,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = ? AND m.seq = ?"
        )))
        .bind(conversation.to_string())
        .bind(seq)
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(message_from).transpose()
    }

    async fn change_by_key(
        conn: &mut sqlx::SqliteConnection,
        conversation: &str,
        actor: &str,
        client_msg_id: &str,
    ) -> Result<Option<Change>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS} FROM message_changes x \
             WHERE x.conversation_id = ? AND x.actor_id = ? AND x.client_msg_id = ?"
        )))
        .bind(conversation)
        .bind(actor)
        .bind(client_msg_id)
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(change_from).transpose()
    }

    /// The target's sender and whether it is deleted; `None` when the seq is no message's.
    async fn target_of(
        conn: &mut sqlx::SqliteConnection,
        conversation: &str,
        seq: i64,
    ) -> Result<Option<(String, bool)>, StoreError> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT sender_id, deleted_at FROM messages WHERE conversation_id = ? AND seq = ?",
        )
        .bind(conversation)
        .bind(seq)
        .fetch_optional(conn)
        .await?;
        Ok(row.map(|(sender, deleted)| (sender, deleted.is_some())))
    }

    async fn next_seq(
        conn: &mut sqlx::SqliteConnection,
        conversation: ConversationId,
    ) -> Result<(i64, i64), StoreError> {
        let next: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? \
             RETURNING last_seq, members_version",
        )
        .bind(conversation.to_string())
        .fetch_optional(conn)
        .await?;
        next.ok_or(StoreError::NoSuchConversation(conversation))
    }

    async fn edit_message_detached(&self, edit: NewEdit) -> Result<Changed, StoreError> {
        let conversation = edit.conversation_id.to_string();
        let mut tx = self.writer.begin().await?;
        if let Some(existing) =
            Self::change_by_key(&mut tx, &conversation, &edit.actor_id, &edit.client_msg_id).await?
        {
            return Ok(match existing {
                Change::MessageUpdated(e) if e.target == edit.target => {
                    Changed::Existing(Change::MessageUpdated(e))
                }
                _ => Changed::Refused(Refusal::KeyReused),
            });
        }
        match Self::target_of(&mut tx, &conversation, edit.target).await? {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some((_, true)) => return Ok(Changed::Refused(Refusal::Deleted)),
            Some((sender, false)) if sender != edit.actor_id => {
                return Ok(Changed::Refused(Refusal::NotSender));
            }
            Some(_) => {}
        }
        let at = crate::chat::model::now();
        let version: i64 = sqlx::query_scalar(
            "UPDATE messages SET content = ?, edited_at = ?, version = version + 1 \
             WHERE conversation_id = ? AND seq = ? RETURNING version",
        )
        .bind(&edit.content)
        .bind(timestamp(at))
        .bind(&conversation)
        .bind(edit.target)
        .fetch_one(&mut *tx)
        .await?;
        let (seq, members_version) = Self::next_seq(&mut tx, edit.conversation_id).await?;
        sqlx::query(
            "INSERT INTO message_changes (conversation_id, seq, kind, target, actor_id, client_msg_id, content, version, created_at) \
             VALUES (?, ?, 'edit', ?, ?, ?, ?, ?, ?)",
        )
        .bind(&conversation)
        .bind(seq)
        .bind(edit.target)
        .bind(&edit.actor_id)
        .bind(&edit.client_msg_id)
        .bind(&edit.content)
        .bind(version)
        .bind(timestamp(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Changed::New(
            Change::MessageUpdated(Edit {
                conversation_id: edit.conversation_id,
                seq,
                target: edit.target,
                user_id: edit.actor_id,
                content: Some(edit.content),
                edited_at: at,
                version,
            }),
            members_version,
        ))
    }

    async fn delete_message_detached(&self, deletion: NewDeletion) -> Result<Changed, StoreError> {
        let conversation = deletion.conversation_id.to_string();
        let mut tx = self.writer.begin().await?;
        match Self::target_of(&mut tx, &conversation, deletion.target).await? {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some((_, true)) => {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CHANGE_COLUMNS} FROM message_changes x \
                     WHERE x.conversation_id = ? AND x.target = ? AND x.kind = 'delete'"
                )))
                .bind(&conversation)
                .bind(deletion.target)
                .fetch_one(&mut *tx)
                .await?;
                return Ok(Changed::Existing(change_from(&row)?));
            }
            Some(_) => {}
        }
        let at = crate::chat::model::now();
        // The body, the bodies of its earlier edits and the quotes of it in replies: erased in
        // the transaction that deletes it.
        sqlx::query(
            "UPDATE messages SET content = '', deleted_at = ?, mentions = NULL, reply_quote = NULL \
             WHERE conversation_id = ? AND seq = ?",
        )
        .bind(timestamp(at))
        .bind(&conversation)
        .bind(deletion.target)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE message_changes SET content = NULL WHERE conversation_id = ? AND target = ? AND kind = 'edit'",
        )
        .bind(&conversation)
        .bind(deletion.target)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE messages SET reply_quote = NULL WHERE conversation_id = ? AND reply_to_seq = ?",
        )
        .bind(&conversation)
        .bind(deletion.target)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM message_mentions WHERE conversation_id = ? AND seq = ?")
            .bind(&conversation)
            .bind(deletion.target)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM message_reactions WHERE conversation_id = ? AND target = ?")
            .bind(&conversation)
            .bind(deletion.target)
            .execute(&mut *tx)
            .await?;
        let (seq, members_version) = Self::next_seq(&mut tx, deletion.conversation_id).await?;
        sqlx::query(
            "INSERT INTO message_changes (conversation_id, seq, kind, target, actor_id, created_at) \
             VALUES (?, ?, 'delete', ?, ?, ?)",
        )
        .bind(&conversation)
        .bind(seq)
        .bind(deletion.target)
        .bind(&deletion.actor_id)
        .bind(timestamp(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.erase_wal().await;
        Ok(Changed::New(
            Change::MessageDeleted(Deletion {
                conversation_id: deletion.conversation_id,
                seq,
                target: deletion.target,
                user_id: deletion.actor_id,
                deleted_at: at,
            }),
            members_version,
        ))
    }

    /// The WAL keeps the frames of earlier commits (the message as it was inserted) until it
    /// is overwritten: a truncating checkpoint moves what is committed into the database file,
    /// where secure_delete has zeroed the old body, and empties the WAL. It cannot finish while
    /// a reader holds an older snapshot, so it is retried a few times; the bytes then go at
    /// the next truncation (the next deletion).
    async fn erase_wal(&self) {
        for attempt in 0..5u64 {
            let busy: Result<(i64, i64, i64), sqlx::Error> =
                sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                    .fetch_one(&self.writer)
                    .await;
            match busy {
                Ok((0, _, _)) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10 * (attempt + 1))).await,
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint after a deletion failed");
                    return;
                }
            }
        }
        tracing::warn!("WAL checkpoint after a deletion stayed busy; the WAL is emptied later");
    }

    async fn react_detached(&self, reaction: NewReaction) -> Result<Changed, StoreError> {
        let conversation = reaction.conversation_id.to_string();
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &reaction.client_msg_id
            && let Some(existing) =
                Self::change_by_key(&mut tx, &conversation, &reaction.actor_id, key).await?
        {
            return Ok(match existing {
                Change::ReactionUpdated(r)
                    if r.target == reaction.target
                        && r.emoji == reaction.emoji
                        && r.on == reaction.on =>
                {
                    Changed::Existing(Change::ReactionUpdated(r))
                }
                _ => Changed::Refused(Refusal::KeyReused),
            });
        }
        match Self::target_of(&mut tx, &conversation, reaction.target).await? {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some((_, true)) => return Ok(Changed::Refused(Refusal::Deleted)),
            Some(_) => {}
        }
        let (distinct, has_emoji, mine): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(DISTINCT emoji), COALESCE(SUM(emoji = ?), 0), COALESCE(SUM(emoji = ? AND user_id = ?), 0) \
             FROM message_reactions WHERE conversation_id = ? AND target = ?",
        )
        .bind(&reaction.emoji)
        .bind(&reaction.emoji)
        .bind(&reaction.actor_id)
        .bind(&conversation)
        .bind(reaction.target)
        .fetch_one(&mut *tx)
        .await?;
        if (mine > 0) == reaction.on {
            return Ok(Changed::Unchanged);
        }
        if reaction.on && has_emoji == 0 && distinct as usize >= reaction.max_distinct {
            return Ok(Changed::Refused(Refusal::TooManyReactions));
        }
        let at = crate::chat::model::now();
        if reaction.on {
            sqlx::query(
                "INSERT INTO message_reactions (conversation_id, target, emoji, user_id, created_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&conversation)
            .bind(reaction.target)
            .bind(&reaction.emoji)
            .bind(&reaction.actor_id)
            .bind(timestamp(at))
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "DELETE FROM message_reactions WHERE conversation_id = ? AND target = ? AND emoji = ? AND user_id = ?",
            )
            .bind(&conversation)
            .bind(reaction.target)
            .bind(&reaction.emoji)
            .bind(&reaction.actor_id)
            .execute(&mut *tx)
            .await?;
        }
        let count = has_emoji + if reaction.on { 1 } else { -1 };
        let (seq, members_version) = Self::next_seq(&mut tx, reaction.conversation_id).await?;
        sqlx::query(
            "INSERT INTO message_changes (conversation_id, seq, kind, target, actor_id, client_msg_id, emoji, reaction_on, reaction_count, created_at) \
             VALUES (?, ?, 'reaction', ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&conversation)
        .bind(seq)
        .bind(reaction.target)
        .bind(&reaction.actor_id)
        .bind(&reaction.client_msg_id)
        .bind(&reaction.emoji)
        .bind(reaction.on)
        .bind(count)
        .bind(timestamp(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Changed::New(
            Change::ReactionUpdated(Reaction {
                conversation_id: reaction.conversation_id,
                seq,
                target: reaction.target,
                emoji: reaction.emoji,
                user_id: reaction.actor_id,
                on: reaction.on,
                count,
                reacted_at: at,
            }),
            members_version,
        ))
    }

    async fn changes_after_each_detached(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        if cursors.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(after_each_sql(
            "message_changes",
            "x",
            CHANGE_COLUMNS,
        )))
        .bind(cursors_json(cursors)?)
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(change_from).collect()
    }

    async fn reactions_of_detached(
        &self,
        conversation: ConversationId,
        seqs: &[i64],
        viewer: &str,
    ) -> Result<Vec<(i64, ReactionCount)>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let asked = serde_json::to_string(seqs)
            .map_err(|e| StoreError::Corrupt(format!("seqs do not encode: {e}")))?;
        let rows: Vec<(i64, String, i64, bool)> = sqlx::query_as(
            "SELECT target, emoji, COUNT(*), MAX(user_id = ?) FROM message_reactions \
             WHERE conversation_id = ? AND target IN (SELECT value FROM json_each(?)) \
             GROUP BY target, emoji ORDER BY target, MIN(created_at), emoji",
        )
        .bind(viewer)
        .bind(conversation.to_string())
        .bind(asked)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, emoji, count, me)| (seq, ReactionCount { emoji, count, me }))
            .collect())
    }

    async fn mark_received_detached(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<Vec<(UserId, i64)>>, StoreError> {
        let id = conversation.to_string();
        let mut tx = self.writer.begin().await?;
        let old: Option<i64> = sqlx::query_scalar(
            "SELECT last_received_seq FROM conversation_members WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(&id)
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(old) = old else { return Ok(None) };
        if seq <= old {
            return Ok(Some(Vec::new()));
        }
        sqlx::query(
            "UPDATE conversation_members SET last_received_seq = ? WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(seq)
        .bind(&id)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        let senders: Vec<(String, i64)> = sqlx::query_as(
            "SELECT sender_id, MAX(seq) FROM messages WHERE conversation_id = ? AND seq > ? AND seq <= ? \
             AND sender_id <> ? GROUP BY sender_id ORDER BY sender_id",
        )
        .bind(&id)
        .bind(old)
        .bind(seq)
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(senders))
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
                    attachment: None,
                    reply_to: None,
                    mentions: vec![],
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
    async fn a_deleted_body_is_in_no_byte_of_the_database_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("erase.db"))
            .await
            .expect("opens");
        let c = store
            .create_conversation(NewConversation {
                kind: ConversationKind::Group,
                title: None,
                department_id: None,
                members: vec![("eve".into(), MemberRole::Owner)],
            })
            .await
            .expect("create");
        let secret = format!("secret-{}", Uuid::now_v7().simple());
        let edited = format!("edited-{}", Uuid::now_v7().simple());
        let send = |key: &str, content: String| NewMessage {
            conversation_id: c.id,
            sender_id: "eve".into(),
            sender_name: "Eve".into(),
            client_msg_id: key.into(),
            kind: MessageKind::Text,
            content,
            attachment: None,
            reply_to: None,
            mentions: vec![],
        };
        store
            .insert_message(send("m1", format!("body {secret}")))
            .await
            .expect("insert");
        store
            .edit_message(NewEdit {
                conversation_id: c.id,
                target: 1,
                actor_id: "eve".into(),
                client_msg_id: "e1".into(),
                content: format!("edit {edited}"),
            })
            .await
            .expect("edit");
        for i in 0..30 {
            store
                .insert_message(send(&format!("f{i}"), "filler ".repeat(40)))
                .await
                .expect("insert");
        }
        let grep = |needle: &str| {
            std::fs::read_dir(dir.path())
                .expect("list")
                .filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read(e.path())
                        .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
                        .unwrap_or(false)
                })
                .map(|e| e.file_name())
                .collect::<Vec<_>>()
        };
        assert!(
            !grep(&secret).is_empty(),
            "the body is on disk before the deletion"
        );
        store
            .delete_message(NewDeletion {
                conversation_id: c.id,
                target: 1,
                actor_id: "eve".into(),
            })
            .await
            .expect("delete");
        assert_eq!(grep(&secret), Vec::<std::ffi::OsString>::new(), "the body");
        assert_eq!(grep(&edited), Vec::<std::ffi::OsString>::new(), "its edit");
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
