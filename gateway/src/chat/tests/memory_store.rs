//! A `Store` in memory, so domain tests can run under a paused clock (SQLite answers from another
//! thread, which a paused runtime would skip time over). It meets the same contract.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use uuid::Uuid;

use crate::chat::model::{
    Attachment, Conversation, ConversationId, ConversationSummary, Member, MemberRole, Message,
    UserId,
};
use crate::store::{Inserted, NewConversation, NewMessage, Store, StoreError};

#[derive(Default)]
struct Data {
    conversations: HashMap<ConversationId, Conversation>,
    members: Vec<Member>,
    messages: Vec<Message>,
    attachments: Vec<Attachment>,
}

#[derive(Default)]
pub struct MemoryStore {
    data: Mutex<Data>,
    /// Calls of the store's read methods, so a test can prove a path makes none.
    reads: AtomicUsize,
    /// When set, a commit returns only after a few yields, as a real store's round trip does:
    /// a caller can go away between the commit and what follows it.
    pub yield_after_commit: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    /// The insert itself, under the lock.
    fn insert_now(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        let mut d = self.data();
        if let Some(m) = d.messages.iter().find(|m| {
            m.conversation_id == new.conversation_id
                && m.sender_id == new.sender_id
                && m.client_msg_id == new.client_msg_id
        }) {
            return Ok(Inserted::Existing(m.clone()));
        }
        let c = d
            .conversations
            .get_mut(&new.conversation_id)
            .ok_or(StoreError::NoSuchConversation(new.conversation_id))?;
        c.last_seq += 1;
        let m = Message {
            id: Uuid::now_v7(),
            conversation_id: new.conversation_id,
            seq: c.last_seq,
            sender_id: new.sender_id,
            sender_name: new.sender_name,
            kind: new.kind,
            content: new.content,
            client_msg_id: new.client_msg_id,
            created_at: crate::chat::model::now(),
            attachment: new.attachment,
        };
        d.messages.push(m.clone());
        Ok(Inserted::New(m))
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().expect("memory store lock")
    }

    /// The data, for a read method: counted in [`reads`](Self::reads).
    fn read(&self) -> std::sync::MutexGuard<'_, Data> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.data()
    }

    /// How many reads (conversation, members, messages, co-members look-ups) were made so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn create_conversation(&self, new: NewConversation) -> Result<Conversation, StoreError> {
        let c = Conversation {
            id: Uuid::now_v7(),
            kind: new.kind,
            title: new.title,
            department_id: new.department_id,
            last_seq: 0,
            created_at: crate::chat::model::now(),
        };
        let mut d = self.data();
        d.conversations.insert(c.id, c.clone());
        for (user, role) in new.members {
            if !d
                .members
                .iter()
                .any(|m| m.conversation_id == c.id && m.user_id == user)
            {
                d.members.push(Member {
                    conversation_id: c.id,
                    user_id: user,
                    role,
                    last_read_seq: 0,
                    joined_at: crate::chat::model::now(),
                });
            }
        }
        Ok(c)
    }

    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        Ok(self.read().conversations.get(&id).cloned())
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationSummary>, StoreError> {
        let d = self.read();
        let mut out: Vec<ConversationSummary> = d
            .members
            .iter()
            .filter(|m| m.user_id == user)
            .filter_map(|m| {
                let c = d.conversations.get(&m.conversation_id)?.clone();
                Some(ConversationSummary {
                    unread: (c.last_seq - m.last_read_seq).max(0),
                    last_read_seq: m.last_read_seq,
                    conversation: c,
                })
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.conversation.last_seq));
        Ok(out)
    }

    async fn add_member(
        &self,
        conversation: ConversationId,
        user: &str,
        role: MemberRole,
    ) -> Result<bool, StoreError> {
        let mut d = self.data();
        if !d.conversations.contains_key(&conversation) {
            return Err(StoreError::NoSuchConversation(conversation));
        }
        if d.members
            .iter()
            .any(|m| m.conversation_id == conversation && m.user_id == user)
        {
            return Ok(false);
        }
        d.members.push(Member {
            conversation_id: conversation,
            user_id: user.into(),
            role,
            last_read_seq: 0,
            joined_at: crate::chat::model::now(),
        });
        Ok(true)
    }

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<bool, StoreError> {
        let mut d = self.data();
        let before = d.members.len();
        d.members
            .retain(|m| !(m.conversation_id == conversation && m.user_id == user));
        Ok(d.members.len() < before)
    }

    async fn member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<Member>, StoreError> {
        Ok(self
            .read()
            .members
            .iter()
            .find(|m| m.conversation_id == conversation && m.user_id == user)
            .cloned())
    }

    async fn members(&self, conversation: ConversationId) -> Result<Vec<Member>, StoreError> {
        Ok(self
            .read()
            .members
            .iter()
            .filter(|m| m.conversation_id == conversation)
            .cloned()
            .collect())
    }

    async fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        let inserted = self.insert_now(new)?;
        if matches!(inserted, Inserted::New(_)) && self.yield_after_commit.load(Ordering::Relaxed) {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
        Ok(inserted)
    }

    async fn messages_before(
        &self,
        conversation: ConversationId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let d = self.read();
        let mut v: Vec<Message> = d
            .messages
            .iter()
            .filter(|m| m.conversation_id == conversation && m.seq < before_seq.unwrap_or(i64::MAX))
            .cloned()
            .collect();
        v.sort_by_key(|m| m.seq);
        let skip = v.len().saturating_sub(limit as usize);
        Ok(v.split_off(skip))
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let d = self.read();
        let mut v: Vec<Message> = d
            .messages
            .iter()
            .filter(|m| m.conversation_id == conversation && m.seq > after_seq)
            .cloned()
            .collect();
        v.sort_by_key(|m| m.seq);
        v.truncate(limit as usize);
        Ok(v)
    }

    async fn mark_read(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut d = self.data();
        Ok(d.members
            .iter_mut()
            .find(|m| m.conversation_id == conversation && m.user_id == user)
            .map(|m| {
                m.last_read_seq = m.last_read_seq.max(seq);
                m.last_read_seq
            }))
    }

    async fn co_members(&self, user: &str) -> Result<Vec<UserId>, StoreError> {
        let d = self.read();
        let mine: Vec<ConversationId> = d
            .members
            .iter()
            .filter(|m| m.user_id == user)
            .map(|m| m.conversation_id)
            .collect();
        let mut others: Vec<UserId> = d
            .members
            .iter()
            .filter(|m| mine.contains(&m.conversation_id) && m.user_id != user)
            .map(|m| m.user_id.clone())
            .collect();
        others.sort();
        others.dedup();
        Ok(others)
    }

    async fn insert_attachment(&self, new: Attachment) -> Result<Attachment, StoreError> {
        let mut d = self.data();
        if !d.conversations.contains_key(&new.conversation_id) {
            return Err(StoreError::NoSuchConversation(new.conversation_id));
        }
        if let Some(first) = d.attachments.iter().find(|a| {
            a.conversation_id == new.conversation_id
                && a.uploader_id == new.uploader_id
                && a.sha256 == new.sha256
                && a.name == new.name
        }) {
            return Ok(first.clone());
        }
        d.attachments.push(new.clone());
        Ok(new)
    }

    async fn attachment(&self, id: Uuid) -> Result<Option<Attachment>, StoreError> {
        Ok(self.read().attachments.iter().find(|a| a.id == id).cloned())
    }
}

#[tokio::test]
async fn the_memory_test_store_meets_the_store_contract() {
    crate::store::contract::run(&MemoryStore::default()).await;
    crate::store::contract::run_concurrency(std::sync::Arc::new(MemoryStore::default())).await;
}
