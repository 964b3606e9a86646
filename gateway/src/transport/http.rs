//! The HTTP API: conversations, members, history, health, and its generated OpenAPI document.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use uuid::Uuid;

use super::Gateway;
use super::protocol::{
    AddMemberBody, AttachmentReply, ConversationBody, ConversationList, CreateConversationBody,
    ErrorBody, ErrorReply, MessagesPage,
};
use crate::chat::CreateConversation;
use crate::chat::attachments::Upload;
use crate::chat::error::ChatError;
use crate::chat::model::{
    Attachment, Conversation, ConversationKind, ConversationSummary, Identity, Member, MemberRole,
    Message, MessageAttachment, MessageKind,
};
use crate::limits::LimitClass;

/// A failed request: the status and `{error: {code, message}}` of its `ChatError`.
pub struct ApiError(pub ChatError);

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(ErrorReply::from(&self.0))).into_response();
        if let ChatError::RateLimited { retry_after_ms } = self.0 {
            let secs = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = secs.to_string().parse() {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

fn json_error(e: JsonRejection) -> ApiError {
    match e {
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError(ChatError::TooLarge("request body is too large".into()))
        }
        other => ApiError(ChatError::invalid(other.body_text())),
    }
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError(ChatError::invalid(e.body_text()))
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError(ChatError::invalid(e.body_text()))
}

/// The authenticated caller of an API request (`Authorization: Bearer <jwt>`).
pub struct Caller(pub Identity);

impl FromRequestParts<Arc<Gateway>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gw: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let token = super::connection::bearer(&parts.headers);
        let who =
            super::connection::authenticate(gw, crate::telemetry::Transport::Http, token, None)
                .map_err(|e| ApiError(ChatError::Unauthorized(e.to_string())))?;
        // One bucket per user over every API route: 429 + Retry-After past it.
        gw.service
            .throttle(LimitClass::UserRequests, &who.user_id)
            .await?;
        Ok(Caller(who))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Messages with a smaller seq; the newest page when absent.
    pub before_seq: Option<i64>,
    /// 1 to 100; default 50.
    pub limit: Option<u32>,
}

#[utoipa::path(post, path = "/api/conversations", request_body = CreateConversationBody,
    responses((status = 201, body = ConversationBody), (status = 401, body = ErrorReply), (status = 422, body = ErrorReply)),
    security(("bearer" = [])))]
async fn create_conversation(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    body: Result<Json<CreateConversationBody>, JsonRejection>,
) -> Result<(StatusCode, Json<ConversationBody>), ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let conversation = gw
        .service
        .create_conversation(
            &who,
            CreateConversation {
                kind: body.kind,
                title: body.title,
                members: body.members,
                department_id: body.department_id,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(ConversationBody { conversation })))
}

#[utoipa::path(get, path = "/api/conversations",
    responses((status = 200, body = ConversationList), (status = 401, body = ErrorReply)),
    security(("bearer" = [])))]
async fn list_conversations(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
) -> Result<Json<ConversationList>, ApiError> {
    let conversations = gw.service.conversations(&who).await?;
    Ok(Json(ConversationList { conversations }))
}

#[utoipa::path(get, path = "/api/conversations/{id}", params(("id" = Uuid, Path)),
    responses((status = 200, body = ConversationBody), (status = 403, body = ErrorReply), (status = 404, body = ErrorReply)),
    security(("bearer" = [])))]
async fn get_conversation(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<ConversationBody>, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let conversation = gw.service.conversation(&who, id).await?;
    Ok(Json(ConversationBody { conversation }))
}

#[utoipa::path(post, path = "/api/conversations/{id}/members", params(("id" = Uuid, Path)),
    request_body = AddMemberBody,
    responses((status = 204), (status = 403, body = ErrorReply), (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)),
    security(("bearer" = [])))]
async fn add_member(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
    body: Result<Json<AddMemberBody>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let Json(body) = body.map_err(json_error)?;
    gw.service.add_member(&who, id, &body.user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/conversations/{id}/members/{userId}",
    params(("id" = Uuid, Path), ("userId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorReply), (status = 404, body = ErrorReply)),
    security(("bearer" = [])))]
async fn remove_member(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    path: Result<Path<(Uuid, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path((id, user)) = path.map_err(path_error)?;
    gw.service.remove_member(&who, id, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/conversations/{id}/messages", params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, body = MessagesPage), (status = 403, body = ErrorReply), (status = 422, body = ErrorReply)),
    security(("bearer" = [])))]
async fn messages(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<MessagesPage>, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    let page = gw.service.history(&who, id, q.before_seq, q.limit).await?;
    Ok(Json(MessagesPage {
        messages: page.messages,
        next_before_seq: page.next_before_seq,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// The file's name, as members will see it.
    pub name: String,
}

#[utoipa::path(post, path = "/api/conversations/{id}/attachments", params(("id" = Uuid, Path), UploadQuery),
    request_body(content = Vec<u8>, description = "the file itself, with its Content-Type and Content-Length", content_type = "application/octet-stream"),
    responses((status = 201, body = AttachmentReply), (status = 403, body = ErrorReply), (status = 413, body = ErrorReply),
        (status = 415, body = ErrorReply, description = "a type not accepted, or not the declared one (sniffed from the bytes)"),
        (status = 429, body = ErrorReply)),
    security(("bearer" = [])))]
async fn upload_attachment(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<AttachmentReply>), ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    let declared_len = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError(ChatError::invalid("Content-Length is not a number")))?,
        ),
    };
    let declared_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Chunk by chunk as hyper reads them: the file is never whole in memory.
    let stream = body
        .into_data_stream()
        .map_err(std::io::Error::other)
        .boxed();
    let attachment = gw
        .attachments
        .upload(
            &who,
            Upload {
                conversation_id: id,
                name: q.name,
                declared_type,
                declared_len,
            },
            stream,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(AttachmentReply { attachment })))
}

/// `Range: bytes=a-b | a- | -n` (one range; several, or one we cannot read, serve the whole),
/// as `start..end`. `Err` when it starts past the end (416).
fn byte_range(headers: &HeaderMap, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b => a..b.saturating_add(1).min(size),
        (Ok(a), Err(_)) if last.is_empty() => a..size,
        (Err(_), Ok(n)) if first.is_empty() && n > 0 => size.saturating_sub(n)..size,
        _ => return Ok(None),
    };
    if range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

/// `attachment` (a download) for anything but the image types shown inline, with the name as
/// ASCII and as RFC 8187 UTF-8.
fn disposition(a: &Attachment) -> String {
    let kind = if crate::attachments::media::is_image(&a.content_type) {
        "inline"
    } else {
        "attachment"
    };
    let ascii: String = a
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .-_()".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in a.name.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(b) {
            encoded.push(*b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Headers that keep served content inert: no sniffing into another type, no scripts, no
/// plugins, no same-origin access even when opened as a page.
fn safe_headers(builder: axum::http::response::Builder) -> axum::http::response::Builder {
    builder
        .header("x-content-type-options", "nosniff")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox",
        )
        .header(header::CACHE_CONTROL, "private, max-age=86400")
}

fn built(response: Result<Response, axum::http::Error>) -> Response {
    response.unwrap_or_else(|e| {
        tracing::error!(error = %e, "could not build an attachment response");
        ApiError(ChatError::Unavailable).into_response()
    })
}

#[utoipa::path(get, path = "/api/attachments/{id}", params(("id" = Uuid, Path)),
    responses((status = 200, description = "the file"), (status = 206, description = "the range asked for"),
        (status = 403, body = ErrorReply), (status = 404, body = ErrorReply), (status = 416, description = "a range past the end")),
    security(("bearer" = [])))]
async fn download_attachment(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let attachment = gw.attachments.find(&who, id).await?;
    let size = u64::try_from(attachment.size).unwrap_or(0);
    let range = match byte_range(&headers, size) {
        Ok(r) => r,
        Err(()) => {
            return Ok(built(
                safe_headers(Response::builder())
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(Body::empty()),
            ));
        }
    };
    let stream = gw.attachments.read(&attachment, range.clone()).await?;
    let content_type = if attachment.content_type == "text/plain" {
        "text/plain; charset=utf-8".to_owned()
    } else {
        attachment.content_type.clone()
    };
    let mut builder = safe_headers(Response::builder())
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, disposition(&attachment))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{}\"", attachment.sha256));
    builder = match &range {
        Some(r) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end.saturating_sub(1)),
            )
            .header(header::CONTENT_LENGTH, r.end - r.start),
        None => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, size),
    };
    Ok(built(builder.body(Body::from_stream(stream))))
}

#[utoipa::path(get, path = "/api/attachments/{id}/thumbnail", params(("id" = Uuid, Path)),
    responses((status = 200, description = "a PNG at most 320 pixels a side, without the original's metadata", content_type = "image/png"),
        (status = 403, body = ErrorReply), (status = 404, body = ErrorReply)),
    security(("bearer" = [])))]
async fn attachment_thumbnail(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(path_error)?;
    let thumb = gw.attachments.thumbnail(&who, id).await?;
    Ok(built(
        safe_headers(Response::builder())
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "image/png")
            .header(header::CONTENT_DISPOSITION, "inline")
            .header(header::CONTENT_LENGTH, thumb.len())
            .body(Body::from(thumb)),
    ))
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "the process is alive")))]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "every backend answers"),
    (status = 503, body = ErrorReply, description = "a backend is unreachable")))]
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.drain.is_draining() {
        let body = ErrorReply {
            error: ErrorBody {
                code: "unavailable".into(),
                message: "draining: this gateway is handing its connections to the others".into(),
            },
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let ready = match gw.service.ready().await {
        Ok(()) => gw
            .attachments
            .objects()
            .ping()
            .await
            .map_err(|e| format!("attachments: {e}")),
        Err(why) => Err(why),
    };
    match ready {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => {
            tracing::warn!(reason = %why, "not ready");
            let body = ErrorReply {
                error: ErrorBody {
                    code: "unavailable".into(),
                    message: why,
                },
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Where a drain stands.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    /// `serving`, `draining` or `drained`.
    pub state: String,
    /// Connections still open on this gateway.
    pub connections: usize,
    /// The drain window, in seconds.
    pub window_seconds: f64,
}

fn drain_status(gw: &Gateway) -> DrainStatus {
    DrainStatus {
        state: gw.drain.state().as_str().into(),
        connections: gw.service.hub().connection_count(),
        window_seconds: gw.drain.window().as_secs_f64(),
    }
}

fn require_admin(who: &Identity) -> Result<(), ApiError> {
    if who.is_admin() {
        Ok(())
    } else {
        Err(ApiError(ChatError::Forbidden(
            "the admin role is required".into(),
        )))
    }
}

#[utoipa::path(post, path = "/admin/drain", responses(
    (status = 202, body = DrainStatus, description = "the drain has started (or was already under way)"),
    (status = 401, body = ErrorReply), (status = 403, body = ErrorReply)),
    security(("bearer" = [])))]
async fn start_drain(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
) -> Result<(StatusCode, Json<DrainStatus>), ApiError> {
    require_admin(&who)?;
    if gw.drain.begin("POST /admin/drain") {
        tracing::info!(target: "audit", admin = %who.user_id.escape_debug(), "drain requested");
    }
    Ok((StatusCode::ACCEPTED, Json(drain_status(&gw))))
}

#[utoipa::path(get, path = "/admin/drain", responses(
    (status = 200, body = DrainStatus), (status = 401, body = ErrorReply), (status = 403, body = ErrorReply)),
    security(("bearer" = [])))]
async fn get_drain(
    State(gw): State<Arc<Gateway>>,
    Caller(who): Caller,
) -> Result<Json<DrainStatus>, ApiError> {
    require_admin(&who)?;
    Ok(Json(drain_status(&gw)))
}

/// While draining, new realtime connections are refused with 503 + `Retry-After`: a Socket.IO
/// handshake (no `sid` yet) or a `/ws` upgrade. Sessions already open go on until their slot.
pub async fn refuse_while_draining(
    State(gw): State<Arc<Gateway>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if gw.drain.is_draining() {
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or_default();
        let new_socketio =
            path.starts_with("/socket.io") && !query.split('&').any(|kv| kv.starts_with("sid="));
        if new_socketio || path == "/ws" {
            let body = ErrorReply {
                error: ErrorBody {
                    code: "unavailable".into(),
                    message: "this gateway is draining; connect to another one".into(),
                },
            };
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
    }
    next.run(req).await
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Confab gateway HTTP API", description = "Conversations, members and history. Realtime events are on /socket.io/."),
    paths(create_conversation, list_conversations, get_conversation, add_member, remove_member, messages, upload_attachment, download_attachment, attachment_thumbnail, healthz, readyz, start_drain, get_drain),
    components(schemas(Conversation, ConversationSummary, ConversationKind, Member, MemberRole, Message, MessageKind, Attachment, MessageAttachment, AttachmentReply)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError(ChatError::not_found("no such route"))
}

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/api/conversations",
            post(create_conversation).get(list_conversations),
        )
        .route("/api/conversations/{id}", get(get_conversation))
        .route("/api/conversations/{id}/members", post(add_member))
        .route(
            "/api/conversations/{id}/members/{user_id}",
            delete(remove_member),
        )
        .route("/api/conversations/{id}/messages", get(messages))
        .route(
            "/api/conversations/{id}/attachments",
            post(upload_attachment),
        )
        .route("/api/attachments/{id}", get(download_attachment))
        .route("/api/attachments/{id}/thumbnail", get(attachment_thumbnail))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/drain", post(start_drain).get(get_drain))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
}
