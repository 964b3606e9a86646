//! The contract every `Store` must meet, as one function over `&dyn Store`.
//! Each implementation's tests call [`run`]; user ids are prefixed so a shared database works.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Inserted, NewConversation, NewMessage, Store, StoreError};
use crate::chat::model::{
    Attachment, ConversationKind, MemberRole, MessageAttachment, MessageKind,
};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn text(conversation: uuid::Uuid, sender: &str, client_msg_id: &str, content: &str) -> NewMessage {
    NewMessage {
        conversation_id: conversation,
        sender_id: sender.to_owned(),
        sender_name: format!("{sender} name"),
        client_msg_id: client_msg_id.to_owned(),
        kind: MessageKind::Text,
        content: content.to_owned(),
        attachment: None,
    }
}

pub async fn run(store: &dyn Store) {
    store.ping().await.expect("ping answers");
    conversations_and_members(store).await;
    messages_get_gap_free_sequence_numbers(store).await;
    retry_with_same_client_msg_id_returns_original_message(store).await;
    same_client_msg_id_in_another_conversation_is_another_message(store).await;
    history_pages_backwards_and_sync_reads_forwards(store).await;
    read_watermark_only_rises(store).await;
    co_members_lists_everyone_sharing_a_conversation(store).await;
    missing_conversation_is_reported(store).await;
    sends_queued_together_are_answered_each_on_its_own(store).await;
    messages_after_each_reads_every_cursor_with_its_own_cap(store).await;
    attachments_are_recorded_once_per_retry_key_and_messages_carry_them(store).await;
    // The well-known ids used by the reopen test of the file store.
    let alice = "contract-alice";
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Open,
            title: Some("contract lobby".into()),
            department_id: None,
            members: vec![(alice.into(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    store
        .insert_message(text(c.id, alice, &unique("cm"), "persisted"))
        .await
        .expect("insert");
}

async fn attachments_are_recorded_once_per_retry_key_and_messages_carry_them(store: &dyn Store) {
    let alice = unique("alice");
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Group,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    let photo = Attachment {
        id: uuid::Uuid::now_v7(),
        conversation_id: c.id,
        uploader_id: alice.clone(),
        name: "beach.png".into(),
        content_type: "image/png".into(),
        size: 12_345,
        sha256: "ab".repeat(32),
        width: Some(640),
        height: Some(480),
        created_at: crate::chat::model::now(),
    };
    let recorded = store
        .insert_attachment(photo.clone())
        .await
        .expect("record");
    assert_eq!(recorded, photo);
    assert_eq!(
        store.attachment(photo.id).await.expect("load"),
        Some(photo.clone())
    );
    // A retry (same conversation, uploader, bytes and name) under a new id finds the first.
    let retry = Attachment {
        id: uuid::Uuid::now_v7(),
        created_at: crate::chat::model::now(),
        ..photo.clone()
    };
    assert_eq!(
        store.insert_attachment(retry.clone()).await.expect("retry"),
        photo
    );
    assert_eq!(store.attachment(retry.id).await.expect("load"), None);
    // The same bytes under another name are another record; a file has no dimensions.
    let notes = Attachment {
        id: uuid::Uuid::now_v7(),
        name: "notes.txt".into(),
        content_type: "text/plain".into(),
        width: None,
        height: None,
        ..photo.clone()
    };
    assert_eq!(
        store
            .insert_attachment(notes.clone())
            .await
            .expect("record"),
        notes
    );
    assert_eq!(store.attachment(notes.id).await.expect("load"), Some(notes));
    assert!(matches!(
        store
            .insert_attachment(Attachment {
                id: uuid::Uuid::now_v7(),
                conversation_id: uuid::Uuid::now_v7(),
                ..photo.clone()
            })
            .await,
        Err(StoreError::NoSuchConversation(_))
    ));
    // A message carries its attachment through insert, retry, history and sync.
    let reference = MessageAttachment::from(&photo);
    let sent = store
        .insert_message(NewMessage {
            kind: MessageKind::Image,
            content: String::new(),
            attachment: Some(reference.clone()),
            ..text(c.id, &alice, "photo-1", "")
        })
        .await
        .expect("insert");
    assert_eq!(sent.message().attachment.as_ref(), Some(&reference));
    let again = store
        .insert_message(NewMessage {
            kind: MessageKind::Image,
            content: String::new(),
            attachment: Some(reference.clone()),
            ..text(c.id, &alice, "photo-1", "")
        })
        .await
        .expect("retry");
    assert!(matches!(again, Inserted::Existing(_)));
    assert_eq!(again.message().attachment.as_ref(), Some(&reference));
    store
        .insert_message(text(c.id, &alice, "plain-1", "no attachment"))
        .await
        .expect("insert");
    let history = store
        .messages_before(c.id, None, 10)
        .await
        .expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].attachment.as_ref(), Some(&reference));
    assert_eq!(history[0].kind, MessageKind::Image);
    assert_eq!(history[1].attachment, None);
    let synced = store.messages_after(c.id, 0, 10).await.expect("sync");
    assert_eq!(synced[0].attachment.as_ref(), Some(&reference));
    let each = store
        .messages_after_each(&[(c.id, 0)], 10)
        .await
        .expect("each");
    assert_eq!(each[0].attachment.as_ref(), Some(&reference));
}

pub async fn run_concurrency(store: Arc<dyn Store>) {
    concurrent_senders_get_distinct_gap_free_seqs(store).await;
}

async fn conversations_and_members(store: &dyn Store) {
    let alice = unique("alice");
    let bob = unique("bob");
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Group,
            title: Some("Project".into()),
            department_id: None,
            members: vec![
                (alice.clone(), MemberRole::Owner),
                (bob.clone(), MemberRole::Member),
            ],
        })
        .await
        .expect("create group");
    assert_eq!(c.kind, ConversationKind::Group);
    assert_eq!(c.last_seq, 0);
    let loaded = store
        .conversation(c.id)
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(loaded.id, c.id);
    assert_eq!(loaded.title.as_deref(), Some("Project"));
    assert_eq!(loaded.kind, ConversationKind::Group);

    let members = store.members(c.id).await.expect("members");
    let ids: HashSet<_> = members.iter().map(|m| m.user_id.clone()).collect();
    assert_eq!(ids, HashSet::from([alice.clone(), bob.clone()]));
    let owner = store
        .member(c.id, &alice)
        .await
        .expect("member")
        .expect("alice is a member");
    assert_eq!(owner.role, MemberRole::Owner);
    assert_eq!(owner.last_read_seq, 0);

    let carol = unique("carol");
    assert!(store.member(c.id, &carol).await.expect("member").is_none());
    assert!(
        store
            .add_member(c.id, &carol, MemberRole::Member)
            .await
            .expect("add")
    );
    assert!(
        !store
            .add_member(c.id, &carol, MemberRole::Agent)
            .await
            .expect("add again")
    );
    let carol_member = store
        .member(c.id, &carol)
        .await
        .expect("member")
        .expect("carol");
    assert_eq!(
        carol_member.role,
        MemberRole::Member,
        "re-adding keeps the role"
    );

    let listed = store.conversations_of(&carol).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].conversation.id, c.id);

    assert!(store.remove_member(c.id, &carol).await.expect("remove"));
    assert!(
        !store
            .remove_member(c.id, &carol)
            .await
            .expect("remove again")
    );
    assert!(
        store
            .conversations_of(&carol)
            .await
            .expect("list")
            .is_empty()
    );
}

async fn messages_get_gap_free_sequence_numbers(store: &dyn Store) {
    let alice = unique("alice");
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Open,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    let other = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Open,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create other");
    for i in 1..=5 {
        let m = store
            .insert_message(text(c.id, &alice, &unique("m"), &format!("hello {i}")))
            .await
            .expect("insert");
        let Inserted::New(m) = m else {
            panic!("a fresh client id inserts")
        };
        assert_eq!(m.seq, i);
        assert_eq!(m.content, format!("hello {i}"));
        assert_eq!(m.sender_name, format!("{alice} name"));
    }
    let Inserted::New(first_other) = store
        .insert_message(text(other.id, &alice, &unique("m"), "elsewhere"))
        .await
        .expect("insert")
    else {
        panic!("fresh insert")
    };
    assert_eq!(first_other.seq, 1, "seq is per conversation");
    let c = store
        .conversation(c.id)
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(c.last_seq, 5);
}

async fn retry_with_same_client_msg_id_returns_original_message(store: &dyn Store) {
    let alice = unique("alice");
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Open,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    let key = unique("retry");
    let Inserted::New(first) = store
        .insert_message(text(c.id, &alice, &key, "once"))
        .await
        .expect("insert")
    else {
        panic!("first insert is new")
    };
    let again = store
        .insert_message(text(c.id, &alice, &key, "a different body"))
        .await
        .expect("retry");
    assert_eq!(again, Inserted::Existing(first.clone()));
    assert_eq!(again.message().content, "once");
    let c = store
        .conversation(c.id)
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(c.last_seq, 1, "a retry consumes no seq");
    // The same client id from another sender is a different message.
    let bob = unique("bob");
    let Inserted::New(bobs) = store
        .insert_message(text(c.id, &bob, &key, "bob's"))
        .await
        .expect("insert")
    else {
        panic!("another sender's key is independent")
    };
    assert_eq!(bobs.seq, 2);
}

/// A client that numbers its ids per conversation ("c-1" in each) sends two messages: the key is
/// `(conversation, sender, clientMsgId)`, so the second is stored, not answered with the first.
async fn same_client_msg_id_in_another_conversation_is_another_message(store: &dyn Store) {
    let alice = unique("alice");
    let mut ids = Vec::new();
    for title in ["first", "second"] {
        let c = store
            .create_conversation(NewConversation {
                kind: ConversationKind::Group,
                title: Some(title.into()),
                department_id: None,
                members: vec![(alice.clone(), MemberRole::Owner)],
            })
            .await
            .expect("create");
        ids.push(c.id);
    }
    let key = unique("c-1");
    let Inserted::New(first) = store
        .insert_message(text(ids[0], &alice, &key, "to the first"))
        .await
        .expect("insert")
    else {
        panic!("first insert is new")
    };
    let Inserted::New(second) = store
        .insert_message(text(ids[1], &alice, &key, "to the second"))
        .await
        .expect("insert")
    else {
        panic!("the same clientMsgId in another conversation is a new message")
    };
    assert_ne!(first.id, second.id);
    assert_eq!(second.conversation_id, ids[1]);
    assert_eq!(second.seq, 1);
    assert_eq!(second.content, "to the second");
    let stored = store.messages_after(ids[1], 0, 10).await.expect("read");
    assert_eq!(stored, vec![second.clone()]);
    // And a retry in each conversation still finds that conversation's own message.
    let again = store
        .insert_message(text(ids[1], &alice, &key, "retry"))
        .await
        .expect("retry");
    assert_eq!(again, Inserted::Existing(second));
    let again = store
        .insert_message(text(ids[0], &alice, &key, "retry"))
        .await
        .expect("retry");
    assert_eq!(again, Inserted::Existing(first));
}

async fn history_pages_backwards_and_sync_reads_forwards(store: &dyn Store) {
    let alice = unique("alice");
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Open,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    for i in 1..=12 {
        store
            .insert_message(text(c.id, &alice, &unique("h"), &format!("m{i}")))
            .await
            .expect("insert");
    }
    let latest = store.messages_before(c.id, None, 5).await.expect("history");
    assert_eq!(
        latest.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9, 10, 11, 12]
    );
    let older = store
        .messages_before(c.id, Some(8), 5)
        .await
        .expect("history");
    assert_eq!(
        older.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 4, 5, 6, 7]
    );
    let oldest = store
        .messages_before(c.id, Some(3), 5)
        .await
        .expect("history");
    assert_eq!(oldest.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(oldest[0].content, "m1");

    let after = store.messages_after(c.id, 9, 100).await.expect("sync");
    assert_eq!(
        after.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![10, 11, 12]
    );
    let capped = store.messages_after(c.id, 0, 4).await.expect("sync");
    assert_eq!(
        capped.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(
        store
            .messages_after(c.id, 12, 100)
            .await
            .expect("sync")
            .is_empty()
    );
}

async fn read_watermark_only_rises(store: &dyn Store) {
    let alice = unique("alice");
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Group,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    for _ in 0..4 {
        store
            .insert_message(text(c.id, &alice, &unique("r"), "x"))
            .await
            .expect("insert");
    }
    assert_eq!(
        store.mark_read(c.id, &alice, 3).await.expect("read"),
        Some(3)
    );
    assert_eq!(
        store.mark_read(c.id, &alice, 1).await.expect("read"),
        Some(3)
    );
    let listed = store.conversations_of(&alice).await.expect("list");
    assert_eq!(listed[0].last_read_seq, 3);
    assert_eq!(listed[0].unread, 1);
    assert_eq!(
        store
            .mark_read(c.id, &unique("stranger"), 2)
            .await
            .expect("read"),
        None
    );
}

async fn co_members_lists_everyone_sharing_a_conversation(store: &dyn Store) {
    let alice = unique("alice");
    let bob = unique("bob");
    let carol = unique("carol");
    let dave = unique("dave");
    for pair in [[&alice, &bob], [&alice, &carol], [&carol, &dave]] {
        store
            .create_conversation(NewConversation {
                kind: ConversationKind::Direct,
                title: None,
                department_id: None,
                members: vec![
                    (pair[0].clone(), MemberRole::Owner),
                    (pair[1].clone(), MemberRole::Member),
                ],
            })
            .await
            .expect("create");
    }
    let mut others = store.co_members(&alice).await.expect("co-members");
    others.sort();
    let mut expected = vec![bob, carol];
    expected.sort();
    assert_eq!(others, expected);
}

async fn missing_conversation_is_reported(store: &dyn Store) {
    let ghost = uuid::Uuid::now_v7();
    assert!(store.conversation(ghost).await.expect("load").is_none());
    assert!(
        store
            .add_member(ghost, "someone", MemberRole::Member)
            .await
            .is_err()
    );
    assert!(
        store
            .insert_message(text(ghost, "someone", &unique("g"), "x"))
            .await
            .is_err()
    );
    assert!(store.members(ghost).await.expect("members").is_empty());
}

async fn concurrent_senders_get_distinct_gap_free_seqs(store: Arc<dyn Store>) {
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Open,
            title: None,
            department_id: None,
            members: vec![],
        })
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for sender in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let m = store
                    .insert_message(text(
                        c.id,
                        &format!("s{sender}"),
                        &format!("{}-{i}", c.id),
                        "x",
                    ))
                    .await
                    .expect("insert");
                seqs.push(m.message().seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    assert_eq!(all, (1..=200).collect::<Vec<i64>>());
}

/// Sends queued at once, so a group-committing store takes them as one batch: fresh sends,
/// sends to a conversation that does not exist, and one clientMsgId sent ten times.
async fn sends_queued_together_are_answered_each_on_its_own(store: &dyn Store) {
    let (alice, bob) = (unique("alice"), unique("bob"));
    let c = store
        .create_conversation(NewConversation {
            kind: ConversationKind::Group,
            title: None,
            department_id: None,
            members: vec![(alice.clone(), MemberRole::Owner)],
        })
        .await
        .expect("create");
    let ghost = uuid::Uuid::now_v7();
    let mut sends = Vec::new();
    for i in 0..40 {
        sends.push(text(
            c.id,
            &alice,
            &format!("fresh-{i}"),
            &format!("body {i}"),
        ));
    }
    for i in 0..10 {
        sends.push(text(ghost, &alice, &format!("ghost-{i}"), "lost"));
        sends.push(text(c.id, &bob, "again", "once"));
    }
    let results =
        futures::future::join_all(sends.into_iter().map(|m| store.insert_message(m))).await;
    let mut seqs = Vec::new();
    let mut again = Vec::new();
    for result in results {
        match result {
            Ok(Inserted::New(m)) if m.client_msg_id == "again" => {
                seqs.push(m.seq);
                again.push((true, m.id));
            }
            Ok(Inserted::New(m)) => {
                assert_eq!(m.content, format!("body {}", &m.client_msg_id[6..]));
                seqs.push(m.seq);
            }
            Ok(Inserted::Existing(m)) => {
                assert_eq!(m.content, "once");
                again.push((false, m.id));
            }
            Err(super::StoreError::NoSuchConversation(id)) => assert_eq!(id, ghost),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=41).collect::<Vec<i64>>(),
        "gap-free, one seq per message"
    );
    assert_eq!(again.len(), 10);
    assert_eq!(
        again.iter().filter(|(new, _)| *new).count(),
        1,
        "stored once"
    );
    assert!(
        again.iter().all(|(_, id)| *id == again[0].1),
        "every retry gets that message"
    );
    let stored = store.messages_after(c.id, 0, 100).await.expect("read back");
    assert_eq!(stored.len(), 41);
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=41).collect::<Vec<i64>>()
    );
    let c = store.conversation(c.id).await.expect("load").expect("some");
    assert_eq!(c.last_seq, 41);
}

async fn messages_after_each_reads_every_cursor_with_its_own_cap(store: &dyn Store) {
    let alice = unique("alice");
    let mut ids = Vec::new();
    for n in [3, 7, 0] {
        let c = store
            .create_conversation(NewConversation {
                kind: ConversationKind::Group,
                title: None,
                department_id: None,
                members: vec![(alice.clone(), MemberRole::Owner)],
            })
            .await
            .expect("create");
        for i in 1..=n {
            store
                .insert_message(text(c.id, &alice, &format!("e-{i}"), &format!("{n}:{i}")))
                .await
                .expect("insert");
        }
        ids.push(c.id);
    }
    let ghost = uuid::Uuid::now_v7();
    // In the order asked, each capped at 4, each from its own cursor.
    let cursors = vec![(ids[1], 2), (ids[0], 0), (ids[2], 0), (ghost, 0)];
    let read = store
        .messages_after_each(&cursors, 4)
        .await
        .expect("read all cursors");
    let got: Vec<(uuid::Uuid, i64, String)> = read
        .iter()
        .map(|m| (m.conversation_id, m.seq, m.content.clone()))
        .collect();
    let mut want = Vec::new();
    for seq in 3..=6 {
        want.push((ids[1], seq, format!("7:{seq}")));
    }
    for seq in 1..=3 {
        want.push((ids[0], seq, format!("3:{seq}")));
    }
    assert_eq!(got, want);
    assert!(
        store
            .messages_after_each(&[], 4)
            .await
            .expect("none asked")
            .is_empty()
    );
    let caught_up = store
        .messages_after_each(&[(ids[0], 3)], 4)
        .await
        .expect("caught up");
    assert!(caught_up.is_empty());
}
