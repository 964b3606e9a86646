//! `S3Attachments`: objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, …) through
//! `object_store`, for fleets whose gateways share no disk.
//!
//! An object's key (`objects/<sha256>`) is known only once its last byte is hashed, so a body
//! that fits in one part is held (at most [`PART`] bytes) and put under its key at the end; a
//! longer one is streamed as a multipart upload to `tmp/<uuid>` and copied to its key inside the
//! bucket once whole. Either way a key holds whole objects only, and bytes already stored under
//! their key are not written again.

use std::ops::Range;

use async_trait::async_trait;
use bytes::BytesMut;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};

use super::{AttachmentError, AttachmentStore, ByteStream, Hashing, Stored, check_address};

/// S3's smallest multipart part (but the last): bodies up to this are one PUT.
const PART: usize = 5 * 1024 * 1024;

/// Where the bucket is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible service; AWS's own endpoints when `None`.
    pub endpoint: Option<String>,
    pub region: String,
    /// Static credentials; when absent the usual AWS environment (`AWS_ACCESS_KEY_ID`, web
    /// identity tokens, instance metadata) is asked.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

pub struct S3Attachments {
    store: AmazonS3,
}

impl S3Attachments {
    pub fn new(settings: &S3Settings) -> Result<Self, AttachmentError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region);
        if let Some(endpoint) = &settings.endpoint {
            // Emulators and in-cluster services are often plain HTTP; path-style requests
            // (the builder's default) need no wildcard DNS.
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        Ok(Self {
            store: builder.build()?,
        })
    }

    fn key(sha256: &str) -> Result<Path, AttachmentError> {
        check_address(sha256)?;
        Ok(Path::from(format!("objects/{sha256}")))
    }

    async fn exists(&self, key: &Path) -> Result<Option<u64>, AttachmentError> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the body, holding up to one part and streaming the rest to a multipart upload.
    async fn take_body(&self, mut body: ByteStream) -> Result<(Hashing, Pending), AttachmentError> {
        let mut hashing = Hashing::default();
        let mut held = BytesMut::new();
        let mut upload: Option<(Path, WriteMultipart)> = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    if let Some((_, writer)) = upload {
                        let _ = writer.abort().await;
                    }
                    return Err(AttachmentError::Body(e));
                }
            };
            hashing.update(&chunk);
            match upload.as_mut() {
                Some((_, writer)) => {
                    // One part in flight at most: memory stays near two parts per upload.
                    writer.wait_for_capacity(1).await?;
                    writer.write(&chunk);
                }
                None => {
                    held.extend_from_slice(&chunk);
                    if held.len() >= PART {
                        let tmp = Path::from(format!("tmp/{}", uuid::Uuid::now_v7().simple()));
                        let multipart = self.store.put_multipart(&tmp).await?;
                        let mut writer = WriteMultipart::new_with_chunk_size(multipart, PART);
                        writer.write(&held);
                        held = BytesMut::new();
                        upload = Some((tmp, writer));
                    }
                }
            }
        }
        Ok((
            hashing,
            match upload {
                Some((tmp, writer)) => Pending::Multipart(tmp, writer),
                None => Pending::Held(held),
            },
        ))
    }
}

/// A body read whole, not yet under its key.
enum Pending {
    Held(BytesMut),
    Multipart(Path, WriteMultipart),
}

#[async_trait]
impl AttachmentStore for S3Attachments {
    async fn ping(&self) -> Result<(), AttachmentError> {
        // A listing of nothing in particular: proves the bucket exists and we may read it.
        let mut listing = self.store.list(Some(&Path::from("objects")));
        match listing.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
        }
    }

    async fn put(&self, body: ByteStream) -> Result<Stored, AttachmentError> {
        let (hashing, pending) = self.take_body(body).await?;
        let (sha256, size) = hashing.finish();
        let key = Self::key(&sha256)?;
        let already = self.exists(&key).await?.is_some();
        match pending {
            Pending::Held(bytes) if !already => {
                self.store
                    .put(&key, PutPayload::from(bytes.freeze()))
                    .await?;
            }
            Pending::Held(_) => {}
            Pending::Multipart(_, writer) if already => {
                let _ = writer.abort().await;
            }
            Pending::Multipart(tmp, writer) => {
                writer.finish().await?;
                let copied = self.store.copy(&tmp, &key).await;
                let _ = self.store.delete(&tmp).await;
                copied?;
            }
        }
        Ok(Stored {
            sha256,
            size,
            fresh: !already,
        })
    }

    async fn get(
        &self,
        sha256: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, AttachmentError> {
        let key = Self::key(sha256)?;
        let len = self
            .exists(&key)
            .await?
            .ok_or_else(|| AttachmentError::NotFound(sha256.to_owned()))?;
        let range = range.unwrap_or(0..len);
        if range.start > range.end || range.end > len {
            return Err(AttachmentError::Range(format!(
                "{}..{} of {len} bytes",
                range.start, range.end
            )));
        }
        if range.start == range.end {
            // S3 refuses an empty range; there is nothing to fetch.
            return Ok(futures::stream::empty().boxed());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..GetOptions::default()
        };
        let result = match self.store.get_opts(&key, options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(AttachmentError::NotFound(sha256.to_owned()));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(result.into_stream().map_err(std::io::Error::other).boxed())
    }

    async fn size(&self, sha256: &str) -> Result<Option<u64>, AttachmentError> {
        self.exists(&Self::key(sha256)?).await
    }

    async fn count(&self) -> Result<u64, AttachmentError> {
        let mut n = 0;
        let mut listing = self.store.list(Some(&Path::from("objects")));
        while let Some(meta) = listing.next().await {
            meta?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// A moto S3 emulator on a free port, stopped when dropped.
    struct Moto {
        child: Child,
        endpoint: String,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// `moto_server` from `CONFAB_MOTO_SERVER`, the test venv (scripts/test.sh installs it
    /// there) or PATH. Missing, the test fails: the S3 backend is never silently untested.
    fn moto_binary() -> String {
        if let Ok(path) = std::env::var("CONFAB_MOTO_SERVER") {
            return path;
        }
        let venv = std::env::var("HOME")
            .map(|h| format!("{h}/.cache/confab-venv/bin/moto_server"))
            .unwrap_or_default();
        if std::path::Path::new(&venv).exists() {
            venv
        } else {
            "moto_server".into()
        }
    }

    async fn start_moto() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let binary = moto_binary();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} ({e}): run scripts/test.sh once, or pip install 'moto[server]' into ~/.cache/confab-venv")
            });
        let endpoint = format!("http://127.0.0.1:{port}");
        let moto = Moto { child, endpoint };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.get(&moto.endpoint).send().await.is_ok() {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn s3_attachments_meet_the_attachment_store_contract_against_an_emulator() {
        let moto = start_moto().await;
        // moto accepts any credentials; the bucket is made with a plain path-style PUT.
        let bucket = format!("confab-test-{}", uuid::Uuid::now_v7().simple());
        let created = reqwest::Client::new()
            .put(format!("{}/{bucket}", moto.endpoint))
            .send()
            .await
            .expect("moto answers");
        assert!(created.status().is_success(), "{}", created.status());
        let store = S3Attachments::new(&S3Settings {
            bucket,
            endpoint: Some(moto.endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
        })
        .expect("builds");
        crate::attachments::contract::run(&store).await;
        // Multipart leftovers under tmp/ were copied and removed.
        let leftovers: Vec<_> = store
            .store
            .list(Some(&Path::from("tmp")))
            .collect::<Vec<_>>()
            .await;
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn a_missing_bucket_fails_the_ping() {
        let moto = start_moto().await;
        let store = S3Attachments::new(&S3Settings {
            bucket: "no-such-bucket".into(),
            endpoint: Some(moto.endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
        })
        .expect("builds");
        assert!(store.ping().await.is_err());
    }
}
