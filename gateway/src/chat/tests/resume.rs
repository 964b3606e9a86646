//! Server-side subscriptions and resume, driven through `ChatService` with recording connections.

use super::*;

fn resuming_service(max_resume: u32) -> Arc<ChatService> {
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
        ChatSettings {
            max_resume,
            ..ChatSettings::default()
        },
    )
}

fn seqs(rec: &Recorder, c: &Conversation) -> Vec<i64> {
    rec.named("new_message")
        .iter()
        .filter(|m| m["conversationId"] == c.id.to_string())
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn a_connection_receives_its_conversations_from_connect_on_without_joining() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (_, b) = connect(&svc, &bob).await;
    svc.send(&alice, text(&c, "m1", "hi")).await.expect("send");
    assert_eq!(seqs(&b, &c), vec![1]);
}

#[tokio::test]
async fn a_conversation_created_later_attaches_the_members_connections_by_itself() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let (_, b) = connect(&svc, &bob).await;
    let c = group(&svc, &alice, &["bob"]).await;
    assert_eq!(b.named("conversation_added").len(), 1);
    svc.send(&alice, text(&c, "m1", "hi")).await.expect("send");
    assert_eq!(seqs(&b, &c), vec![1], "delivered with no join");
    // Removed: detached again.
    svc.remove_member(&alice, c.id, "bob")
        .await
        .expect("remove");
    svc.send(&alice, text(&c, "m2", "after"))
        .await
        .expect("send");
    assert_eq!(seqs(&b, &c), vec![1]);
}

#[tokio::test]
async fn resume_replays_what_was_missed_in_seq_order_and_caps_it_with_resume_truncated() {
    let svc = resuming_service(3);
    let (alice, bob) = (who("alice"), who("bob"));
    let small = group(&svc, &alice, &["bob"]).await;
    let big = group(&svc, &alice, &["bob"]).await;
    let elsewhere = group(&svc, &alice, &[]).await;
    for i in 1..=2 {
        svc.send(&alice, text(&small, &format!("s{i}"), "x"))
            .await
            .expect("send");
    }
    for i in 1..=6 {
        svc.send(&alice, text(&big, &format!("b{i}"), "x"))
            .await
            .expect("send");
    }
    svc.send(&alice, text(&elsewhere, "e1", "x"))
        .await
        .expect("send");
    let rec = Arc::new(Recorder::default());
    // A cursor for a conversation bob is not in is passed over, not an error.
    svc.connect_resuming(
        &bob,
        rec.clone(),
        Some(vec![(small.id, 1), (big.id, 1), (elsewhere.id, 0)]),
    )
    .await
    .expect("connect");
    assert_eq!(seqs(&rec, &small), vec![2]);
    assert_eq!(seqs(&rec, &big), vec![2, 3, 4], "at most max_resume");
    assert_eq!(seqs(&rec, &elsewhere), Vec::<i64>::new());
    let truncated = rec.named("resume_truncated");
    assert_eq!(
        truncated,
        vec![serde_json::json!({"conversationId": big.id, "afterSeq": 4})]
    );
    // Live traffic follows the replay.
    svc.send(&alice, text(&small, "s3", "x"))
        .await
        .expect("send");
    assert_eq!(seqs(&rec, &small), vec![2, 3]);
}

#[tokio::test]
async fn live_events_held_during_a_replay_follow_it_without_the_messages_it_replayed() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let rec = Arc::new(Recorder::default());
    // Registered (so held) but not yet connected: what is sent now waits for the replay.
    let (conn, change) = svc.register(&bob, rec.clone());
    let joined = svc.hub().join(conn, c.id).expect("open");
    svc.subscribe(joined).await;
    for i in 1..=3 {
        svc.send(&alice, text(&c, &format!("m{i}"), "x"))
            .await
            .expect("send");
    }
    assert!(rec.names().is_empty(), "held: {:?}", rec.names());
    svc.connected_resuming(&bob, conn, change, Some(vec![(c.id, 0)]))
        .await
        .expect("connected");
    assert_eq!(seqs(&rec, &c), vec![1, 2, 3], "each once, in order");
    svc.send(&alice, text(&c, "m4", "x")).await.expect("send");
    assert_eq!(seqs(&rec, &c), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_live_copy_arriving_after_the_replay_read_it_is_dropped_too() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let mut sent = Vec::new();
    for i in 1..=3 {
        sent.push(
            svc.send(&alice, text(&c, &format!("m{i}"), "x"))
                .await
                .expect("send")
                .message,
        );
    }
    let rec = Arc::new(Recorder::default());
    let (conn, change) = svc.register(&bob, rec.clone());
    svc.connected_resuming(&bob, conn, change, Some(vec![(c.id, 1)]))
        .await
        .expect("connected");
    assert_eq!(seqs(&rec, &c), vec![2, 3], "the replay");
    // Message 3 was committed before the replay read it, but its bus copy reaches this node
    // only now (another node published it late).
    let route = crate::chat::event::Route::Conversation {
        id: c.id,
        also_users: vec![],
    };
    let late = Arc::new(crate::chat::event::Event::NewMessage(sent[2].clone()).encode());
    assert_eq!(svc.hub().deliver(&route, &late), 1);
    svc.send(&alice, text(&c, "m4", "x")).await.expect("send");
    assert_eq!(seqs(&rec, &c), vec![2, 3, 4], "each once, in order");
}

#[tokio::test]
async fn a_connection_still_attaching_is_told_of_a_drain_at_once_and_its_messages_wait() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let rec = Arc::new(Recorder::default());
    let (conn, change) = svc.register(&bob, rec.clone());
    let joined = svc.hub().join(conn, c.id).expect("open");
    svc.subscribe(joined).await;
    svc.send(&alice, text(&c, "m1", "x")).await.expect("send");
    let drain = crate::drain::Drain::new(Duration::from_millis(200));
    let running = tokio::spawn(crate::drain::run(drain.clone(), svc.clone()));
    assert!(drain.begin("test"));
    for _ in 0..100 {
        if !rec.named("server_draining").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        rec.names(),
        vec!["server_draining"],
        "the notice passes the gate, the message waits"
    );
    svc.connected_resuming(&bob, conn, change, Some(vec![(c.id, 0)]))
        .await
        .expect("connected");
    assert_eq!(seqs(&rec, &c), vec![1]);
    running.abort();
}

#[tokio::test]
async fn malformed_cursors_are_refused_with_a_reason() {
    let id = uuid::Uuid::now_v7();
    let e = resume_check(&vec![(id, 1), (id, 2)]).expect_err("twice");
    assert!(e.to_string().contains("twice"), "{e}");
    let e = resume_check(&vec![(id, -1)]).expect_err("negative");
    assert!(e.to_string().contains("negative"), "{e}");
    let many: Cursors = (0..1001).map(|_| (uuid::Uuid::now_v7(), 0)).collect();
    assert!(resume_check(&many).is_err());
}

/// A local bus whose connection epoch a test moves, as a broker reconnect does.
#[derive(Default)]
struct EpochBus {
    inner: LocalBus,
    epoch: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl crate::bus::Bus for EpochBus {
    fn attach(&self, deliver: crate::bus::Deliver) {
        self.inner.attach(deliver);
    }
    async fn publish(
        &self,
        envelope: Arc<crate::chat::event::Envelope>,
    ) -> Result<(), crate::bus::BusError> {
        self.inner.publish(envelope).await
    }
    async fn subscribe(
        &self,
        topic: crate::chat::event::Topic,
    ) -> Result<(), crate::bus::BusError> {
        self.inner.subscribe(topic).await
    }
    async fn unsubscribe(
        &self,
        topic: crate::chat::event::Topic,
    ) -> Result<(), crate::bus::BusError> {
        self.inner.unsubscribe(topic).await
    }
    async fn ready(&self) -> bool {
        self.inner.ready().await
    }
    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn sends_by_members_read_membership_from_the_node_state_until_its_version_moves() {
    let bus = Arc::new(EpochBus::default());
    let svc = service_on(bus.clone());
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (_, b) = connect(&svc, &bob).await;
    svc.send(&bob, text(&c, "b1", "x")).await.expect("member");
    assert_eq!(svc.conversations.len(), 1, "held while its topic is bound");
    // A removal this node never heard of (its event still on the way, or lost with the broker
    // connection): the cached state still says member.
    assert_eq!(
        svc.store()
            .remove_member(c.id, "bob")
            .await
            .expect("remove"),
        Some(1)
    );
    svc.send(&bob, text(&c, "b2", "x"))
        .await
        .expect("from the cache: no store read before the commit");
    // The commit saw the removal's membership version: the entry went, and the room was checked
    // against the store before b2 was delivered here.
    assert_eq!(svc.conversations.len(), 0);
    assert_eq!(seqs(&b, &c), vec![1], "nothing committed after the removal");
    let refused = svc
        .send(&bob, text(&c, "b3", "x"))
        .await
        .expect_err("reloaded");
    assert_eq!(refused.code(), "forbidden");
}

#[tokio::test]
async fn a_bus_reconnect_checks_the_rooms_held_here_against_the_store() {
    let bus = Arc::new(EpochBus::default());
    let svc = service_on(bus.clone());
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &["bob"]).await;
    let (b_conn, _) = connect(&svc, &bob).await;
    assert!(svc.hub.is_in_room(b_conn, c.id), "attached at connect");
    // A removal whose event was lost with the broker connection, and no send since.
    svc.store()
        .remove_member(c.id, "bob")
        .await
        .expect("remove");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        svc.hub.is_in_room(b_conn, c.id),
        "the bus did not reconnect"
    );
    bus.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !svc.hub.is_in_room(b_conn, c.id),
        "the room check after the reconnect took bob out"
    );
}

#[tokio::test]
async fn membership_events_keep_the_node_state_exact() {
    let svc = service();
    let (alice, bob) = (who("alice"), who("bob"));
    let c = group(&svc, &alice, &[]).await;
    let (_, a) = connect(&svc, &alice).await;
    svc.send(&alice, text(&c, "a1", "x")).await.expect("send");
    assert_eq!(svc.conversations.len(), 1);
    svc.add_member(&alice, c.id, "bob").await.expect("add");
    let (_, b) = connect(&svc, &bob).await;
    svc.send(&bob, text(&c, "b1", "x"))
        .await
        .expect("the added member may send at once");
    svc.remove_member(&alice, c.id, "bob")
        .await
        .expect("remove");
    let refused = svc
        .send(&bob, text(&c, "b2", "x"))
        .await
        .expect_err("removed");
    assert_eq!(refused.code(), "forbidden");
    svc.send(&alice, text(&c, "a2", "x")).await.expect("send");
    assert_eq!(seqs(&a, &c), vec![1, 2, 3]);
    assert_eq!(seqs(&b, &c), vec![2], "nothing after the removal");
    // The cached last seq follows commits, for join's lastSeq.
    let (conn, _) = connect(&svc, &alice).await;
    let joined = svc.join(conn, &alice, c.id).await.expect("join");
    assert_eq!(joined.last_seq, 3);
}

#[tokio::test]
async fn sends_joins_and_typing_by_members_of_a_held_conversation_make_no_store_read() {
    let store = Arc::new(MemoryStore::default());
    let svc = service_with(store.clone(), Arc::new(LocalBus::new()));
    let (alice, bob, visitor) = (who("alice"), who("bob"), who("visitor"));
    let ann = agent("ann", "billing");
    let inbox = Arc::new(Recorder::default());
    svc.connect_agent(&ann, inbox.clone()).await.expect("inbox");
    let c = group(&svc, &alice, &["bob"]).await;
    let support = svc
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
    let (_, a) = connect(&svc, &alice).await;
    let (bob_conn, _) = connect(&svc, &bob).await;
    let (_, v) = connect(&svc, &visitor).await;
    // The first use of each conversation loads its state; from then on it is held.
    svc.send(&alice, text(&c, "a1", "load"))
        .await
        .expect("send");
    svc.send(&visitor, text(&support, "v1", "load"))
        .await
        .expect("send");
    let before = store.reads();
    svc.send(&bob, text(&c, "b1", "hot")).await.expect("send");
    svc.send(&visitor, text(&support, "v2", "hot"))
        .await
        .expect("support send");
    let joined = svc
        .join_with(bob_conn, &bob, c.id, false)
        .await
        .expect("member join");
    svc.typing_start(&bob, c.id).await.expect("typing");
    svc.typing_stop(&bob, c.id).await.expect("typing stop");
    assert_eq!(store.reads(), before, "no store read on the hot paths");
    assert_eq!(joined.last_seq, 2);
    assert!(joined.members.is_none(), "the member list only on request");
    assert_eq!(seqs(&a, &c), vec![1, 2]);
    assert!(a.names().contains(&"user_typing".to_owned()));
    assert_eq!(seqs(&v, &support), vec![1, 2]);
    let inboxed: Vec<Value> = inbox
        .named("new_message")
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(
        inboxed,
        vec!["load", "hot"],
        "the department from the state"
    );
    // Asking for the member list is a read, and a non-held conversation still loads.
    svc.join_with(bob_conn, &bob, c.id, true)
        .await
        .expect("join with members");
    assert_eq!(store.reads(), before + 1);
}

#[tokio::test]
async fn clients_resuming_a_held_room_share_one_read_of_its_log_until_it_moves() {
    let store = Arc::new(MemoryStore::default());
    let svc = service_with(store.clone(), Arc::new(LocalBus::new()));
    let alice = who("alice");
    let c = group(&svc, &alice, &["u1", "u2", "u3", "u4", "u5"]).await;
    let (_, _a) = connect(&svc, &alice).await;
    for i in 1..=3 {
        svc.send(&alice, text(&c, &format!("a{i}"), "x"))
            .await
            .expect("send");
    }
    // What a connect reads besides the log: one without cursors.
    let before = store.reads();
    let rec = Arc::new(Recorder::default());
    svc.connect_resuming(&who("u1"), rec, None)
        .await
        .expect("connect");
    let connect_reads = store.reads() - before;
    let resume = |user: &str, after: i64| {
        let svc = svc.clone();
        let store = store.clone();
        let user = who(user);
        let c = c.clone();
        async move {
            let rec = Arc::new(Recorder::default());
            let before = store.reads();
            svc.connect_resuming(&user, rec.clone(), Some(vec![(c.id, after)]))
                .await
                .expect("connect");
            (store.reads() - before, seqs(&rec, &c))
        }
    };
    let (reads, got) = resume("u2", 1).await;
    assert_eq!(got, vec![2, 3]);
    assert_eq!(
        reads,
        connect_reads + 2,
        "the log read: messages and changes"
    );
    // The same cursor, and a later one, from that read.
    assert_eq!(resume("u3", 1).await, (connect_reads, vec![2, 3]));
    assert_eq!(resume("u4", 2).await, (connect_reads, vec![3]));
    // A new message grows the reads that end just below it: still no read.
    svc.send(&alice, text(&c, "a4", "x")).await.expect("send");
    assert_eq!(resume("u5", 1).await, (connect_reads, vec![2, 3, 4]));
    // A change alters an earlier message, which the reads hold as it was: the log is read
    // again, and the message comes as it is now.
    svc.change(
        &alice,
        ChangeRequest::Edit {
            conversation_id: c.id,
            target: 2,
            content: "edited".into(),
            client_msg_id: "e1".into(),
        },
    )
    .await
    .expect("edit");
    let rec = Arc::new(Recorder::default());
    let before = store.reads();
    svc.connect_resuming(&who("u1"), rec.clone(), Some(vec![(c.id, 1)]))
        .await
        .expect("connect");
    assert_eq!(store.reads() - before, connect_reads + 2);
    let replayed: Vec<(String, Value)> = rec
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter(|(n, _)| n == "new_message" || n == "message_updated")
        .cloned()
        .collect();
    assert_eq!(replayed[0].1["content"], "edited", "{replayed:?}");
    assert_eq!(
        replayed
            .iter()
            .map(|(n, p)| (n.as_str(), p["seq"].as_i64()))
            .collect::<Vec<_>>(),
        vec![
            ("new_message", Some(2)),
            ("new_message", Some(3)),
            ("new_message", Some(4)),
            ("message_updated", Some(5)),
        ]
    );
}

#[tokio::test]
async fn a_storm_of_resumes_of_one_room_reads_its_log_once_and_each_gets_all_it_missed() {
    let store = Arc::new(MemoryStore::default());
    let svc = service_with(store.clone(), Arc::new(LocalBus::new()));
    let alice = who("alice");
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let c = group(&svc, &alice, &names).await;
    let (_, _a) = connect(&svc, &alice).await;
    for i in 1..=4 {
        svc.send(&alice, text(&c, &format!("a{i}"), "x"))
            .await
            .expect("send");
    }
    store
        .yield_in_log_reads
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let before = store.reads();
    let storm = users.iter().map(|u| {
        let svc = svc.clone();
        let c = c.clone();
        let user = who(u);
        async move {
            let rec = Arc::new(Recorder::default());
            svc.connect_resuming(&user, rec.clone(), Some(vec![(c.id, 1)]))
                .await
                .expect("connect");
            seqs(&rec, &c)
        }
    });
    let got = futures::future::join_all(storm).await;
    for seqs in &got {
        assert_eq!(seqs, &vec![2, 3, 4]);
    }
    // Each connect lists its user's conversations (one read); the log is read once.
    assert_eq!(store.reads() - before, users.len() + 2);
}
