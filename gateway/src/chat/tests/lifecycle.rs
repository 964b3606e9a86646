//! Edits, deletions, reactions, replies, mentions, counts and delivery receipts, driven through
//! `ChatService` with recording connections.

use super::*;
use crate::chat::model::{Change, LogEntry};

fn edit(c: &Conversation, seq: i64, key: &str, content: &str) -> ChangeRequest {
    ChangeRequest::Edit {
        conversation_id: c.id,
        target: seq,
        content: content.into(),
        client_msg_id: key.into(),
    }
}

fn delete(c: &Conversation, seq: i64) -> ChangeRequest {
    ChangeRequest::Delete {
        conversation_id: c.id,
        target: seq,
    }
}

fn react(c: &Conversation, seq: i64, emoji: &str, on: bool) -> ChangeRequest {
    ChangeRequest::React {
        conversation_id: c.id,
        target: seq,
        emoji: emoji.into(),
        on,
        client_msg_id: None,
    }
}

/// The log events a connection received, as (name, seq).
fn log_events(rec: &Recorder) -> Vec<(String, i64)> {
    rec.events
        .lock()
        .expect("lock")
        .iter()
        .filter(|(n, _)| {
            [
                "new_message",
                "message_updated",
                "message_deleted",
                "reaction_updated",
            ]
            .contains(&n.as_str())
        })
        .map(|(n, p)| (n.clone(), p["seq"].as_i64().expect("seq")))
        .collect()
}

#[tokio::test]
async fn every_change_reaches_every_connection_once_in_seq_order_and_a_retry_publishes_nothing() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (_, a) = connect(&svc, &alice).await;
    let (_, b) = connect(&svc, &bob).await;
    svc.send(&alice, text(&c, "m1", "hello"))
        .await
        .expect("send");
    let e = svc
        .change(&alice, edit(&c, 1, "e1", "hello, edited"))
        .await
        .expect("edit")
        .expect("an entry");
    let again = svc
        .change(&alice, edit(&c, 1, "e1", "hello, edited"))
        .await
        .expect("retry")
        .expect("the entry");
    assert_eq!(e, again, "a retry returns the entry committed before");
    svc.change(&bob, react(&c, 1, "👍", true))
        .await
        .expect("react");
    assert_eq!(
        svc.change(&bob, react(&c, 1, "👍", true))
            .await
            .expect("react"),
        None,
        "already there: nothing to change"
    );
    svc.change(&alice, delete(&c, 1)).await.expect("delete");
    let expected: Vec<(String, i64)> = vec![
        ("new_message".into(), 1),
        ("message_updated".into(), 2),
        ("reaction_updated".into(), 3),
        ("message_deleted".into(), 4),
    ];
    assert_eq!(log_events(&a), expected);
    assert_eq!(log_events(&b), expected);
    let updated = &b.named("message_updated")[0];
    assert_eq!(updated["target"], 1);
    assert_eq!(updated["content"], "hello, edited");
    assert_eq!(updated["version"], 1);
    assert!(updated["editedAt"].is_string());
    let reaction = &b.named("reaction_updated")[0];
    assert_eq!(reaction["emoji"], "👍");
    assert_eq!(reaction["userId"], "bob");
    assert_eq!(reaction["on"], true);
    assert_eq!(reaction["count"], 1);
    assert_eq!(b.named("message_deleted")[0]["target"], 1);
    assert_eq!(
        svc.participating(c.id, &alice)
            .await
            .expect("load")
            .last_seq,
        4
    );
}

#[tokio::test]
async fn only_the_sender_edits_and_the_creator_or_a_departments_agent_may_delete_anything() {
    let svc = service();
    let (alice, bob, carol) = (who("alice"), who("bob"), who("carol"));
    let c = group(&svc, &alice, &["bob", "carol"]).await;
    svc.send(&bob, text(&c, "m1", "bob's")).await.expect("send");
    svc.send(&carol, text(&c, "m2", "carol's"))
        .await
        .expect("send");
    let e = svc
        .change(&alice, edit(&c, 1, "e1", "not hers"))
        .await
        .expect_err("not the sender");
    assert_eq!(e.code(), "forbidden");
    let e = svc
        .change(&carol, delete(&c, 1))
        .await
        .expect_err("a plain member may not delete others'");
    assert_eq!(e.code(), "forbidden");
    svc.change(&alice, delete(&c, 1))
        .await
        .expect("the creator moderates");
    let e = svc
        .change(&bob, edit(&c, 1, "e2", "resurrect"))
        .await
        .expect_err("deleted");
    assert_eq!(e.code(), "conflict", "{e}");
    let e = svc
        .change(&bob, edit(&c, 99, "e3", "nothing there"))
        .await
        .expect_err("no such message");
    assert_eq!(e.code(), "not_found");
    let e = svc
        .change(&who("mallory"), delete(&c, 2))
        .await
        .expect_err("a stranger");
    assert_eq!(e.code(), "forbidden");
    let e = svc
        .change(&bob, react(&c, 2, "<script>", true))
        .await
        .expect_err("not an emoji");
    assert_eq!(e.code(), "invalid");
    let e = svc
        .change(&carol, edit(&c, 2, "e4", "  "))
        .await
        .expect_err("empty");
    assert_eq!(e.code(), "invalid");

    // A support conversation: agents of its department moderate it, others do not.
    let visitor = who("visitor");
    let s = svc
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
        .expect("support");
    svc.send(&visitor, text(&s, "v1", "help"))
        .await
        .expect("send");
    let billing = agent("agent-1", "billing");
    let other = agent("agent-2", "sales");
    let (billing_conn, _) = connect(&svc, &billing).await;
    svc.join(billing_conn, &billing, s.id)
        .await
        .expect("an agent of the department joins");
    svc.send(&billing, text(&s, "a1", "hello"))
        .await
        .expect("send");
    let e = svc
        .change(&other, delete(&s, 1))
        .await
        .expect_err("another department's agent is a stranger");
    assert_eq!(e.code(), "forbidden");
    svc.change(&billing, delete(&s, 1))
        .await
        .expect("an agent of the department deletes");
    svc.change(&visitor, delete(&s, 2))
        .await
        .expect("the creator moderates their conversation too");
}

#[tokio::test]
async fn history_returns_the_latest_state_and_sync_the_entries_after_the_cursor() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    svc.send(&alice, text(&c, "m1", "one")).await.expect("send"); // 1
    svc.send(&alice, text(&c, "m2", "two")).await.expect("send"); // 2
    svc.change(&alice, edit(&c, 1, "e1", "one, edited"))
        .await
        .expect("edit"); // 3
    svc.change(&bob, react(&c, 1, "🎉", true))
        .await
        .expect("react"); // 4
    svc.change(&alice, react(&c, 1, "🎉", true))
        .await
        .expect("react"); // 5
    svc.change(&alice, edit(&c, 2, "e2", "secret two"))
        .await
        .expect("edit"); // 6
    svc.change(&alice, delete(&c, 2)).await.expect("delete"); // 7
    let page = svc.history(&bob, c.id, None, None).await.expect("history");
    assert_eq!(page.messages.len(), 2, "changes are not messages");
    let one = &page.messages[0];
    assert_eq!(one.content, "one, edited");
    assert_eq!(one.version, 1);
    assert!(one.edited_at.is_some());
    assert_eq!(one.reactions.len(), 1);
    assert_eq!(one.reactions[0].emoji, "🎉");
    assert_eq!(one.reactions[0].count, 2);
    assert!(one.reactions[0].me);
    let two = &page.messages[1];
    assert!(two.deleted);
    assert_eq!(two.content, "");
    let wire = serde_json::to_value(two).expect("json");
    assert!(
        wire.get("content").is_none(),
        "no content on the wire: {wire}"
    );
    assert_eq!(wire["deleted"], true);

    let synced = svc.sync(&bob, vec![(c.id, 2)]).await.expect("sync");
    assert!(synced.messages.is_empty());
    assert_eq!(
        synced.changes.iter().map(Change::seq).collect::<Vec<_>>(),
        vec![3, 4, 5, 6, 7]
    );
    for change in &synced.changes {
        if let Change::MessageUpdated(e) = change
            && e.target == 2
        {
            assert_eq!(e.content, None, "the deleted message's edit is erased");
        }
    }
    let wire = serde_json::to_string(&synced.changes).expect("json");
    assert!(!wire.contains("secret"), "{wire}");
    assert!(wire.contains("\"type\":\"message_updated\""), "{wire}");
    assert_eq!(synced.counts.len(), 1);
    assert_eq!(
        synced.counts[0].unread, 1,
        "bob has one unread message left"
    );

    // A budget smaller than the log: truncated, and the rest follows from the last seq.
    let generous = Quota {
        per_second: 1000,
        burst: 1000,
    };
    let small = ChatService::new(
        svc.store.clone(),
        Arc::new(LocalBus::new()),
        Arc::new(MemoryPresence::new()),
        Arc::new(MemoryLimits::new(LimitSettings {
            user_messages: generous,
            connection_events: generous,
            user_joins: generous,
            address_connects: generous,
            user_requests: generous,
        })),
        ChatSettings {
            max_sync: 3,
            ..ChatSettings::default()
        },
    );
    let first = small.sync(&bob, vec![(c.id, 0)]).await.expect("sync");
    assert!(first.truncated);
    assert_eq!(first.messages.len() + first.changes.len(), 3);
    assert_eq!(
        first.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        first.changes.iter().map(Change::seq).collect::<Vec<_>>(),
        vec![3]
    );
}

#[tokio::test]
async fn a_resume_replays_messages_as_they_are_and_the_change_entries_after_the_cursor() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    svc.send(&alice, text(&c, "m1", "one")).await.expect("send"); // 1
    svc.send(&alice, text(&c, "m2", "two")).await.expect("send"); // 2
    svc.change(&alice, edit(&c, 1, "e1", "one*"))
        .await
        .expect("edit"); // 3
    svc.change(&alice, delete(&c, 2)).await.expect("delete"); // 4
    svc.change(&bob, react(&c, 1, "👀", true))
        .await
        .expect("react"); // 5
    let rec = Arc::new(Recorder::default());
    svc.connect_resuming(&bob, rec.clone(), Some(vec![(c.id, 1)]))
        .await
        .expect("connect");
    assert_eq!(
        log_events(&rec),
        vec![
            ("new_message".to_owned(), 2),
            ("message_updated".to_owned(), 3),
            ("message_deleted".to_owned(), 4),
            ("reaction_updated".to_owned(), 5),
        ]
    );
    let replayed = &rec.named("new_message")[0];
    assert_eq!(replayed["deleted"], true);
    assert!(replayed.get("content").is_none(), "{replayed}");
    // Live entries after the replay arrive once.
    svc.change(&alice, edit(&c, 1, "e2", "one**"))
        .await
        .expect("edit");
    assert_eq!(
        log_events(&rec).last(),
        Some(&("message_updated".to_owned(), 6))
    );
    assert_eq!(log_events(&rec).len(), 5);
}

#[tokio::test]
async fn a_reply_carries_a_quote_and_mentions_must_be_members() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let long = "x".repeat(300);
    svc.send(&alice, text(&c, "m1", &long)).await.expect("send");
    let reply = svc
        .send(
            &bob,
            Send {
                reply_to: Some(1),
                mentions: vec!["alice".into(), "alice".into()],
                ..text(&c, "m2", "answer")
            },
        )
        .await
        .expect("reply");
    let quote = reply.message.reply_to.clone().expect("a quote");
    assert_eq!(quote.seq, 1);
    assert_eq!(quote.sender_id, "alice");
    let text_of = quote.quote.expect("quoted text");
    assert!(
        text_of.ends_with('…') && text_of.chars().count() == 121,
        "{text_of}"
    );
    assert_eq!(
        reply.message.mentions,
        vec!["alice".to_owned()],
        "each once"
    );
    let e = svc
        .send(
            &bob,
            Send {
                mentions: vec!["mallory".into()],
                ..text(&c, "m3", "hi")
            },
        )
        .await
        .expect_err("not a member");
    assert_eq!(e.code(), "invalid");
    let e = svc
        .send(
            &bob,
            Send {
                reply_to: Some(42),
                ..text(&c, "m4", "hi")
            },
        )
        .await
        .expect_err("nothing to reply to");
    assert_eq!(e.code(), "invalid");
    let listed = svc.conversations(&alice).await.expect("list");
    assert_eq!((listed[0].unread, listed[0].mentions), (1, 1));
    svc.change(&alice, delete(&c, 1)).await.expect("delete");
    let page = svc.history(&bob, c.id, None, None).await.expect("history");
    let quote = page.messages[1].reply_to.clone().expect("still a reply");
    assert!(quote.deleted && quote.quote.is_none(), "{quote:?}");
}

#[tokio::test]
async fn each_recipients_delivery_receipt_reaches_the_senders_devices_once() {
    let svc = service();
    let (alice, bob, carol) = (who("alice"), who("bob"), who("carol"));
    let c = group(&svc, &alice, &["bob", "carol"]).await;
    let (alice_conn, a1) = connect(&svc, &alice).await;
    let (_, a2) = connect(&svc, &alice).await;
    svc.send(&alice, text(&c, "m1", "one")).await.expect("send");
    svc.send(&alice, text(&c, "m2", "two")).await.expect("send");
    svc.mark_received(&bob, c.id, 2).await.expect("received");
    svc.mark_received(&bob, c.id, 2).await.expect("again");
    svc.mark_received(&bob, c.id, 1).await.expect("lower");
    svc.mark_received(&carol, c.id, 1).await.expect("received");
    for rec in [&a1, &a2] {
        let receipts = rec.named("message_delivered_to");
        assert_eq!(receipts.len(), 2, "{receipts:?}");
        assert_eq!(receipts[0]["userId"], "bob");
        assert_eq!(receipts[0]["seq"], 2);
        assert_eq!(receipts[1]["userId"], "carol");
        assert_eq!(receipts[1]["seq"], 1);
    }
    let e = svc
        .mark_received(&bob, c.id, 9)
        .await
        .expect_err("past the end");
    assert_eq!(e.code(), "invalid");
    let members = svc
        .join_with(alice_conn, &alice, c.id, true)
        .await
        .expect("join")
        .members
        .expect("asked for");
    let bob_member = members.iter().find(|m| m.user_id == "bob").expect("bob");
    assert_eq!(
        bob_member.last_received_seq, 2,
        "stored: the sender reads it after a reconnect"
    );
}

/// A small deterministic generator, so the property run is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Unread and mention counts, recounted from the log as history and sync return it.
async fn recount(svc: &ChatService, user: &Identity, c: &Conversation, read: i64) -> (i64, i64) {
    let synced = svc.sync(user, vec![(c.id, 0)]).await.expect("sync");
    let mut unread = 0;
    let mut mentions = 0;
    for m in synced.messages {
        if m.seq > read && m.sender_id != user.user_id && !m.deleted {
            unread += 1;
            if m.mentions.contains(&user.user_id) {
                mentions += 1;
            }
        }
    }
    (unread, mentions)
}

async fn counts_equal_a_recount_after_a_random_mix(store: Arc<dyn crate::store::Store>, seed: u64) {
    let svc = service_with(store, Arc::new(LocalBus::new()));
    let users = [who("u0"), who("u1"), who("u2")];
    let c = group(&svc, &users[0], &["u1", "u2"]).await;
    let mut rng = Rng(seed);
    let mut messages: Vec<(i64, usize)> = Vec::new();
    for step in 0..60 {
        let actor = rng.below(3) as usize;
        match rng.below(10) {
            0..=4 => {
                let mentions = (0..3)
                    .filter(|_| rng.below(3) == 0)
                    .map(|u| format!("u{u}"))
                    .collect();
                let sent = svc
                    .send(
                        &users[actor],
                        Send {
                            mentions,
                            ..text(&c, &format!("s{step}"), "hey")
                        },
                    )
                    .await
                    .expect("send");
                messages.push((sent.message.seq, actor));
            }
            5 | 6 => {
                let last = svc
                    .participating(c.id, &users[actor])
                    .await
                    .expect("c")
                    .last_seq;
                let seq = rng.below(last as u64 + 1) as i64;
                svc.mark_read(&users[actor], c.id, seq).await.expect("read");
            }
            7 if !messages.is_empty() => {
                let (seq, sender) = messages[rng.below(messages.len() as u64) as usize];
                svc.change(&users[sender], delete(&c, seq))
                    .await
                    .expect("delete");
            }
            8 if !messages.is_empty() => {
                let (seq, sender) = messages[rng.below(messages.len() as u64) as usize];
                let _ = svc
                    .change(&users[sender], edit(&c, seq, &format!("e{step}"), "edited"))
                    .await;
            }
            _ if !messages.is_empty() => {
                let (seq, _) = messages[rng.below(messages.len() as u64) as usize];
                let _ = svc
                    .change(&users[actor], react(&c, seq, "👍", rng.below(2) == 0))
                    .await;
            }
            _ => {}
        }
        for user in &users {
            let listed = svc.conversations(user).await.expect("list");
            let summary = &listed[0];
            let expected = recount(&svc, user, &c, summary.last_read_seq).await;
            assert_eq!(
                (summary.unread, summary.mentions),
                expected,
                "seed {seed}, step {step}, user {}",
                user.user_id
            );
        }
    }
}

#[tokio::test]
async fn unread_and_mention_counts_equal_a_recount_after_random_mixes_on_the_memory_store() {
    for seed in 1..=20 {
        counts_equal_a_recount_after_a_random_mix(Arc::new(MemoryStore::default()), seed * 7919)
            .await;
    }
}

#[tokio::test]
async fn unread_and_mention_counts_equal_a_recount_after_random_mixes_on_sqlite() {
    for seed in 1..=5 {
        let store = crate::store::SqliteStore::in_memory()
            .await
            .expect("sqlite");
        counts_equal_a_recount_after_a_random_mix(Arc::new(store), seed * 104_729).await;
    }
}

#[test]
fn merging_the_log_interleaves_messages_and_changes_by_seq_with_a_cap_per_cursor() {
    let (one, two) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let message = |c, seq| Message {
        conversation_id: c,
        seq,
        ..Message::default()
    };
    let change = |c, seq| {
        Change::MessageDeleted(crate::chat::model::Deletion {
            conversation_id: c,
            seq,
            target: 1,
            user_id: "u".into(),
            deleted_at: chrono::Utc::now(),
        })
    };
    let merged = super::super::messages::merge_log(
        &[(one, 0), (two, 0)],
        vec![message(one, 1), message(one, 3), message(two, 1)],
        vec![
            change(one, 2),
            change(one, 4),
            change(two, 2),
            change(two, 3),
        ],
        3,
    );
    assert_eq!(
        merged
            .iter()
            .map(|e| (
                e.conversation_id() == one,
                e.seq(),
                matches!(e, LogEntry::Message(_))
            ))
            .collect::<Vec<_>>(),
        vec![
            (true, 1, true),
            (true, 2, false),
            (true, 3, true),
            (false, 1, true),
            (false, 2, false),
            (false, 3, false),
        ]
    );
}
