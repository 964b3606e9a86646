//! Per-user look-ups read in batches: while one read is in flight, the look-ups that arrive
//! meanwhile wait for the next, which serves them all in one query.
//!
//! Every connect lists its user's conversations (to attach the connection to them), and what a
//! client asks for right after a reconnect (`sync`'s counts, `GET /api/conversations`) lists them
//! with their unread counts. One at a time each is one small query, but a reconnect storm of
//! thousands makes them thousands of round trips to the store's reader threads, each a hand-off
//! between threads on the same core. So a look-up joins a queue, one task drains it [`BATCH`]
//! users per query, and a quiet node pays only the task's start: the first look-up's read starts
//! at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::error::ChatError;
use super::model::{ConversationId, ConversationSummary, UserId};
use crate::store::{Store, StoreError};

/// Most users one read asks for.
const BATCH: usize = 512;

/// The store read of one batch: `(user, item)` pairs, each user's items in their order.
type Read<V> =
    fn(Arc<dyn Store>, Vec<UserId>) -> BoxFuture<'static, Result<Vec<(UserId, V)>, StoreError>>;

type Answer<V> = oneshot::Sender<Result<Vec<V>, ()>>;

pub(super) struct Batched<V> {
    state: Arc<Mutex<State<V>>>,
    read: Read<V>,
    /// What the look-up is, for the log when a read fails.
    what: &'static str,
}

struct State<V> {
    waiting: Vec<(UserId, Answer<V>)>,
    /// A task is reading what waits.
    running: bool,
}

fn lock<V>(state: &Mutex<State<V>>) -> std::sync::MutexGuard<'_, State<V>> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Users' conversation ids ([`Store::conversation_ids_of_each`]).
pub(super) fn conversation_ids() -> Batched<ConversationId> {
    Batched::new("listing users' conversations", |store, users| {
        Box::pin(async move { store.conversation_ids_of_each(&users).await })
    })
}

/// Users' conversations with their counts ([`Store::conversations_of_each`]).
pub(super) fn summaries() -> Batched<ConversationSummary> {
    Batched::new(
        "listing users' conversations with counts",
        |store, users| Box::pin(async move { store.conversations_of_each(&users).await }),
    )
}

impl<V: Clone + std::marker::Send + 'static> Batched<V> {
    fn new(what: &'static str, read: Read<V>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                waiting: Vec::new(),
                running: false,
            })),
            read,
            what,
        }
    }

    /// `user`'s items, read with whatever other look-ups wait.
    pub(super) async fn of(&self, store: &Arc<dyn Store>, user: &str) -> Result<Vec<V>, ChatError> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut st = lock(&self.state);
            st.waiting.push((user.to_owned(), answer));
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(drain(
                self.state.clone(),
                store.clone(),
                self.read,
                self.what,
            ));
        }
        match answered.await {
            Ok(Ok(items)) => Ok(items),
            // The read failed (logged once for the batch), or the task ended without an answer.
            Ok(Err(())) | Err(_) => Err(ChatError::Unavailable),
        }
    }
}

/// Marks the queue without a task however the task ends (a panic in the store included), so the
/// next look-up starts one; the look-ups it held get no answer, that is `unavailable`.
struct Running<V> {
    state: Arc<Mutex<State<V>>>,
    /// Ended with the queue empty (marked so under the lock already).
    finished: bool,
}

impl<V> Drop for Running<V> {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = lock(&self.state);
            st.running = false;
            st.waiting.clear();
        }
    }
}

async fn drain<V: Clone>(
    state: Arc<Mutex<State<V>>>,
    store: Arc<dyn Store>,
    read: Read<V>,
    what: &'static str,
) {
    let mut running = Running {
        state,
        finished: false,
    };
    loop {
        let batch: Vec<(UserId, Answer<V>)> = {
            let mut st = lock(&running.state);
            if st.waiting.is_empty() {
                st.running = false;
                st.waiting = Vec::new();
                running.finished = true;
                return;
            }
            let n = st.waiting.len().min(BATCH);
            st.waiting.drain(..n).collect()
        };
        let mut users: Vec<UserId> = batch.iter().map(|(u, _)| u.clone()).collect();
        users.sort_unstable();
        users.dedup();
        match read(store.clone(), users).await {
            Ok(pairs) => {
                let mut of: HashMap<UserId, Vec<V>> = HashMap::new();
                for (user, item) in pairs {
                    of.entry(user).or_default().push(item);
                }
                for (user, answer) in batch {
                    let items = of.get(&user).cloned().unwrap_or_default();
                    let _ = answer.send(Ok(items)); // gone: the connection closed meanwhile
                }
            }
            Err(e) => {
                tracing::error!(error = %e, users = batch.len(), "{what} failed");
                for (_, answer) in batch {
                    let _ = answer.send(Err(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::model::MemberRole;
    use crate::chat::tests::memory_store::MemoryStore;
    use crate::store::NewConversation;

    #[tokio::test]
    async fn concurrent_look_ups_are_answered_each_with_its_own_users_conversations() {
        let store = Arc::new(MemoryStore::default());
        let mut made = HashMap::new();
        for (title, members) in [("a", vec!["u1", "u2"]), ("b", vec!["u2", "u3"])] {
            let c = store
                .create_conversation(NewConversation {
                    kind: crate::chat::model::ConversationKind::Group,
                    title: Some(title.into()),
                    department_id: None,
                    members: members
                        .iter()
                        .map(|m| ((*m).to_owned(), MemberRole::Member))
                        .collect(),
                })
                .await
                .expect("create");
            made.insert(title, c.id);
        }
        let store: Arc<dyn Store> = store;
        let ids = conversation_ids();
        let asks = ["u1", "u2", "u3", "nobody", "u2"].map(|u| {
            let (ids, store) = (&ids, store.clone());
            async move {
                let mut got = ids.of(&store, u).await.expect("ids");
                got.sort();
                got
            }
        });
        let got = futures::future::join_all(asks).await;
        let mut both = vec![made["a"], made["b"]];
        both.sort();
        assert_eq!(got[0], vec![made["a"]]);
        assert_eq!(got[1], both);
        assert_eq!(got[2], vec![made["b"]]);
        assert!(got[3].is_empty());
        assert_eq!(got[4], both, "the same user twice in a batch");
        // The queue runs empty and the task ends; a later look-up starts another.
        assert_eq!(ids.of(&store, "u3").await.expect("ids"), vec![made["b"]]);
        let summaries = summaries();
        let listed = summaries.of(&store, "u2").await.expect("summaries");
        let mut listed: Vec<ConversationId> = listed.iter().map(|s| s.conversation.id).collect();
        listed.sort();
        assert_eq!(listed, both);
    }
}
