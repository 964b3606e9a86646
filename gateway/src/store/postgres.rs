//! `PostgresStore`: the shared store of a gateway fleet, on a sized sqlx connection pool.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use tokio::sync::{mpsc, oneshot};
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

const MESSAGE_COLUMNS: &str = "id, conversation_id, seq, sender_id, sender_name, client_msg_id, \
     kind, content, created_at, edited_at, version, deleted_at, reply_to_seq, reply_sender_id, \
     reply_sender_name, reply_quote, mentions, attachment";

const ATTACHMENT_COLUMNS: &str =
    "id, conversation_id, uploader_id, name, content_type, size, sha256, width, height, created_at";

const CHANGE_COLUMNS: &str = "conversation_id, seq, kind, target, actor_id, content, version, \
     emoji, reaction_on, reaction_count, created_at";

/// Messages are written by group commit, as in [`super::SqliteStore`]: sends queue up for one
/// committer task, which writes whatever is waiting (up to [`MAX_BATCH`]) in one transaction of
/// a fixed number of statements, whatever the batch's size, and answers each send after the
/// commit. Alone, a send is a batch of one; under load a batch shares its round trips.
///
/// Several gateways commit into one database at once: a batch row-locks its conversations in
/// id order first (so two batches never deadlock), and only then looks for `clientMsgId`s
/// already committed. Every insert into a conversation holds that lock until it commits, so
/// what the look finds is final, and each message gets the next seq of its conversation with
/// no gap.
pub struct PostgresStore {
    pool: PgPool,
    inserts: mpsc::Sender<(NewMessage, Reply)>,
}

/// Where the committer answers one queued send.
type Reply = oneshot::Sender<Result<Inserted, StoreError>>;

/// Most messages in one transaction: enough to share its cost, few enough that a batch's first
/// send does not wait long for its last.
const MAX_BATCH: usize = 256;
/// Sends waiting for the committer; beyond this a send waits to queue (back-pressure).
const QUEUE: usize = 4096;
/// Times a batch is tried when Postgres gives up on it for a reason that a retry clears
/// (deadlock, serialisation failure, or a concurrent insert of one of its keys).
const ATTEMPTS: usize = 3;

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

/// The entries of log `table` (selecting `columns`) after each cursor (`$1` conversations,
/// `$2` seqs), at most `$3` per cursor, in cursor then seq order.
fn after_each_sql(table: &str, columns: &str) -> String {
    format!(
        "SELECT e.* FROM unnest($1::uuid[], $2::bigint[]) WITH ORDINALITY AS k(c, a, o) \
         CROSS JOIN LATERAL (SELECT {columns} FROM {table} \
         WHERE conversation_id = k.c AND seq > k.a ORDER BY seq LIMIT $3) AS e \
         ORDER BY k.o, e.seq"
    )
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
        members_version: row.try_get("members_version")?,
    })
}

fn member_from(row: &PgRow) -> Result<Member, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(Member {
        conversation_id: row.try_get("conversation_id")?,
        user_id: row.try_get("user_id")?,
        role: MemberRole::parse(&role).ok_or_else(|| corrupt("member role", &role))?,
        last_read_seq: row.try_get("last_read_seq")?,
        last_received_seq: row.try_get("last_received_seq")?,
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
        attachment: super::attachment_from_json(row.try_get("attachment")?)?,
        edited_at: row.try_get("edited_at")?,
        version: row.try_get("version")?,
        deleted: row
            .try_get::<Option<DateTime<Utc>>, _>("deleted_at")?
            .is_some(),
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

fn change_from(row: &PgRow) -> Result<Change, StoreError> {
    let kind: String = row.try_get("kind")?;
    let conversation_id: Uuid = row.try_get("conversation_id")?;
    let seq: i64 = row.try_get("seq")?;
    let target: i64 = row.try_get("target")?;
    let user_id: String = row.try_get("actor_id")?;
    let at: DateTime<Utc> = row.try_get("created_at")?;
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

fn attachment_from(row: &PgRow) -> Result<Attachment, StoreError> {
    let dimension = |column: &str| -> Result<Option<u32>, StoreError> {
        let v: Option<i32> = row.try_get(column)?;
        v.map(|v| u32::try_from(v).map_err(|_| corrupt(column, &v.to_string())))
            .transpose()
    };
    Ok(Attachment {
        id: row.try_get("id")?,
        conversation_id: row.try_get("conversation_id")?,
        uploader_id: row.try_get("uploader_id")?,
        name: row.try_get("name")?,
        content_type: row.try_get("content_type")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        width: dimension("width")?,
        height: dimension("height")?,
        created_at: row.try_get("created_at")?,
    })
}

/// A dimension as Postgres keeps it (INTEGER); every accepted image fits.
fn dimension_column(v: Option<u32>) -> Result<Option<i32>, StoreError> {
    v.map(|v| i32::try_from(v).map_err(|_| corrupt("dimension", &v.to_string())))
        .transpose()
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
        let (inserts, queue) = mpsc::channel(QUEUE);
        tokio::spawn(commit_batches(pool.clone(), queue).with_subscriber(Dispatch::none()));
        Ok(Self { pool, inserts })
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
            members_version: 0,
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
            "SELECT id, kind, title, department_id, last_seq, created_at, members_version FROM conversations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(conversation_from).transpose()
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(super::summaries_sql("m.user_id = $1")))
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary_from).collect()
    }

    async fn conversations_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationSummary)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(super::summaries_sql(
            "m.user_id = ANY($1)",
        )))
        .bind(users)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("user_id")?, summary_from(row)?)))
            .collect()
    }

    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id, role, last_read_seq, joined_at) \
             SELECT id, $1, $2, 0, $3 FROM conversations WHERE id = $4 ON CONFLICT DO NOTHING",
        )
        .bind(user)
        .bind(role.as_str())
        .bind(crate::chat::model::now())
        .bind(conversation)
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

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation)
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

    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        let row = sqlx::query(
            "SELECT conversation_id, user_id, role, last_read_seq, last_received_seq, joined_at \
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
            "SELECT conversation_id, user_id, role, last_read_seq, last_received_seq, joined_at \
             FROM conversation_members WHERE conversation_id = $1 ORDER BY joined_at, user_id",
        )
        .bind(conversation)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(member_from).collect()
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

    async fn messages_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        if cursors.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(after_each_sql(
            "messages",
            MESSAGE_COLUMNS,
        )))
        .bind(cursors.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(cursors.iter().map(|c| c.1).collect::<Vec<_>>())
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

    async fn insert_attachment(&self, new: Attachment) -> Result<Attachment, StoreError> {
        // A conflict on the retry key inserts nothing; the select then finds the first record
        // (committed: the conflicting insert waited for it).
        let inserted = sqlx::query(
            "INSERT INTO attachments (id, conversation_id, uploader_id, name, content_type, size, sha256, width, height, created_at) \
             SELECT $1, id, $2, $3, $4, $5, $6, $7, $8, $9 FROM conversations WHERE id = $10 \
             ON CONFLICT ON CONSTRAINT attachments_retry DO NOTHING",
        )
        .bind(new.id)
        .bind(&new.uploader_id)
        .bind(&new.name)
        .bind(&new.content_type)
        .bind(new.size)
        .bind(&new.sha256)
        .bind(dimension_column(new.width)?)
        .bind(dimension_column(new.height)?)
        .bind(new.created_at)
        .bind(new.conversation_id)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(new);
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments \
             WHERE conversation_id = $1 AND uploader_id = $2 AND sha256 = $3 AND name = $4"
        )))
        .bind(new.conversation_id)
        .bind(&new.uploader_id)
        .bind(&new.sha256)
        .bind(&new.name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => attachment_from(&row),
            None => Err(StoreError::NoSuchConversation(new.conversation_id)),
        }
    }

    async fn attachment(&self, id: Uuid) -> Result<Option<Attachment>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(attachment_from).transpose()
    }

    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT conversation_id FROM conversation_members WHERE user_id = $1",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn conversation_ids_of_each(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, ConversationId)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(
            "SELECT user_id, conversation_id FROM conversation_members WHERE user_id = ANY($1)",
        )
        .bind(users)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn message_at(
        &self,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq = $2"
        )))
        .bind(conversation)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(message_from).transpose()
    }

    async fn edit_message(&self, edit: NewEdit) -> Result<Changed, StoreError> {
        retrying(|| self.edit_once(&edit)).await
    }

    async fn delete_message(&self, deletion: NewDeletion) -> Result<Changed, StoreError> {
        retrying(|| self.delete_once(&deletion)).await
    }

    async fn react(&self, reaction: NewReaction) -> Result<Changed, StoreError> {
        retrying(|| self.react_once(&reaction)).await
    }

    async fn changes_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        if cursors.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(after_each_sql(
            "message_changes",
            CHANGE_COLUMNS,
        )))
        .bind(cursors.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(cursors.iter().map(|c| c.1).collect::<Vec<_>>())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from).collect()
    }

    async fn reactions_of(
        &self,
        conversation: ConversationId,
        seqs: &[i64],
        viewer: &str,
    ) -> Result<Vec<(i64, ReactionCount)>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, String, i64, bool)> = sqlx::query_as(
            "SELECT target, emoji, COUNT(*), bool_or(user_id = $1) FROM message_reactions \
             WHERE conversation_id = $2 AND target = ANY($3) \
             GROUP BY target, emoji ORDER BY target, MIN(created_at), emoji",
        )
        .bind(viewer)
        .bind(conversation)
        .bind(seqs)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, emoji, count, me)| (seq, ReactionCount { emoji, count, me }))
            .collect())
    }

    async fn mark_received(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<Vec<(UserId, i64)>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Row-locked: two devices of one user acknowledging at once raise it one after the
        // other, so each range is announced once.
        let old: Option<i64> = sqlx::query_scalar(
            "SELECT last_received_seq FROM conversation_members \
             WHERE conversation_id = $1 AND user_id = $2 FOR UPDATE",
        )
        .bind(conversation)
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(old) = old else { return Ok(None) };
        if seq <= old {
            return Ok(Some(Vec::new()));
        }
        sqlx::query(
            "UPDATE conversation_members SET last_received_seq = $1 WHERE conversation_id = $2 AND user_id = $3",
        )
        .bind(seq)
        .bind(conversation)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        let senders: Vec<(String, i64)> = sqlx::query_as(
            "SELECT sender_id, MAX(seq) FROM messages WHERE conversation_id = $1 AND seq > $2 AND seq <= $3 \
             AND sender_id <> $4 GROUP BY sender_id ORDER BY sender_id",
        )
        .bind(conversation)
        .bind(old)
        .bind(seq)
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(senders))
    }
}

/// Runs a lifecycle transaction again when Postgres gave up on it for a reason a retry clears.
async fn retrying<'a, F, Fut>(mut once: F) -> Result<Changed, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Changed, StoreError>> + 'a,
{
    let mut outcome = once().await;
    for _ in 1..ATTEMPTS {
        match &outcome {
            Err(StoreError::Database(e)) if retryable(e) => outcome = once().await,
            _ => break,
        }
    }
    outcome
}

/// The message lifecycle. Each change locks its conversation's row first, as a batch of sends
/// does (so the two queue, never deadlock), then checks, then takes the next seq: a refusal
/// rolls back and uses no seq.
impl PostgresStore {
    async fn lock_conversation(
        tx: &mut sqlx::PgConnection,
        conversation: ConversationId,
    ) -> Result<(), StoreError> {
        let found: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM conversations WHERE id = $1 FOR NO KEY UPDATE")
                .bind(conversation)
                .fetch_optional(tx)
                .await?;
        found
            .map(|_| ())
            .ok_or(StoreError::NoSuchConversation(conversation))
    }

    /// Moves the conversation's membership version, inside the change's transaction.
    async fn next_members_version(
        tx: &mut sqlx::PgConnection,
        conversation: ConversationId,
    ) -> Result<i64, StoreError> {
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations SET members_version = members_version + 1 WHERE id = $1 \
             RETURNING members_version",
        )
        .bind(conversation)
        .fetch_optional(tx)
        .await?;
        version.ok_or(StoreError::NoSuchConversation(conversation))
    }

    async fn next_seq(
        tx: &mut sqlx::PgConnection,
        conversation: ConversationId,
    ) -> Result<(i64, i64), StoreError> {
        let next: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = $1 \
             RETURNING last_seq, members_version",
        )
        .bind(conversation)
        .fetch_optional(tx)
        .await?;
        next.ok_or(StoreError::NoSuchConversation(conversation))
    }

    async fn change_by_key(
        tx: &mut sqlx::PgConnection,
        conversation: ConversationId,
        actor: &str,
        client_msg_id: &str,
    ) -> Result<Option<Change>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS} FROM message_changes \
             WHERE conversation_id = $1 AND actor_id = $2 AND client_msg_id = $3"
        )))
        .bind(conversation)
        .bind(actor)
        .bind(client_msg_id)
        .fetch_optional(tx)
        .await?;
        row.as_ref().map(change_from).transpose()
    }

    async fn target_of(
        tx: &mut sqlx::PgConnection,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<(String, bool)>, StoreError> {
        let row: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT sender_id, deleted_at FROM messages WHERE conversation_id = $1 AND seq = $2",
        )
        .bind(conversation)
        .bind(seq)
        .fetch_optional(tx)
        .await?;
        Ok(row.map(|(sender, deleted)| (sender, deleted.is_some())))
    }

    async fn edit_once(&self, edit: &NewEdit) -> Result<Changed, StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::lock_conversation(&mut tx, edit.conversation_id).await?;
        if let Some(existing) = Self::change_by_key(
            &mut tx,
            edit.conversation_id,
            &edit.actor_id,
            &edit.client_msg_id,
        )
        .await?
        {
            return Ok(match existing {
                Change::MessageUpdated(e) if e.target == edit.target => {
                    Changed::Existing(Change::MessageUpdated(e))
                }
                _ => Changed::Refused(Refusal::KeyReused),
            });
        }
        match Self::target_of(&mut tx, edit.conversation_id, edit.target).await? {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some((_, true)) => return Ok(Changed::Refused(Refusal::Deleted)),
            Some((sender, false)) if sender != edit.actor_id => {
                return Ok(Changed::Refused(Refusal::NotSender));
            }
            Some(_) => {}
        }
        let at = crate::chat::model::now();
        let version: i64 = sqlx::query_scalar(
            "UPDATE messages SET content = $1, edited_at = $2, version = version + 1 \
             WHERE conversation_id = $3 AND seq = $4 RETURNING version",
        )
        .bind(&edit.content)
        .bind(at)
        .bind(edit.conversation_id)
        .bind(edit.target)
        .fetch_one(&mut *tx)
        .await?;
        let (seq, members_version) = Self::next_seq(&mut tx, edit.conversation_id).await?;
        sqlx::query(
            "INSERT INTO message_changes (conversation_id, seq, kind, target, actor_id, client_msg_id, content, version, created_at) \
             VALUES ($1, $2, 'edit', $3, $4, $5, $6, $7, $8)",
        )
        .bind(edit.conversation_id)
        .bind(seq)
        .bind(edit.target)
        .bind(&edit.actor_id)
        .bind(&edit.client_msg_id)
        .bind(&edit.content)
        .bind(version)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Changed::New(
            Change::MessageUpdated(Edit {
                conversation_id: edit.conversation_id,
                seq,
                target: edit.target,
                user_id: edit.actor_id.clone(),
                content: Some(edit.content.clone()),
                edited_at: at,
                version,
            }),
            members_version,
        ))
    }

    async fn delete_once(&self, deletion: &NewDeletion) -> Result<Changed, StoreError> {
        let id = deletion.conversation_id;
        let mut tx = self.pool.begin().await?;
        Self::lock_conversation(&mut tx, id).await?;
        match Self::target_of(&mut tx, id, deletion.target).await? {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some((_, true)) => {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CHANGE_COLUMNS} FROM message_changes \
                     WHERE conversation_id = $1 AND target = $2 AND kind = 'delete'"
                )))
                .bind(id)
                .bind(deletion.target)
                .fetch_one(&mut *tx)
                .await?;
                return Ok(Changed::Existing(change_from(&row)?));
            }
            Some(_) => {}
        }
        let at = crate::chat::model::now();
        sqlx::query(
            "UPDATE messages SET content = '', deleted_at = $1, mentions = NULL, reply_quote = NULL \
             WHERE conversation_id = $2 AND seq = $3",
        )
        .bind(at)
        .bind(id)
        .bind(deletion.target)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE message_changes SET content = NULL WHERE conversation_id = $1 AND target = $2 AND kind = 'edit'",
        )
        .bind(id)
        .bind(deletion.target)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE messages SET reply_quote = NULL WHERE conversation_id = $1 AND reply_to_seq = $2",
        )
        .bind(id)
        .bind(deletion.target)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM message_mentions WHERE conversation_id = $1 AND seq = $2")
            .bind(id)
            .bind(deletion.target)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM message_reactions WHERE conversation_id = $1 AND target = $2")
            .bind(id)
            .bind(deletion.target)
            .execute(&mut *tx)
            .await?;
        let (seq, members_version) = Self::next_seq(&mut tx, id).await?;
        sqlx::query(
            "INSERT INTO message_changes (conversation_id, seq, kind, target, actor_id, created_at) \
             VALUES ($1, $2, 'delete', $3, $4, $5)",
        )
        .bind(id)
        .bind(seq)
        .bind(deletion.target)
        .bind(&deletion.actor_id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Changed::New(
            Change::MessageDeleted(Deletion {
                conversation_id: id,
                seq,
                target: deletion.target,
                user_id: deletion.actor_id.clone(),
                deleted_at: at,
            }),
            members_version,
        ))
    }

    async fn react_once(&self, reaction: &NewReaction) -> Result<Changed, StoreError> {
        let id = reaction.conversation_id;
        let mut tx = self.pool.begin().await?;
        Self::lock_conversation(&mut tx, id).await?;
        if let Some(key) = &reaction.client_msg_id
            && let Some(existing) =
                Self::change_by_key(&mut tx, id, &reaction.actor_id, key).await?
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
        match Self::target_of(&mut tx, id, reaction.target).await? {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some((_, true)) => return Ok(Changed::Refused(Refusal::Deleted)),
            Some(_) => {}
        }
        let (distinct, has_emoji, mine): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(DISTINCT emoji), COUNT(*) FILTER (WHERE emoji = $1), \
             COUNT(*) FILTER (WHERE emoji = $1 AND user_id = $2) \
             FROM message_reactions WHERE conversation_id = $3 AND target = $4",
        )
        .bind(&reaction.emoji)
        .bind(&reaction.actor_id)
        .bind(id)
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
                "INSERT INTO message_reactions (conversation_id, target, emoji, user_id, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(reaction.target)
            .bind(&reaction.emoji)
            .bind(&reaction.actor_id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "DELETE FROM message_reactions WHERE conversation_id = $1 AND target = $2 AND emoji = $3 AND user_id = $4",
            )
            .bind(id)
            .bind(reaction.target)
            .bind(&reaction.emoji)
            .bind(&reaction.actor_id)
            .execute(&mut *tx)
            .await?;
        }
        let count = has_emoji + if reaction.on { 1 } else { -1 };
        let (seq, members_version) = Self::next_seq(&mut tx, id).await?;
        sqlx::query(
            "INSERT INTO message_changes (conversation_id, seq, kind, target, actor_id, client_msg_id, emoji, reaction_on, reaction_count, created_at) \
             VALUES ($1, $2, 'reaction', $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(seq)
        .bind(reaction.target)
        .bind(&reaction.actor_id)
        .bind(&reaction.client_msg_id)
        .bind(&reaction.emoji)
        .bind(reaction.on)
        .bind(count)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Changed::New(
            Change::ReactionUpdated(Reaction {
                conversation_id: id,
                seq,
                target: reaction.target,
                emoji: reaction.emoji.clone(),
                user_id: reaction.actor_id.clone(),
                on: reaction.on,
                count,
                reacted_at: at,
            }),
            members_version,
        ))
    }
}

/// The committer: one transaction per batch of queued sends, each answered after the commit.
/// A send whose caller has gone (its request timed out) is not written: it was never acked, and
/// a retry with the same `clientMsgId` writes it then.
async fn commit_batches(pool: PgPool, mut queue: mpsc::Receiver<(NewMessage, Reply)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (news, replies): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .filter(|(_, reply): &(NewMessage, Reply)| !reply.is_closed())
            .unzip();
        if news.is_empty() {
            continue;
        }
        let mut outcome = write_batch(&pool, &news).await;
        for _ in 1..ATTEMPTS {
            match &outcome {
                Err(StoreError::Database(e)) if retryable(e) => {
                    outcome = write_batch(&pool, &news).await;
                }
                _ => break,
            }
        }
        match outcome {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
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

/// Deadlock, serialisation failure, or a unique key taken by a concurrent transaction: the
/// batch was rolled back and a retry sees the winner's commit.
fn retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| matches!(code.as_ref(), "40P01" | "40001" | "23505"))
}

/// Where one send of a batch stands while the batch is written.
enum Slot {
    /// Boxed: a message (with its attachment) is far larger than the other variants.
    Done(Box<Result<Inserted, StoreError>>),
    /// The `n`th fresh message of the batch.
    Fresh(usize),
    /// A repeat, within the batch, of the `n`th fresh message's key.
    Repeat(usize),
}

/// Writes a batch in one transaction of at most six statements (begin, lock, look-up, seqs,
/// insert, commit). A send to a missing conversation fails alone (it wrote nothing); any
/// database error rolls the whole batch back.
async fn write_batch(
    pool: &PgPool,
    news: &[NewMessage],
) -> Result<Vec<Result<Inserted, StoreError>>, StoreError> {
    let mut ids: Vec<Uuid> = news.iter().map(|n| n.conversation_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut tx = pool.begin().await?;
    // In id order: two batches locking overlapping conversations queue, never deadlock.
    let present: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT id FROM conversations WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let asked: Vec<&NewMessage> = news
        .iter()
        .filter(|n| present.contains(&n.conversation_id))
        .collect();
    let mut existing: HashMap<(Uuid, &str, &str), Message> = HashMap::new();
    if !asked.is_empty() {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages \
             JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS k(c, s, i) \
             ON conversation_id = k.c AND sender_id = k.s AND client_msg_id = k.i"
        )))
        .bind(asked.iter().map(|n| n.conversation_id).collect::<Vec<_>>())
        .bind(
            asked
                .iter()
                .map(|n| n.sender_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            asked
                .iter()
                .map(|n| n.client_msg_id.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let message = message_from(row)?;
            let key = news
                .iter()
                .find(|n| {
                    n.conversation_id == message.conversation_id
                        && n.sender_id == message.sender_id
                        && n.client_msg_id == message.client_msg_id
                })
                .map(|n| {
                    (
                        n.conversation_id,
                        n.sender_id.as_str(),
                        n.client_msg_id.as_str(),
                    )
                })
                .ok_or_else(|| corrupt("message found for no key asked", &message.client_msg_id))?;
            existing.insert(key, message);
        }
    }
    let mut slots = Vec::with_capacity(news.len());
    let mut fresh: Vec<&NewMessage> = Vec::new();
    let mut first: HashMap<(Uuid, &str, &str), usize> = HashMap::new();
    let mut counts: HashMap<Uuid, i64> = HashMap::new();
    for new in news {
        let key = (
            new.conversation_id,
            new.sender_id.as_str(),
            new.client_msg_id.as_str(),
        );
        if !present.contains(&new.conversation_id) {
            slots.push(Slot::Done(Box::new(Err(StoreError::NoSuchConversation(
                new.conversation_id,
            )))));
        } else if let Some(message) = existing.get(&key) {
            slots.push(Slot::Done(Box::new(Ok(Inserted::Existing(
                message.clone(),
            )))));
        } else if let Some(&n) = first.get(&key) {
            slots.push(Slot::Repeat(n));
        } else {
            first.insert(key, fresh.len());
            slots.push(Slot::Fresh(fresh.len()));
            fresh.push(new);
            *counts.entry(new.conversation_id).or_default() += 1;
        }
    }
    let mut messages = Vec::with_capacity(fresh.len());
    let mut members_versions: HashMap<Uuid, i64> = HashMap::new();
    if !fresh.is_empty() {
        let (conversations, added): (Vec<Uuid>, Vec<i64>) = counts.into_iter().unzip();
        let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
            "UPDATE conversations AS c SET last_seq = c.last_seq + d.n \
             FROM unnest($1::uuid[], $2::bigint[]) AS d(id, n) WHERE c.id = d.id \
             RETURNING c.id, c.last_seq - d.n, c.members_version",
        )
        .bind(&conversations)
        .bind(&added)
        .fetch_all(&mut *tx)
        .await?;
        // The last seq each conversation had before this batch (its messages follow in order),
        // and the membership version the batch commits under.
        let mut next: HashMap<Uuid, i64> = HashMap::with_capacity(rows.len());
        for (id, seq, version) in rows {
            next.insert(id, seq);
            members_versions.insert(id, version);
        }
        let created_at = crate::chat::model::now();
        for new in &fresh {
            let seq = next
                .get_mut(&new.conversation_id)
                .ok_or(StoreError::NoSuchConversation(new.conversation_id))?;
            *seq += 1;
            messages.push(Message {
                id: Uuid::now_v7(),
                conversation_id: new.conversation_id,
                seq: *seq,
                sender_id: new.sender_id.clone(),
                sender_name: new.sender_name.clone(),
                kind: new.kind,
                content: new.content.clone(),
                client_msg_id: new.client_msg_id.clone(),
                created_at,
                attachment: new.attachment.clone(),
                reply_to: new.reply_to.clone().map(Box::new),
                mentions: new.mentions.clone(),
                ..Message::default()
            });
        }
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at, attachment, \
             reply_to_seq, reply_sender_id, reply_sender_name, reply_quote, mentions) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::text[], \
             $11::bigint[], $12::text[], $13::text[], $14::text[], $15::text[])",
        )
        .bind(messages.iter().map(|m| m.id).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.conversation_id).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.seq).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.sender_id.as_str()).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.sender_name.as_str()).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.client_msg_id.as_str()).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.kind.as_str()).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.created_at).collect::<Vec<_>>())
        .bind(
            messages
                .iter()
                .map(|m| super::attachment_json(m.attachment.as_ref()))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .bind(messages.iter().map(|m| m.reply_to.as_ref().map(|r| r.seq)).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.reply_to.as_ref().map(|r| r.sender_id.as_str())).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.reply_to.as_ref().map(|r| r.sender_name.as_str())).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.reply_to.as_ref().and_then(|r| r.quote.as_deref())).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| mentions_to(&m.mentions)).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        let mentioned: Vec<(Uuid, &str, i64)> = messages
            .iter()
            .flat_map(|m| {
                m.mentions
                    .iter()
                    .filter(|u| **u != m.sender_id)
                    .map(|u| (m.conversation_id, u.as_str(), m.seq))
            })
            .collect();
        if !mentioned.is_empty() {
            sqlx::query(
                "INSERT INTO message_mentions (conversation_id, user_id, seq) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
            )
            .bind(mentioned.iter().map(|m| m.0).collect::<Vec<_>>())
            .bind(mentioned.iter().map(|m| m.1).collect::<Vec<_>>())
            .bind(mentioned.iter().map(|m| m.2).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Done(result) => *result,
            Slot::Fresh(n) => {
                let message = messages[n].clone();
                let version = members_versions
                    .get(&message.conversation_id)
                    .copied()
                    .unwrap_or_default();
                Ok(Inserted::New(message, version))
            }
            Slot::Repeat(n) => Ok(Inserted::Existing(messages[n].clone())),
        })
        .collect())
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

fn summary_from(row: &PgRow) -> Result<ConversationSummary, StoreError> {
    Ok(ConversationSummary {
        unread: row.try_get("unread")?,
        mentions: row.try_get("mentions")?,
        last_read_seq: row.try_get("last_read_seq")?,
        conversation: conversation_from(row)?,
    })
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
                attachment: None,
                reply_to: None,
                mentions: vec![],
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
                                attachment: None,
                                reply_to: None,
                                mentions: vec![],
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
                .filter(|r| matches!(r, Inserted::New(..)))
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

    #[tokio::test]
    async fn two_nodes_group_committing_into_one_database_share_gap_free_seqs_and_keys() {
        let db = TestDb::create().await;
        let one = Arc::new(
            PostgresStore::connect(&db.url, 4, Duration::from_secs(5))
                .await
                .expect("connects"),
        );
        let two = Arc::new(
            PostgresStore::connect(&db.url, 4, Duration::from_secs(5))
                .await
                .expect("connects"),
        );
        let mut conversations = Vec::new();
        for _ in 0..5 {
            let c = one
                .create_conversation(NewConversation {
                    kind: ConversationKind::Open,
                    title: None,
                    department_id: None,
                    members: vec![],
                })
                .await
                .expect("create");
            conversations.push(c.id);
        }
        // Both nodes send to every conversation at once, in opposite orders (batches that lock
        // overlapping conversations), and both send every key: each key is stored once.
        let mut tasks = Vec::new();
        for (node, store) in [(0, one.clone()), (1, two.clone())] {
            for i in 0..200 {
                let store = store.clone();
                let index = if node == 0 { i % 5 } else { 4 - i % 5 };
                let conversation = conversations[index];
                tasks.push(tokio::spawn(async move {
                    store
                        .insert_message(NewMessage {
                            conversation_id: conversation,
                            sender_id: "racer".into(),
                            sender_name: "Racer".into(),
                            client_msg_id: format!("k-{}", i / 5),
                            kind: MessageKind::Text,
                            content: format!("from {node}"),
                            attachment: None,
                            reply_to: None,
                            mentions: vec![],
                        })
                        .await
                        .expect("insert")
                }));
            }
        }
        let mut fresh = 0;
        for t in tasks {
            if matches!(t.await.expect("task"), Inserted::New(..)) {
                fresh += 1;
            }
        }
        assert_eq!(
            fresh, 200,
            "each (conversation, key) stored once of its two sends"
        );
        for id in conversations {
            let stored = one.messages_after(id, 0, 1000).await.expect("read");
            assert_eq!(
                stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
                (1..=40).collect::<Vec<i64>>(),
                "gap-free"
            );
            let keys: std::collections::HashSet<_> =
                stored.iter().map(|m| m.client_msg_id.clone()).collect();
            assert_eq!(keys.len(), 40);
            let c = one.conversation(id).await.expect("load").expect("some");
            assert_eq!(c.last_seq, 40, "no seq burned");
        }
        drop((one, two));
        db.drop_now().await;
    }
}
