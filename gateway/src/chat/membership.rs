//! Membership: conversations, their members, and connections joining and leaving them.

use super::error::ChatError;
use super::event::{ConversationIdRef, ConversationRef, ConversationUser, Event, Route, Topic};
use super::hub::ConnId;
use super::model::{
    Conversation, ConversationId, ConversationKind, ConversationSummary, Identity, MemberRole,
    UserId,
};
use super::service::ChatService;
use super::state::MembershipChange;
use super::{CreateConversation, Joined, check_text, check_user_id, rules, store_err};
use crate::limits::LimitClass;
use crate::store::NewConversation;
use crate::telemetry::audit;

impl ChatService {
    pub async fn create_conversation(
        &self,
        who: &Identity,
        req: CreateConversation,
    ) -> Result<Conversation, ChatError> {
        if let Some(title) = &req.title {
            check_text("title", title, 200, false)?;
        }
        let mut others: Vec<UserId> = Vec::new();
        for m in &req.members {
            check_user_id("members[]", m)?;
            if *m != who.user_id && !others.contains(m) {
                others.push(m.clone());
            }
        }
        if others.len() + 1 > self.settings.max_members {
            return Err(ChatError::invalid(format!(
                "a conversation has at most {} members",
                self.settings.max_members
            )));
        }
        match req.kind {
            ConversationKind::Direct if others.len() != 1 => {
                return Err(ChatError::invalid(
                    "a direct conversation needs exactly one other member",
                ));
            }
            ConversationKind::Support if req.department_id.is_none() => {
                return Err(ChatError::invalid(
                    "a support conversation needs a departmentId",
                ));
            }
            _ => {}
        }
        if let Some(d) = &req.department_id {
            check_user_id("departmentId", d)?;
            if req.kind != ConversationKind::Support {
                return Err(ChatError::invalid(
                    "departmentId is only for support conversations",
                ));
            }
        }
        let mut members = vec![(who.user_id.clone(), MemberRole::Owner)];
        members.extend(others.iter().map(|u| (u.clone(), MemberRole::Member)));
        let conversation = self
            .store
            .create_conversation(NewConversation {
                kind: req.kind,
                title: req.title,
                department_id: req.department_id.clone(),
                members: members.clone(),
            })
            .await
            .map_err(store_err)?;
        tracing::info!(conversation = %conversation.id, kind = conversation.kind.as_str(), "conversation created");
        audit::membership(
            "conversation_created",
            &conversation.id,
            &who.user_id,
            &who.user_id,
        );
        if who.is_admin() {
            audit::admin("create_conversation", Some(&who.user_id), &conversation.id);
        }
        let ids = members.into_iter().map(|(u, _)| u).collect();
        self.publish(
            Route::Users { ids },
            Event::ConversationAdded(ConversationRef {
                conversation: conversation.clone(),
            }),
        )
        .await;
        if let Some(department) = req.department_id {
            self.publish(
                Route::Department { id: department },
                Event::ConversationCreated(ConversationRef {
                    conversation: conversation.clone(),
                }),
            )
            .await;
        }
        Ok(conversation)
    }

    pub async fn conversations(
        &self,
        who: &Identity,
    ) -> Result<Vec<ConversationSummary>, ChatError> {
        self.summaries.of(&self.store, &who.user_id).await
    }

    pub async fn conversation(
        &self,
        who: &Identity,
        id: ConversationId,
    ) -> Result<Conversation, ChatError> {
        self.participating(id, who).await
    }

    pub async fn add_member(
        &self,
        who: &Identity,
        id: ConversationId,
        user: &str,
    ) -> Result<(), ChatError> {
        check_user_id("userId", user)?;
        let conversation = self.load(id).await?;
        let actor = self.member(id, &who.user_id).await?;
        if actor.is_none() && !who.is_admin() && !rules::agent_may_see(&conversation, who) {
            // Strangers, agents included, cannot probe which conversations exist.
            return Err(ChatError::not_found("no such conversation"));
        }
        rules::can_add_member(&conversation, actor.as_ref(), who)?;
        let count = self.store.members(id).await.map_err(store_err)?.len();
        if count >= self.settings.max_members {
            return Err(ChatError::Conflict(format!(
                "the conversation already has {} members",
                self.settings.max_members
            )));
        }
        let added = self
            .store
            .add_member(id, user, MemberRole::Member)
            .await
            .map_err(store_err)?;
        if let Some(version) = added {
            audit::membership("member_added", &id, &who.user_id, user);
            if actor.is_none() && who.is_admin() {
                audit::admin("add_member", Some(&who.user_id), &(id, user));
            }
            self.publish(
                Route::Users {
                    ids: vec![user.to_owned()],
                },
                Event::ConversationAdded(ConversationRef { conversation }),
            )
            .await;
            self.announce_member(id, user, MemberRole::Member, version)
                .await;
        }
        Ok(())
    }

    /// `user_joined` to the room: `user` has just become a member of conversation `id`.
    pub(super) async fn announce_member(
        &self,
        id: ConversationId,
        user: &str,
        role: MemberRole,
        version: i64,
    ) {
        self.publish_membership(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::UserJoined(ConversationUser {
                conversation_id: id,
                user_id: user.to_owned(),
            }),
            MembershipChange {
                conversation_id: id,
                user_id: user.to_owned(),
                role: Some(role),
                version,
            },
        )
        .await;
    }

    pub async fn remove_member(
        &self,
        who: &Identity,
        id: ConversationId,
        user: &str,
    ) -> Result<(), ChatError> {
        let conversation = self.load(id).await?;
        let actor = self.member(id, &who.user_id).await?;
        if actor.is_none() && !who.is_admin() {
            return Err(ChatError::not_found("no such conversation"));
        }
        rules::can_remove_member(&conversation, actor.as_ref(), who, user)?;
        let removed = self
            .store
            .remove_member(id, user)
            .await
            .map_err(store_err)?;
        let Some(version) = removed else {
            return Err(ChatError::not_found(
                "that user is not a member of this conversation",
            ));
        };
        audit::membership("member_removed", &id, &who.user_id, user);
        if actor.is_none() && who.is_admin() {
            audit::admin("remove_member", Some(&who.user_id), &(id, user));
        }
        // The removed user's connections leave the room before anything else is delivered,
        // on every node: those holding the user (its topic) and those holding the conversation.
        let removed = MembershipChange {
            conversation_id: id,
            user_id: user.to_owned(),
            role: None,
            version,
        };
        self.publish_membership(
            Route::Users {
                ids: vec![user.to_owned()],
            },
            Event::ConversationRemoved(ConversationIdRef {
                conversation_id: id,
            }),
            removed.clone(),
        )
        .await;
        self.publish_membership(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::UserLeft(ConversationUser {
                conversation_id: id,
                user_id: user.to_owned(),
            }),
            removed,
        )
        .await;
        Ok(())
    }

    // ---- realtime requests ---------------------------------------------------------------

    /// Puts the connection in a conversation's room, making the caller a member first where
    /// the rules allow it (open conversations; support ones for their department's agents).
    /// A member's connections are in their rooms from connect on: for them this is cheap, and
    /// the member list is read only when asked for.
    pub async fn join(
        &self,
        conn: ConnId,
        who: &Identity,
        id: ConversationId,
    ) -> Result<Joined, ChatError> {
        self.join_with(conn, who, id, true).await
    }

    pub async fn join_with(
        &self,
        conn: ConnId,
        who: &Identity,
        id: ConversationId,
        with_members: bool,
    ) -> Result<Joined, ChatError> {
        self.throttle(LimitClass::UserJoins, &who.user_id).await?;
        let in_room = self.hub.is_in_room(conn, id);
        // From the node's conversation state: no store read for a member's join.
        let state = self.state(id).await?;
        let member = state.member(&who.user_id);
        let role = rules::join_role(&state.conversation, member.as_ref(), who).map_err(|e| {
            // An agent probing conversations outside its departments learns nothing: the same
            // answer as for an id that does not exist.
            if who.is_agent() && !who.is_admin() {
                ChatError::not_found("no such conversation")
            } else {
                e
            }
        })?;
        let newly = match role {
            Some(role) => self
                .store
                .add_member(id, &who.user_id, role)
                .await
                .map_err(store_err)?
                .map(|version| (role, version)),
            None => None,
        };
        let change = self
            .hub
            .join(conn, id)
            .ok_or_else(|| ChatError::Unauthorized("the connection is closed".into()))?;
        self.apply(change).await;
        self.bound(&Topic::Conversation(id)).await;
        // `user_joined` announces a new member. A member's connection (re)joining the room is
        // not news: presence (`user_online`) covers it, and after a drain every reconnect would
        // otherwise reach every member of the room (clients × members events in one window).
        if let Some((role, version)) = newly {
            audit::membership("join", &id, &who.user_id, &who.user_id);
            self.announce_member(id, &who.user_id, role, version).await;
        }
        let members = if with_members {
            Some(self.store.members(id).await.map_err(store_err)?)
        } else {
            None
        };
        // A connection already in the room reads last_seq after it entered; one that just
        // entered reads it again (the conversation's topic is bound now, so the state is kept
        // up to date by its events from here on), so sync from it loses nothing.
        let conversation = if in_room {
            state.conversation()
        } else {
            self.state(id).await?.conversation()
        };
        Ok(Joined {
            last_seq: conversation.last_seq,
            conversation,
            members,
        })
    }

    pub async fn leave(
        &self,
        conn: ConnId,
        who: &Identity,
        id: ConversationId,
    ) -> Result<(), ChatError> {
        if !self.hub.is_in_room(conn, id) {
            return Err(ChatError::invalid(
                "this connection has not joined that conversation",
            ));
        }
        let change = self.hub.leave(conn, id);
        self.apply(change).await;
        self.publish(
            Route::Conversation {
                id,
                also_users: vec![],
            },
            Event::UserLeft(ConversationUser {
                conversation_id: id,
                user_id: who.user_id.clone(),
            }),
        )
        .await;
        Ok(())
    }
}
