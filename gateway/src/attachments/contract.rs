//! The contract every `AttachmentStore` must meet, as one function over `&dyn AttachmentStore`.
//! Each implementation's tests call [`run`] on an empty store.

use bytes::Bytes;
use futures::StreamExt;

use super::{AttachmentError, AttachmentStore, ByteStream, collect};

fn chunks(parts: Vec<Vec<u8>>) -> ByteStream {
    futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p)))).boxed()
}

/// A body whose bytes arrive in pieces, then fail: the client went away midway.
fn failing(parts: Vec<Vec<u8>>) -> ByteStream {
    let items = parts
        .into_iter()
        .map(|p| Ok(Bytes::from(p)))
        .chain(std::iter::once(Err(std::io::Error::other(
            "client went away",
        ))));
    futures::stream::iter(items).boxed()
}

/// Bytes that differ from run to run, so a shared bucket starts with none of them.
fn unique_bytes(len: usize) -> Vec<u8> {
    let seed = uuid::Uuid::now_v7();
    let seed = seed.as_bytes();
    (0..len)
        .map(|i| seed[i % 16] ^ (i as u8).wrapping_mul(31))
        .collect()
}

pub async fn run(store: &dyn AttachmentStore) {
    store.ping().await.expect("ping answers");
    a_stored_object_is_addressed_by_the_sha256_of_its_bytes(store).await;
    the_same_bytes_stored_twice_are_one_object(store).await;
    a_body_that_fails_midway_stores_nothing(store).await;
    ranges_read_part_of_an_object(store).await;
    a_missing_object_is_reported(store).await;
    an_object_larger_than_one_part_streams_through_whole(store).await;
}

async fn a_stored_object_is_addressed_by_the_sha256_of_its_bytes(store: &dyn AttachmentStore) {
    let before = store.count().await.expect("count");
    // sha256("abc"), the FIPS 180-2 example.
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let stored = store
        .put(chunks(vec![b"a".to_vec(), b"bc".to_vec()]))
        .await
        .expect("put");
    assert_eq!(stored.sha256, abc);
    assert_eq!(stored.size, 3);
    assert_eq!(store.size(abc).await.expect("size"), Some(3));
    let back = collect(store.get(abc, None).await.expect("get"))
        .await
        .expect("read");
    assert_eq!(back, b"abc");
    assert!(store.count().await.expect("count") >= before.max(1));
}

async fn the_same_bytes_stored_twice_are_one_object(store: &dyn AttachmentStore) {
    let bytes = unique_bytes(10_000);
    let before = store.count().await.expect("count");
    let first = store
        .put(chunks(vec![bytes[..4000].to_vec(), bytes[4000..].to_vec()]))
        .await
        .expect("first put");
    assert!(first.fresh, "new bytes are a new object");
    let again = store
        .put(chunks(vec![bytes.clone()]))
        .await
        .expect("second put");
    assert_eq!(again.sha256, first.sha256);
    assert!(!again.fresh, "a retry writes nothing new");
    assert_eq!(store.count().await.expect("count"), before + 1);
}

async fn a_body_that_fails_midway_stores_nothing(store: &dyn AttachmentStore) {
    let before = store.count().await.expect("count");
    let bytes = unique_bytes(5000);
    let e = store
        .put(failing(vec![
            bytes[..2000].to_vec(),
            bytes[2000..].to_vec(),
        ]))
        .await
        .expect_err("a failed body is not stored");
    assert!(matches!(e, AttachmentError::Body(_)), "{e}");
    assert_eq!(store.count().await.expect("count"), before);
}

async fn ranges_read_part_of_an_object(store: &dyn AttachmentStore) {
    let bytes = unique_bytes(1000);
    let stored = store.put(chunks(vec![bytes.clone()])).await.expect("put");
    let part = collect(
        store
            .get(&stored.sha256, Some(100..250))
            .await
            .expect("range"),
    )
    .await
    .expect("read");
    assert_eq!(part, &bytes[100..250]);
    let tail = collect(
        store
            .get(&stored.sha256, Some(990..1000))
            .await
            .expect("tail"),
    )
    .await
    .expect("read");
    assert_eq!(tail, &bytes[990..]);
    assert!(matches!(
        store.get(&stored.sha256, Some(10..1001)).await,
        Err(AttachmentError::Range(_))
    ));
}

async fn a_missing_object_is_reported(store: &dyn AttachmentStore) {
    let nothing = "0".repeat(64);
    assert_eq!(store.size(&nothing).await.expect("size"), None);
    assert!(matches!(
        store.get(&nothing, None).await,
        Err(AttachmentError::NotFound(_))
    ));
    // Not an address at all: refused before it reaches a path or a key.
    assert!(matches!(
        store.get("../../etc/passwd", None).await,
        Err(AttachmentError::NotFound(_))
    ));
}

async fn an_object_larger_than_one_part_streams_through_whole(store: &dyn AttachmentStore) {
    // Past S3's 5 MiB multipart minimum, in 64 KiB chunks as an HTTP body arrives.
    let bytes = unique_bytes(6 * 1024 * 1024 + 123);
    let parts: Vec<Vec<u8>> = bytes.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let stored = store.put(chunks(parts)).await.expect("put");
    assert_eq!(stored.size, bytes.len() as u64);
    let back = collect(store.get(&stored.sha256, None).await.expect("get"))
        .await
        .expect("read");
    assert!(back == bytes, "the object reads back byte for byte");
}
