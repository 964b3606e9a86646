//! The contract every `Presence` must meet: online from the first connection to the last, announced once.

use std::time::Duration;

use super::Presence;
use crate::chat::model::Status;

pub async fn run(presence: &dyn Presence) {
    let user = format!("presence-{}", uuid::Uuid::now_v7().simple());
    let never = format!("presence-never-{}", uuid::Uuid::now_v7().simple());
    assert!(!presence.is_online(&user).await.expect("is_online"));
    assert!(
        presence.connect(&user, "node-a:1").await.expect("connect"),
        "first connection"
    );
    assert!(
        !presence.connect(&user, "node-b:7").await.expect("connect"),
        "second device"
    );
    assert!(presence.is_online(&user).await.expect("is_online"));
    assert_eq!(
        presence
            .disconnect(&user, "node-a:1")
            .await
            .expect("disconnect"),
        1
    );
    assert!(
        presence.is_online(&user).await.expect("is_online"),
        "one device left"
    );
    let statuses = presence
        .statuses(&[user.clone(), never.clone()])
        .await
        .expect("statuses");
    assert_eq!(statuses[&user].status, Status::Online);
    assert_eq!(statuses[&never].status, Status::Offline);
    assert_eq!(statuses[&never].last_seen, None);
    assert_eq!(
        presence
            .disconnect(&user, "node-b:7")
            .await
            .expect("disconnect"),
        0
    );
    assert!(!presence.is_online(&user).await.expect("is_online"));
    let statuses = presence
        .statuses(std::slice::from_ref(&user))
        .await
        .expect("statuses");
    assert_eq!(statuses[&user].status, Status::Offline);
    assert!(
        statuses[&user].last_seen.is_some(),
        "last seen is stamped on the last disconnect"
    );
    // Still announced online until the grace ends: a reconnect now is no new "online".
    assert!(
        !presence.connect(&user, "node-b:8").await.expect("connect"),
        "a reconnect inside the grace is not announced"
    );
    assert!(
        !presence.settle_offline(&user).await.expect("settle"),
        "a user with a connection does not go offline"
    );
    assert_eq!(
        presence
            .disconnect(&user, "node-b:8")
            .await
            .expect("disconnect"),
        0
    );
    assert!(
        presence.settle_offline(&user).await.expect("settle"),
        "offline once the grace ends with no connection"
    );
    assert!(
        !presence.settle_offline(&user).await.expect("settle"),
        "and only once"
    );
    assert!(
        presence.connect(&user, "node-a:2").await.expect("connect"),
        "back online"
    );
    assert_eq!(
        presence
            .disconnect(&user, "node-a:2")
            .await
            .expect("disconnect"),
        0
    );
    assert!(presence.settle_offline(&user).await.expect("settle"));
    typing(presence).await;
}

async fn typing(presence: &dyn Presence) {
    let c = uuid::Uuid::now_v7();
    let ttl = Duration::from_secs(5);
    let (new, first) = presence
        .typing_start(c, "typist", ttl)
        .await
        .expect("start");
    assert!(new, "a first start is new");
    assert!(presence.is_typing(c, "typist").await.expect("is_typing"));
    let (new, second) = presence
        .typing_start(c, "typist", ttl)
        .await
        .expect("renew");
    assert!(!new, "a renewal is not new");
    assert!(
        !presence
            .typing_expire(c, "typist", first)
            .await
            .expect("expire"),
        "a stale expiry is ignored"
    );
    assert!(presence.is_typing(c, "typist").await.expect("is_typing"));
    assert!(
        presence
            .typing_expire(c, "typist", second)
            .await
            .expect("expire")
    );
    assert!(!presence.is_typing(c, "typist").await.expect("is_typing"));
    presence
        .typing_start(c, "typist", ttl)
        .await
        .expect("start");
    assert!(presence.typing_stop(c, "typist").await.expect("stop"));
    assert!(
        !presence.typing_stop(c, "typist").await.expect("stop"),
        "stopping twice"
    );
}
