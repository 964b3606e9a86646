//! A `Store` in memory, so domain tests can run under a paused clock (SQLite answers from another
//! thread, which a paused runtime would skip time over). It meets the same contract.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use uuid::Uuid;

use crate::chat::model::{
    Attachment, Change, Conversation, ConversationId, ConversationSummary, Deletion, Edit, Member,
    MemberRole, Message, Reaction, ReactionCount, UserId,
};
use crate::store::{
    Changed, Inserted, NewConversation, NewDeletion, NewEdit, NewMessage, NewReaction, Refusal,
    Store, StoreError,
};

#[derive(Default)]
struct Data {
    conversations: HashMap<ConversationId, Conversation>,
    members: Vec<Member>,
    messages: Vec<Message>,
    attachments: Vec<Attachment>,
    /// Change entries with the idempotency key they were made with.
    changes: Vec<(Change, Option<(UserId, String)>)>,
    /// Current reactions, in the order they were made: (conversation, target, emoji, user).
    reactions: Vec<(ConversationId, i64, String, UserId)>,
}

impl Data {
    fn bump_members_version(&mut self, id: ConversationId) -> Option<i64> {
        let c = self.conversations.get_mut(&id)?;
        c.members_version += 1;
        Some(c.members_version)
    }

    /// The next seq, and the membership version it commits under.
    fn next_seq(&mut self, id: ConversationId) -> Result<(i64, i64), StoreError> {
        let c = self
            .conversations
            .get_mut(&id)
            .ok_or(StoreError::NoSuchConversation(id))?;
        c.last_seq += 1;
        Ok((c.last_seq, c.members_version))
    }

    fn by_key(&self, id: ConversationId, actor: &str, key: &str) -> Option<Change> {
        self.changes
            .iter()
            .find(|(c, k)| {
                c.conversation_id() == id && k.as_ref().is_some_and(|(a, k)| a == actor && k == key)
            })
            .map(|(c, _)| c.clone())
    }

    fn message_mut(&mut self, id: ConversationId, seq: i64) -> Option<&mut Message> {
        self.messages
            .iter_mut()
            .find(|m| m.conversation_id == id && m.seq == seq)
    }
}

#[derive(Default)]
pub struct MemoryStore {
    data: Mutex<Data>,
    /// Calls of the store's read methods, so a test can prove a path makes none.
    reads: AtomicUsize,
    /// When set, a commit returns only after a few yields, as a real store's round trip does:
    /// a caller can go away between the commit and what follows it.
    pub yield_after_commit: std::sync::atomic::AtomicBool,
    /// When set, a read of messages returns only after a few yields, so that concurrent
    /// look-ups overlap as they do against a real store.
    pub yield_in_log_reads: std::sync::atomic::AtomicBool,
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
            reply_to: new.reply_to.map(Box::new),
            mentions: new.mentions,
            ..Message::default()
        };
        let members_version = c.members_version;
        d.messages.push(m.clone());
        Ok(Inserted::New(m, members_version))
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
            members_version: 0,
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
                    last_received_seq: 0,
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
                let unread = d.messages.iter().filter(|x| {
                    x.conversation_id == c.id
                        && x.seq > m.last_read_seq
                        && x.sender_id != m.user_id
                        && !x.deleted
                });
                let mentions = unread.clone().filter(|x| x.mentions.contains(&m.user_id));
                Some(ConversationSummary {
                    unread: unread.count() as i64,
                    mentions: mentions.count() as i64,
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
    ) -> Result<Option<i64>, StoreError> {
        let mut d = self.data();
        if !d.conversations.contains_key(&conversation) {
            return Err(StoreError::NoSuchConversation(conversation));
        }
        if d.members
            .iter()
            .any(|m| m.conversation_id == conversation && m.user_id == user)
        {
            return Ok(None);
        }
        d.members.push(Member {
            conversation_id: conversation,
            user_id: user.into(),
            role,
            last_read_seq: 0,
            last_received_seq: 0,
            joined_at: crate::chat::model::now(),
        });
        Ok(d.bump_members_version(conversation))
    }

    async fn remove_member(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<Option<i64>, StoreError> {
        let mut d = self.data();
        let before = d.members.len();
        d.members
            .retain(|m| !(m.conversation_id == conversation && m.user_id == user));
        if d.members.len() == before {
            return Ok(None);
        }
        Ok(d.bump_members_version(conversation))
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
        if matches!(inserted, Inserted::New(..)) && self.yield_after_commit.load(Ordering::Relaxed)
        {
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
        if self.yield_in_log_reads.load(Ordering::Relaxed) {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
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

    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError> {
        Ok(self
            .read()
            .members
            .iter()
            .filter(|m| m.user_id == user)
            .map(|m| m.conversation_id)
            .collect())
    }

    async fn message_at(
        &self,
        conversation: ConversationId,
        seq: i64,
    ) -> Result<Option<Message>, StoreError> {
        Ok(self
            .read()
            .messages
            .iter()
            .find(|m| m.conversation_id == conversation && m.seq == seq)
            .cloned())
    }

    async fn edit_message(&self, edit: NewEdit) -> Result<Changed, StoreError> {
        let mut d = self.data();
        let id = edit.conversation_id;
        if !d.conversations.contains_key(&id) {
            return Err(StoreError::NoSuchConversation(id));
        }
        if let Some(existing) = d.by_key(id, &edit.actor_id, &edit.client_msg_id) {
            return Ok(match existing {
                Change::MessageUpdated(e) if e.target == edit.target => {
                    Changed::Existing(Change::MessageUpdated(e))
                }
                _ => Changed::Refused(Refusal::KeyReused),
            });
        }
        let Some(m) = d.message_mut(id, edit.target) else {
            return Ok(Changed::Refused(Refusal::NoSuchMessage));
        };
        if m.deleted {
            return Ok(Changed::Refused(Refusal::Deleted));
        }
        if m.sender_id != edit.actor_id {
            return Ok(Changed::Refused(Refusal::NotSender));
        }
        let at = crate::chat::model::now();
        m.content = edit.content.clone();
        m.edited_at = Some(at);
        m.version += 1;
        let version = m.version;
        let (seq, members_version) = d.next_seq(id)?;
        let change = Change::MessageUpdated(Edit {
            conversation_id: id,
            seq,
            target: edit.target,
            user_id: edit.actor_id.clone(),
            content: Some(edit.content),
            edited_at: at,
            version,
        });
        d.changes
            .push((change.clone(), Some((edit.actor_id, edit.client_msg_id))));
        Ok(Changed::New(change, members_version))
    }

    async fn delete_message(&self, deletion: NewDeletion) -> Result<Changed, StoreError> {
        let mut d = self.data();
        let id = deletion.conversation_id;
        if !d.conversations.contains_key(&id) {
            return Err(StoreError::NoSuchConversation(id));
        }
        let target = deletion.target;
        let Some(m) = d.message_mut(id, target) else {
            return Ok(Changed::Refused(Refusal::NoSuchMessage));
        };
        if m.deleted {
            let tombstone = d
                .changes
                .iter()
                .find(|(c, _)| {
                    matches!(c, Change::MessageDeleted(x) if x.conversation_id == id && x.target == target)
                })
                .map(|(c, _)| c.clone())
                .ok_or_else(|| StoreError::Corrupt("a deleted message without tombstone".into()))?;
            return Ok(Changed::Existing(tombstone));
        }
        m.deleted = true;
        m.content = String::new();
        m.mentions.clear();
        if let Some(r) = m.reply_to.as_mut() {
            r.quote = None;
            r.deleted = true;
        }
        for (c, _) in d.changes.iter_mut() {
            if let Change::MessageUpdated(e) = c
                && e.conversation_id == id
                && e.target == target
            {
                e.content = None;
            }
        }
        for m in d.messages.iter_mut() {
            if m.conversation_id == id
                && let Some(r) = m.reply_to.as_mut()
                && r.seq == target
            {
                r.quote = None;
                r.deleted = true;
            }
        }
        d.reactions.retain(|r| !(r.0 == id && r.1 == target));
        let (seq, members_version) = d.next_seq(id)?;
        let change = Change::MessageDeleted(Deletion {
            conversation_id: id,
            seq,
            target,
            user_id: deletion.actor_id,
            deleted_at: crate::chat::model::now(),
        });
        d.changes.push((change.clone(), None));
        Ok(Changed::New(change, members_version))
    }

    async fn react(&self, reaction: NewReaction) -> Result<Changed, StoreError> {
        let mut d = self.data();
        let id = reaction.conversation_id;
        if !d.conversations.contains_key(&id) {
            return Err(StoreError::NoSuchConversation(id));
        }
        if let Some(key) = &reaction.client_msg_id
            && let Some(existing) = d.by_key(id, &reaction.actor_id, key)
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
        match d.message_mut(id, reaction.target) {
            None => return Ok(Changed::Refused(Refusal::NoSuchMessage)),
            Some(m) if m.deleted => return Ok(Changed::Refused(Refusal::Deleted)),
            Some(_) => {}
        }
        let on_target =
            |r: &&(ConversationId, i64, String, UserId)| r.0 == id && r.1 == reaction.target;
        let mut distinct: Vec<&String> =
            d.reactions.iter().filter(on_target).map(|r| &r.2).collect();
        distinct.sort();
        distinct.dedup();
        let has_emoji = d
            .reactions
            .iter()
            .filter(on_target)
            .filter(|r| r.2 == reaction.emoji)
            .count() as i64;
        let mine = d
            .reactions
            .iter()
            .filter(on_target)
            .any(|r| r.2 == reaction.emoji && r.3 == reaction.actor_id);
        if mine == reaction.on {
            return Ok(Changed::Unchanged);
        }
        if reaction.on && has_emoji == 0 && distinct.len() >= reaction.max_distinct {
            return Ok(Changed::Refused(Refusal::TooManyReactions));
        }
        if reaction.on {
            d.reactions.push((
                id,
                reaction.target,
                reaction.emoji.clone(),
                reaction.actor_id.clone(),
            ));
        } else {
            d.reactions.retain(|r| {
                !(r.0 == id
                    && r.1 == reaction.target
                    && r.2 == reaction.emoji
                    && r.3 == reaction.actor_id)
            });
        }
        let (seq, members_version) = d.next_seq(id)?;
        let change = Change::ReactionUpdated(Reaction {
            conversation_id: id,
            seq,
            target: reaction.target,
            emoji: reaction.emoji,
            user_id: reaction.actor_id.clone(),
            on: reaction.on,
            count: has_emoji + if reaction.on { 1 } else { -1 },
            reacted_at: crate::chat::model::now(),
        });
        let key = reaction.client_msg_id.map(|k| (reaction.actor_id, k));
        d.changes.push((change.clone(), key));
        Ok(Changed::New(change, members_version))
    }

    async fn changes_after_each(
        &self,
        cursors: &[(ConversationId, i64)],
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        let d = self.read();
        let mut out = Vec::new();
        for &(id, after) in cursors {
            let mut v: Vec<Change> = d
                .changes
                .iter()
                .map(|(c, _)| c)
                .filter(|c| c.conversation_id() == id && c.seq() > after)
                .cloned()
                .collect();
            v.sort_by_key(Change::seq);
            v.truncate(limit as usize);
            out.extend(v);
        }
        Ok(out)
    }

    async fn reactions_of(
        &self,
        conversation: ConversationId,
        seqs: &[i64],
        viewer: &str,
    ) -> Result<Vec<(i64, ReactionCount)>, StoreError> {
        let d = self.read();
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::new();
        for seq in sorted {
            let mut counts: Vec<ReactionCount> = Vec::new();
            for r in d
                .reactions
                .iter()
                .filter(|r| r.0 == conversation && r.1 == seq)
            {
                match counts.iter_mut().find(|c| c.emoji == r.2) {
                    Some(c) => {
                        c.count += 1;
                        c.me |= r.3 == viewer;
                    }
                    None => counts.push(ReactionCount {
                        emoji: r.2.clone(),
                        count: 1,
                        me: r.3 == viewer,
                    }),
                }
            }
            out.extend(counts.into_iter().map(|c| (seq, c)));
        }
        Ok(out)
    }

    async fn mark_received(
        &self,
        conversation: ConversationId,
        user: &str,
        seq: i64,
    ) -> Result<Option<Vec<(UserId, i64)>>, StoreError> {
        let mut d = self.data();
        let Some(member) = d
            .members
            .iter_mut()
            .find(|m| m.conversation_id == conversation && m.user_id == user)
        else {
            return Ok(None);
        };
        let old = member.last_received_seq;
        if seq <= old {
            return Ok(Some(Vec::new()));
        }
        member.last_received_seq = seq;
        let mut senders: std::collections::BTreeMap<UserId, i64> = Default::default();
        for m in d.messages.iter().filter(|m| {
            m.conversation_id == conversation && m.seq > old && m.seq <= seq && m.sender_id != user
        }) {
            let last = senders.entry(m.sender_id.clone()).or_default();
            *last = (*last).max(m.seq);
        }
        Ok(Some(senders.into_iter().collect()))
    }
}

#[tokio::test]
async fn the_memory_test_store_meets_the_store_contract() {
    crate::store::contract::run(&MemoryStore::default()).await;
    crate::store::contract::run_concurrency(std::sync::Arc::new(MemoryStore::default())).await;
}
