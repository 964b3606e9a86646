//! Messages: send (persist, then broadcast, then ack), read watermarks, history and sync.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::Instrument;

use super::error::ChatError;
use super::event::{ConversationUser, Event, Read, Route};
use super::model::{ConversationId, ConversationKind, Identity, MessageAttachment, MessageKind};
use super::service::ChatService;
use super::{Page, Send, Sent, Synced, check_text, store_err, unavailable};
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
        if req.content.len() > self.settings.max_content_bytes {
            return Err(ChatError::TooLarge(format!(
                "content is {} bytes; the limit is {}",
                req.content.len(),
                self.settings.max_content_bytes
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
        // A caption is optional beside an attachment; a text message needs its text.
        if req.attachment_id.is_none() && req.content.trim().is_empty() {
            return Err(ChatError::invalid("content must not be empty"));
        }
        check_text("clientMsgId", &req.client_msg_id, 100, false)?;
        self.throttle(LimitClass::UserMessages, &who.user_id)
            .await?;
        // From the node's conversation state: no store read for a member's send (its kind and
        // department, which never change, come from there too).
        let state = self.participating_state(req.conversation_id, who).await?;
        let department = match state.conversation.kind {
            ConversationKind::Support => state.conversation.department_id.clone(),
            _ => None,
        };
        drop(state);
        let attachment = match req.attachment_id {
            Some(id) => Some(
                self.attachment_for(req.conversation_id, req.kind, id)
                    .await?,
            ),
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
            Inserted::New(message) => message,
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
        let messages = self
            .store
            .messages_before(id, before_seq, limit)
            .await
            .map_err(store_err)?;
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
            let budget = self.settings.max_sync.saturating_sub(messages.len() as u32);
            if budget == 0 {
                truncated = true;
                break;
            }
            // One more than the budget tells whether anything was left behind.
            let mut batch = self
                .store
                .messages_after(id, after, budget + 1)
                .await
                .map_err(store_err)?;
            if batch.len() as u32 > budget {
                batch.truncate(budget as usize);
                truncated = true;
            }
            messages.extend(batch);
        }
        Ok(Synced {
            messages,
            truncated,
        })
    }
}
