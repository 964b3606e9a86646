//! Subscriptions and resume: at connect a connection is attached to every conversation of its
//! user, and a client that brings cursors gets what it missed, in seq order, before live events.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::error::ChatError;
use super::event::{Event, Outgoing, Topic};
use super::hub::{ConnId, TopicChange};
use super::model::{ConversationId, Identity, LogEntry};
use super::service::ChatService;

/// The last seq a client saw per conversation, as it sends them in the handshake.
pub type Cursors = Vec<(ConversationId, i64)>;

/// Most conversations one handshake may carry cursors for.
pub const MAX_CURSORS: usize = 1000;

/// `resume_truncated`: more was missed than a resume replays; `sync` from `afterSeq` for the rest.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ResumeTruncated {
    conversation_id: ConversationId,
    after_seq: i64,
}

/// Checks cursors from a handshake: each conversation once, seqs not negative, at most
/// [`MAX_CURSORS`].
pub fn check_cursors(cursors: &Cursors) -> Result<(), ChatError> {
    if cursors.len() > MAX_CURSORS {
        return Err(ChatError::invalid(format!(
            "cursors name at most {MAX_CURSORS} conversations"
        )));
    }
    let mut seen = HashSet::new();
    for (id, seq) in cursors {
        if !seen.insert(id) {
            return Err(ChatError::invalid(format!(
                "cursors name conversation {id} twice"
            )));
        }
        if *seq < 0 {
            return Err(ChatError::invalid(format!(
                "the cursor of conversation {id} is negative"
            )));
        }
    }
    Ok(())
}

impl ChatService {
    /// Attaches the connection to every conversation of its user and waits for their bus
    /// bindings, so nothing published from here on passes it by. Returns the conversations.
    pub(super) async fn subscribe_all(
        &self,
        who: &Identity,
        conn: ConnId,
    ) -> Result<HashSet<ConversationId>, ChatError> {
        let ids: HashSet<ConversationId> = self
            .conversation_ids
            .of(&self.store, &who.user_id)
            .await?
            .into_iter()
            .collect();
        let mut change = TopicChange::default();
        for id in &ids {
            match self.hub.join(conn, *id) {
                Some(joined) => change.acquired.extend(joined.acquired),
                None => return Err(ChatError::Unauthorized("the connection is closed".into())),
            }
        }
        self.apply(change).await;
        for id in &ids {
            self.bound(&Topic::Conversation(*id)).await;
        }
        Ok(ids)
    }

    /// Writes what the client missed since its cursors straight to the connection (its live
    /// events are still held): the log's entries in seq order, messages as `new_message` (as
    /// they are now: edited, or deleted without content) and changes as the events that
    /// announced them, at most `max_resume` per conversation. Returns the last seq
    /// written per conversation, so the held live copies of those messages are dropped.
    /// Cursors of conversations the user is no longer in are passed over: the client learns of
    /// its conversations with `GET /api/conversations`.
    pub(super) async fn replay(
        &self,
        conn: ConnId,
        member_of: &HashSet<ConversationId>,
        cursors: Cursors,
    ) -> HashMap<ConversationId, i64> {
        let mut replayed = HashMap::new();
        let Some(out) = self.hub.outbound_of(conn) else {
            return replayed;
        };
        let cap = self.settings.max_resume;
        let cursors: Cursors = cursors
            .into_iter()
            .filter(|(id, _)| member_of.contains(id))
            .collect();
        if cursors.is_empty() {
            return replayed;
        }
        // Every cursor in one read of each kind of entry (messages, changes); one more than
        // the cap tells whether anything was left.
        let mut missed = match self.log_after(&cursors, cap + 1).await {
            Ok(entries) => Some(entries.into_iter().peekable()),
            Err(_) => {
                tracing::warn!(
                    "resume could not read the missed log; the client pages it with sync"
                );
                None
            }
        };
        for (id, after) in cursors {
            let mut last = after;
            let mut count = 0u32;
            let truncated = match missed.as_mut() {
                Some(missed) => {
                    while let Some(entry) = missed.next_if(|e| e.conversation_id() == id) {
                        count += 1;
                        if count > cap {
                            continue;
                        }
                        last = entry.seq();
                        let event = match entry {
                            LogEntry::Message(message) => Event::NewMessage(message),
                            LogEntry::Change(change) => Event::from(change),
                        };
                        ChatService::direct(&*out, &Arc::new(event.encode()));
                    }
                    count > cap
                }
                None => true,
            };
            if last > after {
                replayed.insert(id, last);
            }
            if truncated {
                ChatService::direct(
                    &*out,
                    &Outgoing::new(
                        "resume_truncated",
                        &ResumeTruncated {
                            conversation_id: id,
                            after_seq: last,
                        },
                    ),
                );
            }
        }
        replayed
    }
}
