//! Uploads through the domain: membership, the limits (before any byte is read where the
//! request says enough), the same rate bucket as sends, and what reaches the object store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::memory_store::MemoryStore;
use super::{group, who};
use crate::attachments::{AttachmentStore, ByteStream, LocalAttachments};
use crate::bus::LocalBus;
use crate::chat::attachments::{AttachmentSettings, Attachments, Upload};
use crate::chat::error::ChatError;
use crate::chat::model::MessageKind;
use crate::chat::{ChatService, ChatSettings, Send};
use crate::limits::{LimitSettings, MemoryLimits, Quota};
use crate::presence::MemoryPresence;

/// A body that counts how many of its chunks were asked for.
fn counted(parts: Vec<Vec<u8>>, polled: Arc<AtomicUsize>) -> ByteStream {
    futures::stream::iter(parts)
        .map(move |p| {
            polled.fetch_add(1, Ordering::SeqCst);
            Ok(Bytes::from(p))
        })
        .boxed()
}

fn body(bytes: &[u8]) -> ByteStream {
    counted(vec![bytes.to_vec()], Arc::default())
}

struct Fixture {
    chat: Arc<ChatService>,
    attachments: Arc<Attachments>,
    objects: Arc<dyn AttachmentStore>,
    _dir: tempfile::TempDir,
}

async fn fixture(sends_per_burst: u32, max_bytes: u64) -> Fixture {
    let generous = Quota {
        per_second: 1000,
        burst: 1000,
    };
    let limits = LimitSettings {
        user_messages: Quota {
            per_second: 1,
            burst: sends_per_burst,
        },
        connection_events: generous,
        user_joins: generous,
        address_connects: generous,
        user_requests: generous,
    };
    let chat = ChatService::new(
        Arc::new(MemoryStore::default()),
        Arc::new(LocalBus::new()),
        Arc::new(MemoryPresence::new()),
        Arc::new(MemoryLimits::new(limits)),
        ChatSettings {
            presence_grace: Duration::from_secs(3),
            ..ChatSettings::default()
        },
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let objects: Arc<dyn AttachmentStore> =
        Arc::new(LocalAttachments::open(dir.path()).await.expect("opens"));
    let attachments = Attachments::new(
        chat.clone(),
        objects.clone(),
        AttachmentSettings {
            max_bytes,
            ..AttachmentSettings::default()
        },
    );
    Fixture {
        chat,
        attachments,
        objects,
        _dir: dir,
    }
}

fn upload(
    conversation: uuid::Uuid,
    name: &str,
    declared: Option<&str>,
    len: Option<u64>,
) -> Upload {
    Upload {
        conversation_id: conversation,
        name: name.into(),
        declared_type: declared.map(str::to_owned),
        declared_len: len,
    }
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_a_byte_is_read() {
    let f = fixture(100, 1000).await;
    let alice = who("alice");
    let c = group(&f.chat, &alice, &[]).await;
    let polled = Arc::new(AtomicUsize::new(0));
    let e = f
        .attachments
        .upload(
            &alice,
            upload(c.id, "big.bin", None, Some(1001)),
            counted(vec![vec![0; 1001]], polled.clone()),
        )
        .await
        .expect_err("too large");
    assert!(matches!(e, ChatError::TooLarge(_)), "{e}");
    assert_eq!(polled.load(Ordering::SeqCst), 0, "the body was not read");
    assert_eq!(f.objects.count().await.expect("count"), 0);
}

#[tokio::test]
async fn a_body_growing_past_the_limit_is_cut_off_and_nothing_is_kept() {
    let f = fixture(100, 300 * 1024).await;
    let alice = who("alice");
    let c = group(&f.chat, &alice, &[]).await;
    let polled = Arc::new(AtomicUsize::new(0));
    // Six chunks of 64 KiB, no declared length: the fifth passes the limit.
    let parts = vec![vec![b'a'; 64 * 1024]; 6];
    let e = f
        .attachments
        .upload(
            &alice,
            upload(c.id, "big.txt", None, None),
            counted(parts, polled.clone()),
        )
        .await
        .expect_err("too large");
    assert!(matches!(e, ChatError::TooLarge(_)), "{e}");
    assert_eq!(
        polled.load(Ordering::SeqCst),
        5,
        "no chunk is read past the limit"
    );
    assert_eq!(f.objects.count().await.expect("count"), 0);
}

#[tokio::test]
async fn strangers_cannot_upload_and_nothing_of_theirs_is_read() {
    let f = fixture(100, 1000).await;
    let alice = who("alice");
    let c = group(&f.chat, &alice, &[]).await;
    let polled = Arc::new(AtomicUsize::new(0));
    let e = f
        .attachments
        .upload(
            &who("mallory"),
            upload(c.id, "x.txt", None, None),
            counted(vec![b"hi".to_vec()], polled.clone()),
        )
        .await
        .expect_err("a stranger");
    assert!(matches!(e, ChatError::Forbidden(_)), "{e}");
    assert_eq!(polled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn uploads_draw_on_the_same_per_user_bucket_as_sends() {
    let f = fixture(2, 1000).await;
    let alice = who("alice");
    let c = group(&f.chat, &alice, &[]).await;
    f.attachments
        .upload(&alice, upload(c.id, "a.txt", None, None), body(b"one"))
        .await
        .expect("first upload");
    f.chat
        .send(
            &alice,
            Send {
                conversation_id: c.id,
                kind: MessageKind::Text,
                content: "and a send".into(),
                client_msg_id: "m1".into(),
                attachment_id: None,
                reply_to: None,
                mentions: Vec::new(),
            },
        )
        .await
        .expect("send");
    let e = f
        .attachments
        .upload(&alice, upload(c.id, "b.txt", None, None), body(b"two"))
        .await
        .expect_err("the bucket is empty");
    assert!(matches!(e, ChatError::RateLimited { .. }), "{e}");
}

#[tokio::test]
async fn the_type_is_the_sniffed_one_and_must_match_what_was_declared() {
    let f = fixture(100, 1000).await;
    let alice = who("alice");
    let c = group(&f.chat, &alice, &[]).await;
    let pdf = f
        .attachments
        .upload(
            &alice,
            upload(c.id, "r.pdf", Some("application/octet-stream"), None),
            body(b"%PDF-1.7\n"),
        )
        .await
        .expect("a PDF sent as octet-stream");
    assert_eq!(pdf.content_type, "application/pdf");
    for (declared, bytes) in [
        ("image/png", &b"<html><body>x</body></html>"[..]),
        ("image/png", &b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"[..]),
        ("text/plain; charset=utf-8", &b"%PDF-1.7\n"[..]),
    ] {
        let e = f
            .attachments
            .upload(&alice, upload(c.id, "x", Some(declared), None), body(bytes))
            .await
            .expect_err(declared);
        assert!(
            matches!(e, ChatError::UnsupportedType(_)),
            "{declared}: {e}"
        );
        assert_eq!(e.code(), "invalid");
        assert_eq!(e.http_status(), 415);
    }
    let e = f
        .attachments
        .upload(&alice, upload(c.id, "empty", None, None), body(b""))
        .await
        .expect_err("empty");
    assert!(matches!(e, ChatError::Invalid(_)), "{e}");
    let e = f
        .attachments
        .upload(&alice, upload(c.id, "bad\nname", None, None), body(b"x"))
        .await
        .expect_err("a control character in the name");
    assert!(e.to_string().contains("name"), "{e}");
}

#[tokio::test]
async fn an_image_message_needs_an_image_and_a_file_message_carries_its_attachment() {
    let f = fixture(100, 1000).await;
    let alice = who("alice");
    let c = group(&f.chat, &alice, &["bob"]).await;
    let notes = f
        .attachments
        .upload(
            &alice,
            upload(c.id, "notes.txt", None, None),
            body(b"notes"),
        )
        .await
        .expect("upload");
    let send = |kind, client_msg_id: &str| Send {
        conversation_id: c.id,
        kind,
        content: String::new(),
        client_msg_id: client_msg_id.into(),
        attachment_id: Some(notes.id),
        reply_to: None,
        mentions: Vec::new(),
    };
    let e = f
        .chat
        .send(&alice, send(MessageKind::Image, "i1"))
        .await
        .expect_err("text is no image");
    assert!(matches!(e, ChatError::Invalid(_)), "{e}");
    let sent = f
        .chat
        .send(&who("bob"), send(MessageKind::File, "f1"))
        .await
        .expect("any member may send an upload of the conversation");
    let carried = sent.message.attachment.expect("carried");
    assert_eq!(carried.id, notes.id);
    assert_eq!(carried.name, "notes.txt");
    assert_eq!(carried.content_type, "text/plain");
    assert_eq!(carried.size, 5);
}
