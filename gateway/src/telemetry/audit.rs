//! The audit log: one INFO event under the `audit` target for each connect, auth failure,
//! membership change and admin action. User-controlled values are Debug-formatted (`?`), so
//! control characters in them are escaped and cannot forge a log line.

use std::net::IpAddr;

use super::Transport;

/// The target every audit event is logged under (`RUST_LOG=audit=info` keeps just these).
pub const TARGET: &str = "audit";

pub fn connected(transport: Transport, user: &str, conn: u64, address: Option<IpAddr>) {
    tracing::info!(
        target: TARGET,
        action = "connect",
        transport = transport.as_str(),
        user = ?user,
        conn,
        address = ?address,
        "connection opened"
    );
}

pub fn disconnected(transport: Transport, user: &str, conn: u64) {
    tracing::info!(
        target: TARGET,
        action = "disconnect",
        transport = transport.as_str(),
        user = ?user,
        conn,
        "connection closed"
    );
}

/// A token was refused. `reason` is the stable label; `detail` is the verifier's message.
pub fn auth_failed(
    transport: Transport,
    reason: &'static str,
    detail: &dyn std::fmt::Display,
    address: Option<IpAddr>,
) {
    tracing::info!(
        target: TARGET,
        action = "auth_failure",
        transport = transport.as_str(),
        reason,
        detail = ?detail.to_string(),
        address = ?address,
        "token refused"
    );
}

/// `action`: `join`, `leave`, `member_added`, `member_removed`, `conversation_created`.
pub fn membership(
    action: &'static str,
    conversation: &dyn std::fmt::Display,
    actor: &str,
    member: &str,
) {
    tracing::info!(
        target: TARGET,
        action,
        conversation = %conversation,
        actor = ?actor,
        member = ?member,
        "membership changed"
    );
}

/// An operator's or admin's action (e.g. drain, or an admin acting outside their own
/// membership): `actor` is the user id, or `None` for the operator's unauthenticated endpoints.
pub fn admin(action: &'static str, actor: Option<&str>, detail: &dyn std::fmt::Debug) {
    tracing::info!(
        target: TARGET,
        action,
        actor = ?actor,
        detail = ?detail,
        "admin action"
    );
}
