//! Users' conversation ids, read in batches: while one read is in flight, the look-ups that
//! arrive meanwhile wait for the next, which serves them all in one query.
//!
//! Every connect lists its user's conversations (to attach the connection to them). One at a
//! time that is one small query, but a reconnect storm of thousands makes it thousands of round
//! trips to the store's reader threads, each a hand-off between threads on the same core. So a
//! look-up joins a queue, one task drains it [`BATCH`] users per query, and a quiet node pays
//! only the task's start: the first look-up's read starts at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::error::ChatError;
use super::model::{ConversationId, UserId};
use crate::store::Store;

/// Most users one read asks for.
const BATCH: usize = 512;

type Answer = oneshot::Sender<Result<Vec<ConversationId>, ()>>;

#[derive(Default, Clone)]
pub(super) struct ConversationIds {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    waiting: Vec<(UserId, Answer)>,
    /// A task is reading what waits.
    running: bool,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConversationIds {
    /// The ids of `user`'s conversations, read with whatever other look-ups wait.
    pub(super) async fn of(
        &self,
        store: &Arc<dyn Store>,
        user: &str,
    ) -> Result<Vec<ConversationId>, ChatError> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut st = lock(&self.state);
            st.waiting.push((user.to_owned(), answer));
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(drain(self.state.clone(), store.clone()));
        }
        match answered.await {
            Ok(Ok(ids)) => Ok(ids),
            // The read failed (logged once for the batch), or the task ended without an answer.
            Ok(Err(())) | Err(_) => Err(ChatError::Unavailable),
        }
    }
}

/// Marks the queue without a task however the task ends (a panic in the store included), so the
/// next look-up starts one; the look-ups it held get no answer, that is `unavailable`.
struct Running {
    state: Arc<Mutex<State>>,
    /// Ended with the queue empty (marked so under the lock already).
    finished: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = lock(&self.state);
            st.running = false;
            st.waiting.clear();
        }
    }
}

async fn drain(state: Arc<Mutex<State>>, store: Arc<dyn Store>) {
    let mut running = Running {
        state,
        finished: false,
    };
    loop {
        let batch: Vec<(UserId, Answer)> = {
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
        match store.conversation_ids_of_each(&users).await {
            Ok(pairs) => {
                let mut of: HashMap<UserId, Vec<ConversationId>> = HashMap::new();
                for (user, id) in pairs {
                    of.entry(user).or_default().push(id);
                }
                for (user, answer) in batch {
                    let ids = of.get(&user).cloned().unwrap_or_default();
                    let _ = answer.send(Ok(ids)); // gone: the connection closed meanwhile
                }
            }
            Err(e) => {
                tracing::error!(error = %e, users = users.len(), "listing users' conversations failed");
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
        let ids = ConversationIds::default();
        let asks = ["u1", "u2", "u3", "nobody", "u2"].map(|u| {
            let (ids, store) = (ids.clone(), store.clone());
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
    }
}
