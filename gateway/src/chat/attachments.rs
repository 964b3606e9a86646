//! Attachments: uploads (members only, size-capped while streaming, typed by their bytes),
//! downloads and thumbnails. Bytes go to the `AttachmentStore`, records to the `Store`.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::error::ChatError;
use super::model::{Attachment, ConversationId, Identity};
use super::service::ChatService;
use super::{check_text, store_err, unavailable};
use crate::attachments::media::{self, DimensionError};
use crate::attachments::{AttachmentError, AttachmentStore, ByteStream};
use crate::limits::LimitClass;

/// Attachment limits, from configuration.
#[derive(Debug, Clone)]
pub struct AttachmentSettings {
    pub max_bytes: u64,
    /// Content types accepted, as sniffed (`image/png`, `application/pdf`, …).
    pub allowed_types: Vec<String>,
    /// Longest side of a thumbnail, in pixels.
    pub thumbnail_side: u32,
}

impl Default for AttachmentSettings {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            allowed_types: DEFAULT_TYPES.iter().map(|&t| t.to_owned()).collect(),
            thumbnail_side: 320,
        }
    }
}

/// What is accepted unless configured otherwise: the four images the gateway decodes, PDF,
/// plain text, ZIP, and unrecognised binary (served as a download, never inline).
pub const DEFAULT_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "application/zip",
    "application/octet-stream",
];

/// Thumbnails kept in memory, newest last: a page showing a conversation asks for the same
/// few again and again, and decoding is the expensive part.
const THUMBNAIL_CACHE: usize = 64;
/// Thumbnails decoded at once: each may allocate up to the decoder's limit.
const THUMBNAIL_DECODES: usize = 2;

/// One upload as asked: where, under what name, and what the client says it is.
#[derive(Debug, Clone)]
pub struct Upload {
    pub conversation_id: ConversationId,
    pub name: String,
    /// The client's declared type (`Content-Type`); checked against the sniffed one.
    pub declared_type: Option<String>,
    /// The declared length (`Content-Length`), refused before a byte is read when too large.
    pub declared_len: Option<u64>,
}

pub struct Attachments {
    chat: Arc<ChatService>,
    objects: Arc<dyn AttachmentStore>,
    settings: AttachmentSettings,
    thumbnails: Mutex<(HashMap<uuid::Uuid, Bytes>, VecDeque<uuid::Uuid>)>,
    decoding: tokio::sync::Semaphore,
}

/// `type/subtype` without parameters, lower-cased.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

impl Attachments {
    pub fn new(
        chat: Arc<ChatService>,
        objects: Arc<dyn AttachmentStore>,
        settings: AttachmentSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            chat,
            objects,
            settings,
            thumbnails: Mutex::default(),
            decoding: tokio::sync::Semaphore::new(THUMBNAIL_DECODES),
        })
    }

    pub fn settings(&self) -> &AttachmentSettings {
        &self.settings
    }

    pub fn objects(&self) -> &Arc<dyn AttachmentStore> {
        &self.objects
    }

    fn too_large(&self) -> ChatError {
        ChatError::TooLarge(format!(
            "the attachment is larger than {} bytes (CONFAB_MAX_ATTACHMENT_BYTES)",
            self.settings.max_bytes
        ))
    }

    /// Streams `body` to the object store and records it. Refused before anything is stored:
    /// a non-member, a declared length past the limit, content of a type not allowed (as
    /// sniffed from its first bytes) or not the declared one, an image too large to decode.
    /// Refused without keeping anything: a body that grows past the limit while streaming.
    pub async fn upload(
        &self,
        who: &Identity,
        up: Upload,
        mut body: ByteStream,
    ) -> Result<Attachment, ChatError> {
        check_text("name", &up.name, 255, false)?;
        if up.declared_len.is_some_and(|n| n > self.settings.max_bytes) {
            return Err(self.too_large());
        }
        // The same bucket as sends: an upload is the first half of a message.
        self.chat
            .throttle(LimitClass::UserMessages, &who.user_id)
            .await?;
        self.chat.participating(up.conversation_id, who).await?;
        // The head: enough to tell the type and read an image's header.
        let mut head = BytesMut::new();
        let mut ended = false;
        while head.len() < media::SNIFF_BYTES {
            match body.next().await {
                Some(Ok(chunk)) => {
                    head.extend_from_slice(&chunk);
                    if head.len() as u64 > self.settings.max_bytes {
                        return Err(self.too_large());
                    }
                }
                Some(Err(e)) => {
                    return Err(ChatError::invalid(format!("the upload was cut short: {e}")));
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if head.is_empty() {
            return Err(ChatError::invalid("the attachment is empty"));
        }
        let content_type = media::sniff(&head, ended);
        if !self
            .settings
            .allowed_types
            .iter()
            .any(|t| t == content_type)
        {
            return Err(ChatError::UnsupportedType(format!(
                "the content is {content_type}, which is not accepted (allowed: {})",
                self.settings.allowed_types.join(", ")
            )));
        }
        if let Some(declared) = up.declared_type.as_deref().map(essence)
            && !declared.is_empty()
            && declared != content_type
            && declared != "application/octet-stream"
        {
            return Err(ChatError::UnsupportedType(format!(
                "declared {declared}, but the content is {content_type}"
            )));
        }
        let dimensions = if media::is_image(content_type) {
            match media::dimensions(&head, content_type) {
                Ok(d) => Some(d),
                Err(DimensionError::TooLarge(m)) => return Err(ChatError::TooLarge(m)),
                Err(DimensionError::Unreadable(m)) => return Err(ChatError::UnsupportedType(m)),
            }
        } else {
            None
        };
        let over = Arc::new(AtomicBool::new(false));
        let stream = capped(head.freeze(), body, self.settings.max_bytes, over.clone());
        let stored = match self.objects.put(stream).await {
            Ok(stored) => stored,
            Err(AttachmentError::Body(_)) if over.load(Ordering::Acquire) => {
                return Err(self.too_large());
            }
            Err(AttachmentError::Body(e)) => {
                return Err(ChatError::invalid(format!("the upload was cut short: {e}")));
            }
            Err(e) => return Err(unavailable("attachment store", e)),
        };
        let record = Attachment {
            id: uuid::Uuid::now_v7(),
            conversation_id: up.conversation_id,
            uploader_id: who.user_id.clone(),
            name: up.name,
            content_type: content_type.to_owned(),
            size: i64::try_from(stored.size).map_err(|_| self.too_large())?,
            sha256: stored.sha256,
            width: dimensions.map(|d| d.0),
            height: dimensions.map(|d| d.1),
            created_at: super::model::now(),
        };
        self.chat
            .store
            .insert_attachment(record)
            .await
            .map_err(store_err)
    }

    /// The attachment's record, for a member of its conversation.
    pub async fn find(&self, who: &Identity, id: uuid::Uuid) -> Result<Attachment, ChatError> {
        let attachment = self
            .chat
            .store
            .attachment(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ChatError::not_found("no such attachment"))?;
        self.chat
            .participating(attachment.conversation_id, who)
            .await?;
        Ok(attachment)
    }

    /// The bytes of an attachment found with [`find`](Self::find), or of `range` of them.
    pub async fn read(
        &self,
        attachment: &Attachment,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, ChatError> {
        match self.objects.get(&attachment.sha256, range).await {
            Ok(stream) => Ok(stream),
            Err(AttachmentError::NotFound(_)) => {
                tracing::error!(attachment = %attachment.id, "an attachment's object is missing");
                Err(ChatError::not_found("the attachment's content is gone"))
            }
            Err(AttachmentError::Range(m)) => Err(ChatError::invalid(m)),
            Err(e) => Err(unavailable("attachment store", e)),
        }
    }

    /// A PNG thumbnail of an image attachment, for a member of its conversation.
    pub async fn thumbnail(&self, who: &Identity, id: uuid::Uuid) -> Result<Bytes, ChatError> {
        let attachment = self.find(who, id).await?;
        if !media::is_image(&attachment.content_type) {
            return Err(ChatError::not_found(format!(
                "a {} attachment has no thumbnail",
                attachment.content_type
            )));
        }
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let _permit = self
            .decoding
            .acquire()
            .await
            .map_err(|e| unavailable("thumbnail queue", e))?;
        let bytes = crate::attachments::collect(self.read(&attachment, None).await?)
            .await
            .map_err(|e| unavailable("attachment store", e))?;
        let side = self.settings.thumbnail_side;
        let content_type = attachment.content_type.clone();
        let thumb =
            tokio::task::spawn_blocking(move || media::thumbnail(&bytes, &content_type, side))
                .await
                .map_err(|e| unavailable("thumbnail task", e))?
                .map_err(ChatError::UnsupportedType)?;
        let thumb = Bytes::from(thumb);
        self.remember(id, thumb.clone());
        Ok(thumb)
    }

    fn cached(&self, id: uuid::Uuid) -> Option<Bytes> {
        let cache = self.thumbnails.lock().unwrap_or_else(|p| p.into_inner());
        cache.0.get(&id).cloned()
    }

    fn remember(&self, id: uuid::Uuid, thumb: Bytes) {
        let mut cache = self.thumbnails.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *cache;
        if map.insert(id, thumb).is_none() {
            order.push_back(id);
        }
        while order.len() > THUMBNAIL_CACHE {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }
}

/// `head`, then the rest of `body`, failing (and setting `over`) as soon as the total passes
/// `max`: the store then discards what it had written, and no more of the body is read.
fn capped(head: Bytes, body: ByteStream, max: u64, over: Arc<AtomicBool>) -> ByteStream {
    let mut seen = head.len() as u64;
    let rest = body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > max {
            over.store(true, Ordering::Release);
            return Err(std::io::Error::other(format!(
                "the body passed the limit of {max} bytes"
            )));
        }
        Ok(chunk)
    });
    // Nothing is pulled after an error: the first failure ends the stream.
    let mut failed = false;
    futures::stream::once(async move { Ok(head) })
        .chain(rest)
        .take_while(move |item| {
            let go = !failed;
            failed = failed || item.is_err();
            futures::future::ready(go)
        })
        .boxed()
}
