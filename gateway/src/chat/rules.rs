//! Authorization rules: who may read, join, add and remove, by conversation kind and role.

use super::error::ChatError;
use super::model::{Conversation, ConversationKind, Identity, Member, MemberRole};

/// Whether `who` may read and write in the conversation as it stands.
pub fn can_participate(member: Option<&Member>) -> Result<(), ChatError> {
    match member {
        Some(_) => Ok(()),
        None => Err(ChatError::forbidden(
            "you are not a member of this conversation",
        )),
    }
}

/// The role `who` gets by joining, or why they may not. `Ok(None)`: already a member.
pub fn join_role(
    conversation: &Conversation,
    member: Option<&Member>,
    who: &Identity,
) -> Result<Option<MemberRole>, ChatError> {
    if member.is_some() {
        return Ok(None);
    }
    match conversation.kind {
        ConversationKind::Open => Ok(Some(MemberRole::Member)),
        ConversationKind::Support
            if who.is_agent()
                && conversation
                    .department_id
                    .as_deref()
                    .is_some_and(|d| who.is_admin() || who.in_department(d)) =>
        {
            Ok(Some(MemberRole::Agent))
        }
        _ => Err(ChatError::forbidden(
            "you are not a member of this conversation",
        )),
    }
}

/// Whether the conversation is one an agent works on without being a member: a support
/// conversation of one of its departments.
pub fn agent_may_see(conversation: &Conversation, who: &Identity) -> bool {
    who.is_agent()
        && conversation.kind == ConversationKind::Support
        && conversation
            .department_id
            .as_deref()
            .is_some_and(|d| who.in_department(d))
}

/// Whether `actor` may add someone to the conversation.
pub fn can_add_member(
    conversation: &Conversation,
    actor_member: Option<&Member>,
    actor: &Identity,
) -> Result<(), ChatError> {
    if conversation.kind == ConversationKind::Direct {
        return Err(ChatError::Conflict(
            "a direct conversation has exactly two members; create a group instead".into(),
        ));
    }
    if actor_member.is_some() || actor.is_admin() {
        return Ok(());
    }
    if conversation.kind == ConversationKind::Support
        && actor.is_agent()
        && conversation
            .department_id
            .as_deref()
            .is_some_and(|d| actor.in_department(d))
    {
        return Ok(());
    }
    Err(ChatError::forbidden(
        "only members may add members to this conversation",
    ))
}

/// Whether `actor` may remove `target` from the conversation.
pub fn can_remove_member(
    conversation: &Conversation,
    actor_member: Option<&Member>,
    actor: &Identity,
    target: &str,
) -> Result<(), ChatError> {
    if conversation.kind == ConversationKind::Direct {
        return Err(ChatError::Conflict(
            "members of a direct conversation cannot change".into(),
        ));
    }
    if target == actor.user_id || actor.is_admin() {
        return Ok(());
    }
    match actor_member.map(|m| m.role) {
        Some(MemberRole::Owner) | Some(MemberRole::Agent) => Ok(()),
        Some(MemberRole::Member) => Err(ChatError::forbidden(
            "only the conversation's owner, its agents or an admin may remove others",
        )),
        None => Err(ChatError::forbidden(
            "you are not a member of this conversation",
        )),
    }
}

/// Whether `actor` may delete a message `sender` sent: their own, or anything as one of the
/// conversation's moderators (its creator, or an agent of a support conversation's
/// department).
pub fn can_delete(
    conversation: &Conversation,
    actor_member: Option<&Member>,
    actor: &Identity,
    sender: &str,
) -> Result<(), ChatError> {
    if sender == actor.user_id || actor_member.is_some_and(|m| m.role == MemberRole::Owner) {
        return Ok(());
    }
    if agent_may_see(conversation, actor) {
        return Ok(());
    }
    Err(ChatError::forbidden(
        "only the sender or the conversation's moderators may delete a message",
    ))
}
