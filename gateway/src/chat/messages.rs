//! Messages: send (persist, then broadcast, then ack), read watermarks, history and sync.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::Instrument;

use super::error::ChatError;
use super::event::{ConversationUser, Event, Read, Route};
use super::model::{
    Change, ConversationId, ConversationKind, Identity, LogEntry, Message, MessageAttachment,
    MessageKind, ReplyQuote, UserId,
};
use super::service::ChatService;
use super::state::ConversationState;
use super::{Page, Send, Sent, Synced, check_text, check_user_id, store_err, unavailable};
use crate::limits::LimitClass;
use crate::store::{Inserted, NewMessage};
use crate::telemetry::metrics::unix_micros;

impl ChatService {
    /// Persist, then broadcast, then return (the caller acks). A retry of a committed
    /// `clientMsgId` returns the original and broadcasts nothing.
    /// [`send`](Self::send) on a task of its own. Once a committed message exists it must be
    /// published: a caller that goes away mid-send (its connection closed and the connection's
    /// worker aborted, say between the commit and the publish) would otherwise leave a message
    /// stored but never delivered live, and the client's retry finds it committed and publishes
    /// nothing. The task runs to the end whatever happens to the caller.
    pub async fn send_detached(
        self: &Arc<Self>,
        who: &Identity,
        req: Send,
    ) -> Result<Sent, ChatError> {
        let service = self.clone();
        let who = who.clone();
        let task = tokio::spawn(
            async move { service.send(&who, req).await }.instrument(tracing::Span::current()),
        );
        task.await
            .unwrap_or_else(|e| Err(unavailable("send task", e)))
    }

    pub async fn send(&self, who: &Identity, req: Send) -> Result<Sent, ChatError> {
        // One span per message, with the persist and publish steps as its children; ids and seq
        // only: never the content or the sender's token.
        let span = tracing::info_span!(
            "chat.send",
            conversation_id = %req.conversation_id,
            seq = tracing::field::Empty,
            fresh = tracing::field::Empty,
        );
        self.send_in_span(who, req).instrument(span).await
    }

    pub(super) async fn send_in_span(&self, who: &Identity, req: Send) -> Result<Sent, ChatError> {
        // A caption is optional beside an attachment; a text message needs its text.
        if req.attachment_id.is_none() || !req.content.is_empty() {
            self.check_content(&req.content)?;
        }
        check_text("clientMsgId", &req.client_msg_id, 100, false)?;
        if req.mentions.len() > MAX_MENTIONS {
            return Err(ChatError::invalid(format!(
                "a message mentions at most {MAX_MENTIONS} users"
            )));
        }
        let wants_attachment = matches!(req.kind, MessageKind::File | MessageKind::Image);
        match (wants_attachment, req.attachment_id) {
            (false, Some(_)) => {
                return Err(ChatError::invalid(
                    "attachmentId goes with type file or image, not text",
                ));
            }
            (true, None) => {
                return Err(ChatError::invalid(format!(
                    "a {} message needs the attachmentId of an upload to its conversation",
                    req.kind.as_str()
                )));
            }
            _ => {}
        }
        self.throttle(LimitClass::UserMessages, &who.user_id)
            .await?;
        // From the node's conversation state: no store read for a member's send (its kind and
        // department, which never change, come from there too).
        let state = self.participating_state(req.conversation_id, who).await?;
        let department = match state.conversation.kind {
            ConversationKind::Support => state.conversation.department_id.clone(),
            _ => None,
        };
        let mentions = mentioned(&state, req.mentions)?;
        let members_version = state.members_version();
        drop(state);
        let attachment = match req.attachment_id {
            Some(id) => Some(
                self.attachment_for(req.conversation_id, req.kind, id)
                    .await?,
            ),
            None => None,
        };
        let reply_to = match req.reply_to {
            Some(seq) => Some(self.quote(req.conversation_id, seq).await?),
            None => None,
        };
        let persist = tracing::info_span!(
            "store.insert_message",
            conversation_id = %req.conversation_id,
            seq = tracing::field::Empty,
        );
        let inserted = self
            .store
            .insert_message(NewMessage {
                conversation_id: req.conversation_id,
                sender_id: who.user_id.clone(),
                sender_name: who.name.clone(),
                client_msg_id: req.client_msg_id,
                kind: req.kind,
                content: req.content,
                attachment,
                reply_to,
                mentions,
            })
            .instrument(persist.clone())
            .await
            .map_err(store_err)?;
        let seq = inserted.message().seq;
        persist.record("seq", seq);
        let current = tracing::Span::current();
        current.record("seq", seq);
        let message = match inserted {
            Inserted::Existing(message) => {
                current.record("fresh", false);
                return Ok(Sent {
                    message,
                    fresh: false,
                });
            }
            Inserted::New(message, committed_under) => {
                if committed_under > members_version {
                    self.catch_up_members(message.conversation_id).await;
                }
                message
            }
        };
        current.record("fresh", true);
        let committed_at_us = self.metrics.enabled().then(unix_micros);
        self.metrics.message_persisted();
        if self
            .presence
            .typing_stop(message.conversation_id, &who.user_id)
            .await
            .unwrap_or(false)
        {
            self.publish(
                Route::Conversation {
                    id: message.conversation_id,
                    also_users: vec![],
                },
                Event::UserStoppedTyping(ConversationUser {
                    conversation_id: message.conversation_id,
                    user_id: who.user_id.clone(),
                }),
            )
            .await;
        }
        let publish = tracing::info_span!(
            "bus.publish",
            conversation_id = %message.conversation_id,
            seq = message.seq,
            event = "new_message",
        );
        async {
            self.publish_stamped(
                Route::Conversation {
                    id: message.conversation_id,
                    also_users: vec![],
                },
                Event::NewMessage(message.clone()),
                committed_at_us,
            )
            .await;
            if let Some(department) = department {
                self.publish_stamped(
                    Route::Department { id: department },
                    Event::NewMessage(message.clone()),
                    committed_at_us,
                )
                .await;
            }
        }
        .instrument(publish)
        .await;
        Ok(Sent {
            message,
            fresh: true,
        })
    }

    /// What a message of `kind` in `conversation` carries of attachment `id`: it must have been
    /// uploaded to that conversation, and an `image` message's must be an image.
    async fn attachment_for(
        &self,
        conversation: ConversationId,
        kind: MessageKind,
        id: uuid::Uuid,
    ) -> Result<MessageAttachment, ChatError> {
        let attachment = self
            .store
            .attachment(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::not_found("no such attachment"))?;
        if attachment.conversation_id != conversation {
            return Err(ChatError::forbidden(
                "the attachment was uploaded to another conversation",
            ));
        }
        if kind == MessageKind::Image
            && !crate::attachments::media::is_image(&attachment.content_type)
        {
            return Err(ChatError::invalid(format!(
                "an image message needs an image; the attachment is {}",
                attachment.content_type
            )));
        }
        Ok(MessageAttachment::from(&attachment))
    }

    pub async fn mark_read(
        &self,
        who: &Identity,
        id: ConversationId,
        seq: i64,
    ) -> Result<i64, ChatError> {
        let conversation = self.participating(id, who).await?;
        if seq < 0 || seq > conversation.last_seq {
            return Err(ChatError::invalid(format!(
                "seq must be between 0 and the conversation's last seq ({})",
                conversation.last_seq
            )));
        }
        let watermark = self
            .store
            .mark_read(id, &who.user_id, seq)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::forbidden("you are not a member of this conversation"))?;
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![who.user_id.clone()],
            },
            Event::MessageRead(Read {
                conversation_id: id,
                user_id: who.user_id.clone(),
                seq: watermark,
            }),
        )
        .await;
        Ok(watermark)
    }

    pub async fn history(
        &self,
        who: &Identity,
        id: ConversationId,
        before_seq: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Page, ChatError> {
        let limit = limit.unwrap_or(50);
        if limit == 0 || limit > self.settings.max_history {
            return Err(ChatError::invalid(format!(
                "limit must be between 1 and {}",
                self.settings.max_history
            )));
        }
        if before_seq.is_some_and(|s| s < 1) {
            return Err(ChatError::invalid("beforeSeq must be at least 1"));
        }
        self.participating(id, who).await?;
        let mut messages = self
            .store
            .messages_before(id, before_seq, limit)
            .await
            .map_err(store_err)?;
        self.with_reactions(id, &who.user_id, &mut messages).await?;
        let next_before_seq = messages.first().map(|m| m.seq).filter(|&s| s > 1);
        Ok(Page {
            messages,
            next_before_seq,
        })
    }

    pub async fn sync(
        &self,
        who: &Identity,
        cursors: Vec<(ConversationId, i64)>,
    ) -> Result<Synced, ChatError> {
        if cursors.len() > 1000 {
            return Err(ChatError::invalid("sync takes at most 1000 conversations"));
        }
        let mut seen = HashSet::new();
        let mut messages = Vec::new();
        let mut changes = Vec::new();
        let mut truncated = false;
        for (id, after) in cursors {
            if !seen.insert(id) {
                return Err(ChatError::invalid(format!(
                    "conversation {id} is listed twice"
                )));
            }
            if after < 0 {
                return Err(ChatError::invalid("afterSeq must not be negative"));
            }
            self.participating(id, who).await?;
            let taken = (messages.len() + changes.len()) as u32;
            let budget = self.settings.max_sync.saturating_sub(taken);
            if budget == 0 {
                truncated = true;
                break;
            }
            // One more than the budget tells whether anything was left behind.
            let mut batch = self.log_after(&[(id, after)], budget + 1).await?;
            if batch.len() as u32 > budget {
                batch.truncate(budget as usize);
                truncated = true;
            }
            for entry in batch {
                match entry {
                    LogEntry::Message(m) => messages.push(m),
                    LogEntry::Change(c) => changes.push(c),
                }
            }
        }
        let counts = self
            .summaries
            .of(&self.store, &who.user_id)
            .await?
            .into_iter()
            .filter(|s| seen.contains(&s.conversation.id))
            .collect();
        Ok(Synced {
            messages,
            changes,
            truncated,
            counts,
        })
    }

    /// The log after each cursor, at most `limit` entries per cursor, cursor after cursor,
    /// each gap-free from its cursor on. Served from the conversation's state where an earlier
    /// read still holds (see [`ConversationState::recent`]); the rest in one read of each kind
    /// of entry (messages, changes).
    pub(super) async fn log_after(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<LogEntry>, ChatError> {
        let epoch = self.bus.epoch();
        let mut kept: HashMap<ConversationId, Vec<LogEntry>> = HashMap::new();
        let mut misses = Vec::new();
        for &(id, after) in cursors {
            let state = self.conversations.get(id, epoch).ok();
            match state.and_then(|s| s.recent(after, limit)) {
                Some(entries) => {
                    kept.insert(id, entries);
                }
                None => misses.push((id, after)),
            }
        }
        // One store read of a conversation's log at a time: the look-ups that missed wait for
        // one in flight and are served from it (a storm's resumes of one room all miss at
        // once). The states are locked in id order, so two look-ups never wait on each other.
        let mut loading: Vec<Arc<ConversationState>> = misses
            .iter()
            .filter_map(|&(id, _)| self.conversations.get(id, epoch).ok())
            .collect();
        loading.sort_by_key(|s| s.conversation.id);
        loading.dedup_by_key(|s| s.conversation.id);
        let mut held = Vec::with_capacity(loading.len());
        for state in &loading {
            held.push(state.loading.lock().await);
        }
        if !held.is_empty() {
            misses.retain(|&(id, after)| {
                let served = loading
                    .iter()
                    .find(|s| s.conversation.id == id)
                    .and_then(|s| s.recent(after, limit));
                match served {
                    Some(entries) => {
                        kept.insert(id, entries);
                        false
                    }
                    None => true,
                }
            });
        }
        if !misses.is_empty() {
            let messages = self
                .store
                .messages_after_each(&misses, limit)
                .await
                .map_err(store_err)?;
            let changes = self
                .store
                .changes_after_each(&misses, limit)
                .await
                .map_err(store_err)?;
            let mut read = merge_log(&misses, messages, changes, limit)
                .into_iter()
                .peekable();
            for &(id, after) in &misses {
                let mut entries = Vec::new();
                while let Some(entry) = read.next_if(|e| e.conversation_id() == id) {
                    entries.push(entry);
                }
                // Messages and changes are two reads: an entry committed between them can be
                // missing below one that was read. Cut at the gap; what follows arrives live
                // (the connection is attached) or with the client's next sync.
                let gap = entries
                    .iter()
                    .zip(after + 1..)
                    .position(|(e, expected)| e.seq() != expected);
                if let Some(gap) = gap {
                    entries.truncate(gap);
                } else if entries.len() < limit as usize
                    && let Ok(state) = self.conversations.get(id, epoch)
                {
                    state.remember(after, &entries);
                }
                kept.insert(id, entries);
            }
        }
        Ok(cursors
            .iter()
            .flat_map(|(id, _)| kept.remove(id).unwrap_or_default())
            .collect())
    }

    /// The quote of the message a reply answers, or why there is none to answer.
    async fn quote(&self, id: ConversationId, seq: i64) -> Result<ReplyQuote, ChatError> {
        let quoted = self
            .store
            .message_at(id, seq)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                ChatError::invalid(format!(
                    "replyTo {seq} is not a message of this conversation"
                ))
            })?;
        if quoted.deleted {
            return Err(ChatError::invalid(format!(
                "replyTo {seq} was deleted; there is nothing to quote"
            )));
        }
        let mut quote: String = quoted.content.chars().take(QUOTE_CHARS).collect();
        if quoted.content.chars().nth(QUOTE_CHARS).is_some() {
            quote.push('…');
        }
        Ok(ReplyQuote {
            seq,
            sender_id: quoted.sender_id,
            sender_name: quoted.sender_name,
            quote: Some(quote),
            deleted: false,
        })
    }

    /// Adds reaction counts, as `viewer` sees them, to messages of one conversation.
    pub(super) async fn with_reactions(
        &self,
        id: ConversationId,
        viewer: &str,
        messages: &mut [Message],
    ) -> Result<(), ChatError> {
        let seqs: Vec<i64> = messages
            .iter()
            .filter(|m| !m.deleted)
            .map(|m| m.seq)
            .collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let counts = self
            .store
            .reactions_of(id, &seqs, viewer)
            .await
            .map_err(store_err)?;
        for (seq, count) in counts {
            if let Some(m) = messages.iter_mut().find(|m| m.seq == seq) {
                m.reactions.push(count);
            }
        }
        Ok(())
    }
}

/// Most users one message may mention.
const MAX_MENTIONS: usize = 50;
/// Longest quote of a replied-to message, in characters (then `…`).
const QUOTE_CHARS: usize = 120;

/// The mentioned users, each once in the order given; every one must be a member.
fn mentioned(state: &ConversationState, asked: Vec<UserId>) -> Result<Vec<UserId>, ChatError> {
    let mut out: Vec<UserId> = Vec::with_capacity(asked.len());
    for user in asked {
        check_user_id("mentions", &user)?;
        if state.member(&user).is_none() {
            return Err(ChatError::invalid(format!(
                "mentioned user {user:?} is not a member of this conversation"
            )));
        }
        if !out.contains(&user) {
            out.push(user);
        }
    }
    Ok(out)
}

/// Merges each cursor's messages and changes into its log order, `limit` entries at most per
/// cursor, cursor after cursor (both inputs come grouped by cursor in the order asked).
pub(super) fn merge_log(
    cursors: &[(ConversationId, i64)],
    messages: Vec<Message>,
    changes: Vec<Change>,
    limit: u32,
) -> Vec<LogEntry> {
    let mut messages = messages.into_iter().peekable();
    let mut changes = changes.into_iter().peekable();
    let mut out = Vec::new();
    for &(id, _) in cursors {
        let mut taken = 0u32;
        loop {
            let message_seq = messages
                .peek()
                .filter(|m| m.conversation_id == id)
                .map(|m| m.seq);
            let change_seq = changes
                .peek()
                .filter(|c| c.conversation_id() == id)
                .map(Change::seq);
            let entry = match (message_seq, change_seq) {
                (None, None) => break,
                (Some(m), Some(c)) if c < m => {
                    LogEntry::Change(changes.next().expect("peeked just now"))
                }
                (Some(_), _) => LogEntry::Message(messages.next().expect("peeked just now")),
                (None, Some(_)) => LogEntry::Change(changes.next().expect("peeked just now")),
            };
            if taken < limit {
                out.push(entry);
            }
            taken += 1;
        }
    }
    out
}
