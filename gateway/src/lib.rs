//! Confab gateway: holds users' realtime connections and runs the chat protocol.
//!
//! - [`config`]: the one configuration tree (flags with `CONFAB_*` env twins).
//! - [`app`]: wires config → backends → [`chat::ChatService`] → router; `serve(listener, shutdown)`.
//! - [`chat`]: the domain — conversations, membership rules, messages, delivery, typing, presence.
//! - [`attachments`]: attachment bytes behind `AttachmentStore` (a local directory, or S3), with
//!   content sniffing and thumbnails.
//! - [`store`]: persistence behind `Store` (SQLite embedded, or Postgres), with its contract tests.
//! - [`bus`]: events between gateways behind `Bus` (in-process, RabbitMQ or Redis pub/sub).
//! - [`presence`]: who is online and typing behind `Presence` (in memory, or Redis with the node registry).
//! - [`limits`]: token-bucket rate limits behind `Limits` (in memory, or shared in Redis).
//! - [`redis`]: connection settings shared by the Redis backends.
//! - [`server`]: the HTTP accept loop: header, body and idle timeouts, connection caps.
//! - [`auth`]: JWT verification and minting.
//! - [`transport`]: Socket.IO, HTTP API, origin checks, and the wire types they share.
//! - [`telemetry`]: metrics (`/metrics`, OTLP), logs, audit events and spans.

pub mod app;
pub mod attachments;
pub mod auth;
pub mod bus;
pub mod chat;
pub mod config;
pub mod drain;
pub mod limits;
pub mod presence;
pub mod redis;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod transport;
