//! Domain rules, driven through `ChatService` with recording connections and a paused clock.

mod attachments;
mod lifecycle;
pub(super) mod memory_store;
mod resume;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::bus::LocalBus;
use crate::chat::event::Outgoing;
use crate::chat::hub::{ConnId, Outbound};
use crate::chat::model::{Identity, MemberRole};
use crate::limits::{LimitSettings, MemoryLimits, Quota};
use crate::presence::MemoryPresence;
use memory_store::MemoryStore;

/// A connection that records what it is sent, and can pretend its queue is full.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, Value)>>,
    full: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
}

impl Outbound for Recorder {
    fn send(&self, event: &Arc<Outgoing>) -> Result<(), hub::SendFailure> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(hub::SendFailure::QueueFull);
        }
        let payload = serde_json::from_str(event.payload.get()).expect("payload is JSON");
        self.events
            .lock()
            .expect("lock")
            .push((event.name.to_owned(), payload));
        Ok(())
    }

    fn close(&self, _reason: crate::chat::hub::CloseReason) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Recorder {
    fn names(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn named(&self, name: &str) -> Vec<Value> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .collect()
    }

    fn clear(&self) {
        self.events.lock().expect("lock").clear();
    }
}

fn who(user: &str) -> Identity {
    Identity {
        user_id: user.into(),
        name: format!("{user}!"),
        roles: vec![],
        departments: vec![],
        exp: i64::MAX,
    }
}

fn agent(user: &str, department: &str) -> Identity {
    Identity {
        roles: vec!["agent".into()],
        departments: vec![department.into()],
        ..who(user)
    }
}

fn service() -> Arc<ChatService> {
    service_on(Arc::new(LocalBus::new()))
}

/// A service with generous limits on the given bus.
fn service_on(bus: Arc<dyn crate::bus::Bus>) -> Arc<ChatService> {
    service_with(Arc::new(MemoryStore::default()), bus)
}

/// A service with generous limits on the given store and bus.
fn service_with(
    store: Arc<dyn crate::store::Store>,
    bus: Arc<dyn crate::bus::Bus>,
) -> Arc<ChatService> {
    let generous = Quota {
        per_second: 1000,
        burst: 1000,
    };
    let limits = LimitSettings {
        user_messages: generous,
        connection_events: generous,
        user_joins: generous,
        address_connects: generous,
        user_requests: generous,
    };
    ChatService::new(
        store,
        bus,
        Arc::new(MemoryPresence::new()),
        Arc::new(MemoryLimits::new(limits)),
        ChatSettings {
            presence_grace: Duration::from_secs(3),
            ..ChatSettings::default()
        },
    )
}

async fn connect(svc: &Arc<ChatService>, user: &Identity) -> (ConnId, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let conn = svc.connect(user, rec.clone()).await.expect("connect");
    svc.presence_announced().await;
    (conn, rec)
}

async fn group(svc: &ChatService, owner: &Identity, others: &[&str]) -> Conversation {
    svc.create_conversation(
        owner,
        CreateConversation {
            kind: ConversationKind::Group,
            title: Some("g".into()),
            members: others.iter().map(|s| s.to_string()).collect(),
            department_id: None,
        },
    )
    .await
    .expect("create group")
}

fn text(c: &Conversation, client_msg_id: &str, content: &str) -> Send {
    Send {
        conversation_id: c.id,
        kind: MessageKind::Text,
        content: content.into(),
        client_msg_id: client_msg_id.into(),
        attachment_id: None,
        reply_to: None,
        mentions: Vec::new(),
    }
}

#[tokio::test]
async fn a_sent_message_is_persisted_then_broadcast_to_every_joined_connection() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (a, a_rec) = connect(&svc, &alice).await;
    let (b, b_rec) = connect(&svc, &bob).await;
    svc.join(a, &alice, c.id).await.expect("alice joins");
    svc.join(b, &bob, c.id).await.expect("bob joins");
    b_rec.clear();
    let sent = svc
        .send(&alice, text(&c, "m1", "hello"))
        .await
        .expect("send");
    assert!(sent.fresh);
    assert_eq!(sent.message.seq, 1);
    let got = b_rec.named("new_message");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["content"], "hello");
    assert_eq!(got[0]["seq"], 1);
    assert_eq!(got[0]["senderName"], "alice!");
    assert_eq!(got[0]["clientMsgId"], "m1");
    let stored = svc.history(&bob, c.id, None, None).await.expect("history");
    assert_eq!(stored.messages, vec![sent.message]);
    assert_eq!(
        a_rec.named("new_message").len(),
        1,
        "the sender's own devices get it too"
    );
}

#[tokio::test]
async fn retry_with_same_client_msg_id_returns_original_message_and_broadcasts_nothing() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (b, b_rec) = connect(&svc, &bob).await;
    svc.join(b, &bob, c.id).await.expect("join");
    let first = svc
        .send(&alice, text(&c, "same", "once"))
        .await
        .expect("send");
    let again = svc
        .send(&alice, text(&c, "same", "once"))
        .await
        .expect("retry");
    assert!(!again.fresh);
    assert_eq!(again.message.id, first.message.id);
    assert_eq!(b_rec.named("new_message").len(), 1);
}

#[tokio::test]
async fn strangers_cannot_join_send_or_read_a_group() {
    let svc = service();
    let (alice, eve) = (who("alice"), who("eve"));
    let c = group(&svc, &alice, &[]).await;
    let (e, _) = connect(&svc, &eve).await;
    assert_eq!(
        svc.join(e, &eve, c.id).await.expect_err("join").code(),
        "forbidden"
    );
    assert_eq!(
        svc.send(&eve, text(&c, "x", "hi"))
            .await
            .expect_err("send")
            .code(),
        "forbidden"
    );
    assert_eq!(
        svc.history(&eve, c.id, None, None)
            .await
            .expect_err("history")
            .code(),
        "forbidden"
    );
    assert_eq!(
        svc.sync(&eve, vec![(c.id, 0)])
            .await
            .expect_err("sync")
            .code(),
        "forbidden"
    );
    assert_eq!(
        svc.typing_start(&eve, c.id)
            .await
            .expect_err("typing")
            .code(),
        "forbidden"
    );
    assert_eq!(
        svc.mark_read(&eve, c.id, 0).await.expect_err("read").code(),
        "forbidden"
    );
}

#[tokio::test]
async fn anyone_may_join_an_open_conversation_and_then_send() {
    let svc = service();
    let (alice, zed) = (who("alice"), who("zed"));
    let c = svc
        .create_conversation(
            &alice,
            CreateConversation {
                kind: ConversationKind::Open,
                title: Some("lobby".into()),
                members: vec![],
                department_id: None,
            },
        )
        .await
        .expect("create");
    let (z, _) = connect(&svc, &zed).await;
    let joined = svc.join(z, &zed, c.id).await.expect("join open");
    assert!(
        joined
            .members
            .iter()
            .flatten()
            .any(|m| m.user_id == "zed" && m.role == MemberRole::Member)
    );
    svc.send(&zed, text(&c, "z1", "hi all"))
        .await
        .expect("member now");
}

#[tokio::test]
async fn support_conversations_are_joinable_by_agents_of_their_department_only() {
    let svc = service();
    let visitor = who("visitor");
    let c = svc
        .create_conversation(
            &visitor,
            CreateConversation {
                kind: ConversationKind::Support,
                title: None,
                members: vec![],
                department_id: Some("billing".into()),
            },
        )
        .await
        .expect("create support");
    let (billing, other) = (agent("ann", "billing"), agent("sam", "sales"));
    let (a, _) = connect(&svc, &billing).await;
    let (s, _) = connect(&svc, &other).await;
    let joined = svc
        .join(a, &billing, c.id)
        .await
        .expect("billing agent joins");
    assert!(
        joined
            .members
            .iter()
            .flatten()
            .any(|m| m.user_id == "ann" && m.role == MemberRole::Agent)
    );
    assert_eq!(
        svc.join(s, &other, c.id)
            .await
            .expect_err("sales agent")
            .code(),
        "not_found",
        "another department's conversation is answered as if it did not exist"
    );
}

#[tokio::test]
async fn the_department_inbox_receives_new_support_conversations_and_their_messages() {
    let svc = service();
    let ann = agent("ann", "billing");
    let inbox = Arc::new(Recorder::default());
    svc.connect_agent(&ann, inbox.clone())
        .await
        .expect("agent inbox");
    let visitor = who("visitor");
    let c = svc
        .create_conversation(
            &visitor,
            CreateConversation {
                kind: ConversationKind::Support,
                title: None,
                members: vec![],
                department_id: Some("billing".into()),
            },
        )
        .await
        .expect("create support");
    svc.send(&visitor, text(&c, "v1", "my invoice is wrong"))
        .await
        .expect("send");
    // The department comes with the conversation's state, like its members.
    svc.send(&visitor, text(&c, "v2", "twice"))
        .await
        .expect("send again");
    // A group conversation's messages stay out of the inbox, known or not.
    let g = group(&svc, &visitor, &[]).await;
    for id in ["g1", "g2"] {
        svc.send(&visitor, text(&g, id, "not billing"))
            .await
            .expect("group send");
    }
    assert_eq!(
        inbox.names(),
        vec!["conversation_created", "new_message", "new_message"]
    );
    let contents: Vec<Value> = inbox
        .named("new_message")
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(contents, vec!["my invoice is wrong", "twice"]);
    assert!(
        svc.connect_agent(&visitor, Arc::new(Recorder::default()))
            .await
            .is_err(),
        "visitors have no inbox"
    );
}

#[tokio::test]
async fn direct_conversations_need_exactly_one_other_member_and_never_change() {
    let svc = service();
    let alice = who("alice");
    let make = |members: Vec<&str>| CreateConversation {
        kind: ConversationKind::Direct,
        title: None,
        members: members.into_iter().map(String::from).collect(),
        department_id: None,
    };
    assert_eq!(
        svc.create_conversation(&alice, make(vec![]))
            .await
            .expect_err("none")
            .code(),
        "invalid"
    );
    assert_eq!(
        svc.create_conversation(&alice, make(vec!["alice"]))
            .await
            .expect_err("self")
            .code(),
        "invalid"
    );
    assert_eq!(
        svc.create_conversation(&alice, make(vec!["b", "c"]))
            .await
            .expect_err("two")
            .code(),
        "invalid"
    );
    let c = svc
        .create_conversation(&alice, make(vec!["bob"]))
        .await
        .expect("direct");
    assert_eq!(
        svc.add_member(&alice, c.id, "carol")
            .await
            .expect_err("add")
            .code(),
        "conflict"
    );
}

#[tokio::test]
async fn a_removed_member_stops_receiving_at_once_and_learns_of_the_removal() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (b, b_rec) = connect(&svc, &bob).await;
    svc.join(b, &bob, c.id).await.expect("join");
    svc.remove_member(&alice, c.id, "bob")
        .await
        .expect("remove");
    svc.send(&alice, text(&c, "after", "secret plans"))
        .await
        .expect("send");
    assert!(b_rec.named("new_message").is_empty());
    assert_eq!(
        b_rec.named("conversation_removed")[0]["conversationId"],
        c.id.to_string()
    );
    assert_eq!(
        svc.send(&bob, text(&c, "b", "hey"))
            .await
            .expect_err("send")
            .code(),
        "forbidden"
    );
}

/// Two nodes on one store, each with a bus of its own: what one node announces never reaches
/// the other, as when a removal's bus event is still on its way to the node a sender is on.
#[tokio::test]
async fn a_send_committed_after_a_removal_on_another_node_is_not_delivered_to_the_removed_user() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::default());
    let here = service_with(store.clone(), Arc::new(LocalBus::new()));
    let there = service_with(store.clone(), Arc::new(LocalBus::new()));
    let (alice, bob, carol) = (who("alice"), who("bob"), who("carol"));
    let c = group(&here, &alice, &["bob", "carol"]).await;
    // Bob and Carol are on `here`, attached at connect; one send loads and keeps its state.
    let (_b, b_rec) = connect(&here, &bob).await;
    let (_c, _c_rec) = connect(&here, &carol).await;
    here.send(&carol, text(&c, "before", "hello bob"))
        .await
        .expect("send");
    assert_eq!(b_rec.named("new_message").len(), 1, "a member receives");
    // Bob is removed through the other node: `here` never hears of it.
    there
        .remove_member(&alice, c.id, "bob")
        .await
        .expect("remove");
    here.send(&carol, text(&c, "after", "secret plans"))
        .await
        .expect("send");
    let got: Vec<String> = b_rec
        .named("new_message")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(got, ["hello bob"], "nothing committed after the removal");
    // Carol's later sends still reach the members left, from state read again.
    let (_a, a_rec) = connect(&here, &alice).await;
    here.send(&carol, text(&c, "later", "still here"))
        .await
        .expect("send");
    assert_eq!(a_rec.named("new_message")[0]["content"], "still here");
    assert_eq!(b_rec.named("new_message").len(), 1);
}

#[tokio::test]
async fn an_edit_committed_after_a_removal_on_another_node_is_not_delivered_to_the_removed_user() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::default());
    let here = service_with(store.clone(), Arc::new(LocalBus::new()));
    let there = service_with(store.clone(), Arc::new(LocalBus::new()));
    let (alice, bob, carol) = (who("alice"), who("bob"), who("carol"));
    let c = group(&here, &alice, &["bob", "carol"]).await;
    let (_b, b_rec) = connect(&here, &bob).await;
    let (_c, c_rec) = connect(&here, &carol).await;
    let sent = here
        .send(&carol, text(&c, "m", "draft"))
        .await
        .expect("send");
    there
        .remove_member(&alice, c.id, "bob")
        .await
        .expect("remove");
    here.change(
        &carol,
        ChangeRequest::Edit {
            conversation_id: c.id,
            target: sent.message.seq,
            content: "the real plan".into(),
            client_msg_id: "e1".into(),
        },
    )
    .await
    .expect("edit");
    assert_eq!(c_rec.named("message_updated").len(), 1, "members get it");
    assert!(
        b_rec.named("message_updated").is_empty(),
        "the edited content does not reach the removed user"
    );
}

#[tokio::test]
async fn user_joined_announces_new_members_not_reconnecting_ones() {
    let svc = service();
    let (alice, bob, zed, carol) = (who("alice"), who("bob"), who("zed"), who("carol"));
    let c = svc
        .create_conversation(
            &alice,
            CreateConversation {
                kind: ConversationKind::Open,
                title: Some("lobby".into()),
                members: vec!["bob".into()],
                department_id: None,
            },
        )
        .await
        .expect("create");
    let (a, a_rec) = connect(&svc, &alice).await;
    svc.join(a, &alice, c.id).await.expect("alice joins");
    // A member's connection joining the room (first device, or a reconnect) is not news.
    let (b1, _) = connect(&svc, &bob).await;
    svc.join(b1, &bob, c.id).await.expect("bob joins");
    svc.disconnect(b1).await;
    let (b2, _) = connect(&svc, &bob).await;
    svc.join(b2, &bob, c.id)
        .await
        .expect("bob rejoins elsewhere");
    assert_eq!(a_rec.named("user_joined"), Vec::<Value>::new());
    // Joining an open conversation makes a member: the room hears of it once.
    let (z, _) = connect(&svc, &zed).await;
    svc.join(z, &zed, c.id).await.expect("zed joins");
    svc.join(z, &zed, c.id).await.expect("zed joins again");
    // So does being added over HTTP.
    svc.add_member(&alice, c.id, "carol").await.expect("add");
    let (k, _) = connect(&svc, &carol).await;
    svc.join(k, &carol, c.id).await.expect("carol joins");
    let joined: Vec<(String, String)> = a_rec
        .named("user_joined")
        .iter()
        .map(|e| {
            (
                e["conversationId"].as_str().unwrap_or_default().to_owned(),
                e["userId"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let id = c.id.to_string();
    assert_eq!(
        joined,
        vec![(id.clone(), "zed".into()), (id, "carol".into())]
    );
}

#[tokio::test]
async fn members_added_later_are_told_of_the_conversation_on_every_device() {
    let svc = service();
    let (alice, carol) = (who("alice"), who("carol"));
    let c = group(&svc, &alice, &[]).await;
    let (_, phone) = connect(&svc, &carol).await;
    let (_, laptop) = connect(&svc, &carol).await;
    svc.add_member(&alice, c.id, "carol").await.expect("add");
    for device in [&phone, &laptop] {
        assert_eq!(
            device.named("conversation_added")[0]["conversation"]["id"],
            c.id.to_string()
        );
    }
}

#[tokio::test]
async fn mark_read_reaches_the_room_and_the_readers_other_devices_once_each() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (a, a_rec) = connect(&svc, &alice).await;
    let (_, a_other) = connect(&svc, &alice).await;
    svc.join(a, &alice, c.id).await.expect("join");
    svc.send(&bob, text(&c, "b1", "one")).await.expect("send");
    svc.send(&bob, text(&c, "b2", "two")).await.expect("send");
    assert_eq!(svc.mark_read(&alice, c.id, 2).await.expect("read"), 2);
    assert_eq!(
        svc.mark_read(&alice, c.id, 1).await.expect("read"),
        2,
        "the watermark never goes down"
    );
    assert_eq!(a_rec.named("message_read").len(), 2);
    assert_eq!(a_other.named("message_read")[0]["seq"], 2);
    assert_eq!(
        svc.mark_read(&alice, c.id, 3)
            .await
            .expect_err("beyond last")
            .code(),
        "invalid"
    );
    let listed = svc.conversations(&alice).await.expect("list");
    assert_eq!(listed[0].unread, 0);
}

#[tokio::test]
async fn history_pages_backwards_and_sync_returns_exactly_what_was_missed() {
    let svc = service();
    let alice = who("alice");
    let c = group(&svc, &alice, &[]).await;
    for i in 1..=7 {
        svc.send(&alice, text(&c, &format!("h{i}"), &format!("m{i}")))
            .await
            .expect("send");
    }
    let page = svc
        .history(&alice, c.id, None, Some(3))
        .await
        .expect("page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert_eq!(page.next_before_seq, Some(5));
    let page = svc
        .history(&alice, c.id, Some(2), Some(3))
        .await
        .expect("page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(page.next_before_seq, None);
    assert_eq!(
        svc.history(&alice, c.id, None, Some(101))
            .await
            .expect_err("limit")
            .code(),
        "invalid"
    );
    let synced = svc.sync(&alice, vec![(c.id, 4)]).await.expect("sync");
    assert_eq!(
        synced.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert!(!synced.truncated);
}

#[tokio::test]
async fn sync_reports_truncation_when_more_is_missing_than_it_returns() {
    let svc = {
        let s = service();
        // A small budget shows the cut without sending hundreds of messages.
        let mut settings = s.settings().clone();
        settings.max_sync = 3;
        let generous = Quota {
            per_second: 1000,
            burst: 1000,
        };
        ChatService::new(
            Arc::new(MemoryStore::default()),
            Arc::new(LocalBus::new()),
            Arc::new(MemoryPresence::new()),
            Arc::new(MemoryLimits::new(LimitSettings {
                user_messages: generous,
                connection_events: generous,
                user_joins: generous,
                address_connects: generous,
                user_requests: generous,
            })),
            settings,
        )
    };
    let alice = who("alice");
    let c = group(&svc, &alice, &[]).await;
    for i in 1..=5 {
        svc.send(&alice, text(&c, &format!("t{i}"), "x"))
            .await
            .expect("send");
    }
    let synced = svc.sync(&alice, vec![(c.id, 0)]).await.expect("sync");
    assert_eq!(
        synced.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(synced.truncated);
}

#[tokio::test]
async fn oversize_empty_and_control_character_input_is_refused_with_its_code() {
    let svc = service();
    let alice = who("alice");
    let c = group(&svc, &alice, &[]).await;
    let big = "x".repeat(svc.settings().max_content_bytes + 1);
    assert_eq!(
        svc.send(&alice, text(&c, "big", &big))
            .await
            .expect_err("big")
            .code(),
        "too_large"
    );
    assert_eq!(
        svc.send(&alice, text(&c, "empty", "  "))
            .await
            .expect_err("empty")
            .code(),
        "invalid"
    );
    assert_eq!(
        svc.send(&alice, text(&c, "bad\nid", "x"))
            .await
            .expect_err("id")
            .code(),
        "invalid"
    );
    let err = svc
        .create_conversation(
            &alice,
            CreateConversation {
                kind: ConversationKind::Group,
                title: Some("a\u{1b}[31mred".into()),
                members: vec![],
                department_id: None,
            },
        )
        .await
        .expect_err("title");
    assert_eq!(err.code(), "invalid");
    assert!(
        svc.history(&alice, c.id, None, None)
            .await
            .expect("history")
            .messages
            .is_empty(),
        "nothing was stored"
    );
}

#[tokio::test(start_paused = true)]
async fn typing_start_expires_after_five_seconds_without_renewal() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (b, b_rec) = connect(&svc, &bob).await;
    svc.join(b, &bob, c.id).await.expect("join");
    svc.typing_start(&alice, c.id).await.expect("typing");
    assert_eq!(b_rec.named("user_typing")[0]["userName"], "alice!");
    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert!(
        b_rec.named("user_stopped_typing").is_empty(),
        "still typing at 4.9 s"
    );
    assert!(svc.is_typing(c.id, "alice").await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b_rec.named("user_stopped_typing").len(),
        1,
        "expired at 5 s"
    );
    assert!(!svc.is_typing(c.id, "alice").await);
}

#[tokio::test(start_paused = true)]
async fn renewing_typing_pushes_the_expiry_back_and_stop_ends_it_once() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (b, b_rec) = connect(&svc, &bob).await;
    svc.join(b, &bob, c.id).await.expect("join");
    svc.typing_start(&alice, c.id).await.expect("typing");
    tokio::time::sleep(Duration::from_secs(3)).await;
    svc.typing_start(&alice, c.id).await.expect("renew");
    assert_eq!(
        b_rec.named("user_typing").len(),
        1,
        "a renewal is not a new start"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        b_rec.named("user_stopped_typing").is_empty(),
        "7 s after the first start, 4 s after renewal"
    );
    svc.typing_stop(&alice, c.id).await.expect("stop");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        b_rec.named("user_stopped_typing").len(),
        1,
        "stopped once; the old expiry is void"
    );
}

#[tokio::test(start_paused = true)]
async fn presence_is_per_user_across_devices_with_a_grace_period_against_flapping() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    group(&svc, &alice, &["bob"]).await;
    let (_, b_rec) = connect(&svc, &bob).await;
    let (phone, _) = connect(&svc, &alice).await;
    let (laptop, _) = connect(&svc, &alice).await;
    assert_eq!(
        b_rec.named("user_online").len(),
        1,
        "online once, not per device"
    );
    assert_eq!(b_rec.named("user_online")[0]["userId"], "alice");
    svc.disconnect(phone).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        b_rec.named("user_offline").is_empty(),
        "the laptop is still connected"
    );
    svc.disconnect(laptop).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A reconnect within the grace period: no offline, no second online.
    let (again, _) = connect(&svc, &alice).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(b_rec.named("user_offline").is_empty());
    assert_eq!(b_rec.named("user_online").len(), 1);
    svc.disconnect(again).await;
    tokio::time::sleep(Duration::from_millis(2900)).await;
    assert!(
        b_rec.named("user_offline").is_empty(),
        "still within the grace period"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b_rec.named("user_offline").len(), 1);
    let statuses = svc
        .presence(&bob, vec!["alice".into(), "bob".into()])
        .await
        .expect("presence");
    assert_eq!(statuses["alice"].status, model::Status::Offline);
    assert!(statuses["alice"].last_seen.is_some());
    assert_eq!(statuses["bob"].status, model::Status::Online);
}

/// A storm: every user of a room drops, the grace runs out while half of them are still away,
/// and they come back while their offlines wait in the announcer's queue. Whatever was dropped
/// unannounced, a co-member's view of each user ends right: offline and online alternate,
/// starting with offline, and the last says what is true.
#[tokio::test(start_paused = true)]
async fn presence_announced_through_a_storm_ends_as_the_truth_for_every_co_member() {
    let svc = service();
    let names: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    let others: Vec<&str> = names.iter().map(String::as_str).collect();
    let watcher = who("watcher");
    group(&svc, &watcher, &others).await;
    let (_w, w_rec) = connect(&svc, &watcher).await;
    let mut conns = Vec::new();
    for name in &names {
        conns.push(connect(&svc, &who(name)).await.0);
    }
    assert_eq!(w_rec.named("user_online").len(), names.len());
    w_rec.clear();
    for conn in conns {
        svc.disconnect(conn).await;
    }
    // The first half comes back inside the grace, the rest just after it ran out.
    for name in &names[..20] {
        connect(&svc, &who(name)).await;
    }
    tokio::time::sleep(Duration::from_millis(3050)).await;
    let mut back = Vec::new();
    for name in &names[20..] {
        let rec = Arc::new(Recorder::default());
        back.push(svc.connect(&who(name), rec).await.expect("connect"));
    }
    // And a few leave again for good.
    for conn in back.drain(..5) {
        svc.disconnect(conn).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    svc.presence_announced().await;

    let mut heard: HashMap<String, Vec<bool>> = HashMap::new();
    for (event, payload) in w_rec.events.lock().expect("lock").iter() {
        let online = match event.as_str() {
            "user_online" => true,
            "user_offline" => false,
            _ => continue,
        };
        let user = payload["userId"].as_str().expect("userId").to_owned();
        heard.entry(user).or_default().push(online);
    }
    for (i, name) in names.iter().enumerate() {
        let said = heard.get(name).cloned().unwrap_or_default();
        for (k, online) in said.iter().enumerate() {
            assert_eq!(
                *online,
                k % 2 == 1,
                "{name}: {said:?} does not alternate from offline"
            );
        }
        let online_now = !(20..25).contains(&i);
        let last_said_online = said.last().copied().unwrap_or(true);
        assert_eq!(last_said_online, online_now, "{name}: heard {said:?}");
    }
    for name in &names[..20] {
        assert!(
            !heard.contains_key(name),
            "{name} came back inside the grace: {heard:?}"
        );
    }
}

#[tokio::test]
async fn presence_tells_only_about_users_sharing_a_conversation_with_the_asker() {
    let svc = service();
    let (alice, bob, mallory) = (who("alice"), who("bob"), who("mallory"));
    group(&svc, &alice, &["bob"]).await;
    let (_a, _) = connect(&svc, &alice).await;
    let (_b, _) = connect(&svc, &bob).await;
    let asked = vec!["alice".to_owned(), "bob".to_owned()];
    let statuses = svc
        .presence(&mallory, asked.clone())
        .await
        .expect("presence");
    for user in &asked {
        assert_eq!(statuses[user].status, model::Status::Unknown, "{user}");
        assert_eq!(statuses[user].last_seen, None, "{user}");
    }
    let statuses = svc.presence(&bob, asked).await.expect("presence");
    assert_eq!(statuses["alice"].status, model::Status::Online);
    assert_eq!(statuses["bob"].status, model::Status::Online, "oneself");
}

#[tokio::test]
async fn an_agent_gets_the_same_not_found_for_a_conversation_it_may_not_see_as_for_none() {
    let svc = service();
    let alice = who("alice");
    let mut agent = who("agent");
    agent.roles = vec!["agent".into()];
    agent.departments = vec!["billing".into()];
    let private = group(&svc, &alice, &["bob"]).await;
    let (conn, _) = connect(&svc, &agent).await;
    let missing = uuid::Uuid::now_v7();
    for id in [private.id, missing] {
        let joined = svc.join(conn, &agent, id).await.expect_err("not visible");
        assert_eq!(joined.code(), "not_found", "join {id}");
        assert_eq!(joined.to_string(), "no such conversation");
        let added = svc
            .add_member(&agent, id, "agent")
            .await
            .expect_err("not visible");
        assert_eq!(added.code(), "not_found", "add_member {id}");
        assert_eq!(added.to_string(), "no such conversation");
    }
}

#[tokio::test]
async fn a_connection_whose_queue_is_full_is_closed_not_skipped() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (b, b_rec) = connect(&svc, &bob).await;
    svc.join(b, &bob, c.id).await.expect("join");
    b_rec.full.store(true, std::sync::atomic::Ordering::SeqCst);
    svc.send(&alice, text(&c, "x", "hello"))
        .await
        .expect("the send still succeeds");
    assert!(
        b_rec.closed.load(std::sync::atomic::Ordering::SeqCst),
        "the slow reader is disconnected to resync"
    );
}

#[tokio::test]
async fn rate_limited_sends_say_when_to_retry() {
    let limits = LimitSettings {
        user_messages: Quota {
            per_second: 1,
            burst: 2,
        },
        connection_events: Quota {
            per_second: 100,
            burst: 100,
        },
        user_joins: Quota {
            per_second: 100,
            burst: 100,
        },
        address_connects: Quota {
            per_second: 100,
            burst: 100,
        },
        user_requests: Quota {
            per_second: 100,
            burst: 100,
        },
    };
    let svc = ChatService::new(
        Arc::new(MemoryStore::default()),
        Arc::new(LocalBus::new()),
        Arc::new(MemoryPresence::new()),
        Arc::new(MemoryLimits::new(limits)),
        ChatSettings::default(),
    );
    let alice = who("alice");
    let c = group(&svc, &alice, &[]).await;
    svc.send(&alice, text(&c, "1", "a")).await.expect("1");
    svc.send(&alice, text(&c, "2", "b")).await.expect("2");
    match svc.send(&alice, text(&c, "3", "c")).await {
        Err(ChatError::RateLimited { retry_after_ms }) => {
            assert!(retry_after_ms > 0 && retry_after_ms <= 1000)
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
}

/// A bus that remembers what is bound, and whose binds or unbinds land late: as on a real
/// broker connection shared by many tasks, a later request can overtake an earlier one.
#[derive(Default)]
struct SlowBus {
    inner: LocalBus,
    bound: Mutex<std::collections::HashSet<String>>,
    bind_delay: Duration,
    unbind_delay: Duration,
    /// Topics whose subscribe hangs until [`SlowBus::release`].
    held: Mutex<std::collections::HashSet<String>>,
    released: tokio::sync::Notify,
    /// Subscribe calls by topic key.
    calls: Mutex<HashMap<String, usize>>,
}

impl SlowBus {
    fn is_bound(&self, key: &str) -> bool {
        self.bound.lock().expect("lock").contains(key)
    }

    fn hold(&self, key: &str) {
        self.held.lock().expect("lock").insert(key.to_owned());
    }

    fn release(&self, key: &str) {
        self.held.lock().expect("lock").remove(key);
        self.released.notify_waiters();
    }

    fn calls_of(&self, key: &str) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl crate::bus::Bus for SlowBus {
    fn attach(&self, deliver: crate::bus::Deliver) {
        self.inner.attach(deliver);
    }
    async fn publish(&self, envelope: Arc<event::Envelope>) -> Result<(), crate::bus::BusError> {
        self.inner.publish(envelope).await
    }
    async fn subscribe(&self, topic: event::Topic) -> Result<(), crate::bus::BusError> {
        let key = topic.key();
        *self
            .calls
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_default() += 1;
        loop {
            let released = self.released.notified();
            if !self.held.lock().expect("lock").contains(&key) {
                break;
            }
            released.await;
        }
        tokio::time::sleep(self.bind_delay).await;
        self.bound.lock().expect("lock").insert(topic.key());
        Ok(())
    }
    async fn unsubscribe(&self, topic: event::Topic) -> Result<(), crate::bus::BusError> {
        tokio::time::sleep(self.unbind_delay).await;
        self.bound.lock().expect("lock").remove(&topic.key());
        Ok(())
    }
    async fn ready(&self) -> bool {
        true
    }
    fn epoch(&self) -> u64 {
        0
    }
}

#[tokio::test]
async fn a_join_racing_the_last_leave_of_a_conversation_keeps_it_bound() {
    let bus = Arc::new(SlowBus {
        unbind_delay: Duration::from_millis(200),
        ..SlowBus::default()
    });
    let svc = service_on(bus.clone());
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let key = event::Topic::Conversation(c.id).key();
    let (a, _) = connect(&svc, &alice).await;
    svc.join(a, &alice, c.id).await.expect("alice joins");
    assert!(bus.is_bound(&key));
    let (b, _) = connect(&svc, &bob).await;
    // Alice's connection, the conversation's last on this node, goes; while its unbind is on
    // its way, Bob joins the conversation here.
    let leaving = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.disconnect(a).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    svc.join(b, &bob, c.id).await.expect("bob joins");
    leaving.await.expect("disconnect ran");
    assert!(
        bus.is_bound(&key),
        "Bob is in the room, so the node must still receive the conversation"
    );
}

#[tokio::test]
async fn a_join_returns_only_once_its_conversation_is_bound_even_by_another_join() {
    let bus = Arc::new(SlowBus {
        bind_delay: Duration::from_millis(200),
        ..SlowBus::default()
    });
    let svc = service_on(bus.clone());
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let key = event::Topic::Conversation(c.id).key();
    let (a, _) = connect(&svc, &alice).await;
    let (b, _) = connect(&svc, &bob).await;
    // Alice's join takes the node's binding of the conversation, which is slow to land; Bob
    // joins meanwhile and has nothing to bind himself.
    let first = {
        let (svc, alice) = (svc.clone(), alice.clone());
        tokio::spawn(async move { svc.join(a, &alice, c.id).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    svc.join(b, &bob, c.id).await.expect("bob joins");
    assert!(
        bus.is_bound(&key),
        "Bob's join (and so his sync) must not run ahead of the node's binding"
    );
    first.await.expect("task").expect("alice joins");
}

#[tokio::test]
async fn a_binding_that_hangs_holds_up_only_its_own_topic() {
    let bus = Arc::new(SlowBus::default());
    let svc = service_on(bus.clone());
    let (alice, carol) = (who("alice"), who("carol"));
    let stuck = group(&svc, &alice, &["bob"]).await;
    let free = group(&svc, &carol, &["bob"]).await;
    let stuck_key = event::Topic::Conversation(stuck.id).key();
    let free_key = event::Topic::Conversation(free.id).key();
    bus.hold(&stuck_key);
    // Alice's connection binds her conversation, and the broker does not answer.
    let first = {
        let (svc, alice) = (svc.clone(), alice.clone());
        tokio::spawn(async move { connect(&svc, &alice).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !first.is_finished(),
        "the held subscribe must keep Alice's connect waiting"
    );
    // Carol's conversation has nothing to do with it: her connection is bound at once.
    let (c, _) = tokio::time::timeout(Duration::from_secs(2), connect(&svc, &carol))
        .await
        .expect("a binding of another topic must not wait for the held one");
    assert!(bus.is_bound(&free_key));
    svc.join(c, &carol, free.id).await.expect("carol joins");
    assert!(!bus.is_bound(&stuck_key));
    bus.release(&stuck_key);
    first.await.expect("alice connects");
    assert!(bus.is_bound(&stuck_key));
}

#[tokio::test]
async fn each_topic_is_bound_once_however_its_changes_overtake_each_other() {
    let bus = Arc::new(SlowBus {
        bind_delay: Duration::from_millis(50),
        ..SlowBus::default()
    });
    let svc = service_on(bus.clone());
    let alice = who("alice");
    let c = group(&svc, &alice, &["bob"]).await;
    let topic = event::Topic::Conversation(c.id);
    let key = topic.key();
    let (a, _) = connect(&svc, &alice).await;
    assert!(bus.is_bound(&key));
    assert_eq!(bus.calls_of(&key), 1);
    // Stale changes of the same topic arrive late and in any order, while the hub still
    // wants it: none of them may bind it again, nor unbind it.
    let stale = [
        hub::TopicChange {
            acquired: vec![topic.clone()],
            released: vec![],
        },
        hub::TopicChange {
            acquired: vec![],
            released: vec![topic.clone()],
        },
        hub::TopicChange {
            acquired: vec![topic.clone()],
            released: vec![],
        },
    ];
    let applied: Vec<_> = stale
        .into_iter()
        .map(|change| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.apply(change).await })
        })
        .collect();
    for task in applied {
        task.await.expect("applied");
    }
    assert!(bus.is_bound(&key), "the hub still wants the conversation");
    assert_eq!(
        bus.calls_of(&key),
        1,
        "bound once, however many changes named it"
    );
    // Its last connection going away unbinds it; a stale release after that changes nothing.
    svc.disconnect(a).await;
    assert!(!bus.is_bound(&key));
    svc.apply(hub::TopicChange {
        acquired: vec![topic.clone()],
        released: vec![],
    })
    .await;
    assert!(
        !bus.is_bound(&key),
        "nothing here wants the conversation any more"
    );
    assert_eq!(bus.calls_of(&key), 1);
}

#[tokio::test]
async fn a_send_whose_caller_goes_away_is_published_if_it_was_committed() {
    let store = MemoryStore::default();
    store
        .yield_after_commit
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let svc = service_with(Arc::new(store), Arc::new(LocalBus::new()));
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let rec = Arc::new(Recorder::default());
    svc.connect(&bob, rec.clone()).await.expect("connect");
    // Callers aborted at every point of the send, as a closed connection's worker is.
    for i in 0..50u64 {
        let (svc, alice, req) = (svc.clone(), alice.clone(), text(&c, &format!("a{i}"), "x"));
        let caller = tokio::spawn(async move { svc.send_detached(&alice, req).await });
        for _ in 0..(i % 5) {
            tokio::task::yield_now().await;
        }
        caller.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stored: Vec<i64> = svc
        .history(&alice, c.id, None, Some(100))
        .await
        .expect("history")
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    let mut delivered: Vec<i64> = rec
        .named("new_message")
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect();
    delivered.sort_unstable();
    assert_eq!(
        delivered, stored,
        "every committed message was delivered live"
    );
}
