//! The contract every `Bus` must meet: what is published to a held topic arrives, once, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use super::Bus;
use crate::chat::event::{Envelope, Event, Route, Topic};
use crate::chat::model::{Message, MessageKind};

pub fn envelope_for(conversation: Uuid, seq: i64) -> Envelope {
    Envelope {
        id: Uuid::now_v7(),
        origin: "contract".into(),
        route: Route::Conversation {
            id: conversation,
            also_users: vec![],
        },
        event: Event::NewMessage(Message {
            id: Uuid::now_v7(),
            conversation_id: conversation,
            seq,
            sender_id: "contract-sender".into(),
            sender_name: "Sender".into(),
            kind: MessageKind::Text,
            content: format!("message {seq}"),
            client_msg_id: format!("c{seq}"),
            created_at: Utc::now(),
            ..Message::default()
        }),
        // Crosses the wire too: every node times the delivery from it.
        committed_at_us: Some(1_700_000_000_000_000 + seq),
        membership: None,
    }
}

pub async fn run(bus: &dyn Bus) {
    let received: Arc<Mutex<Vec<Arc<Envelope>>>> = Arc::default();
    let sink = received.clone();
    bus.attach(Arc::new(move |e| sink.lock().expect("lock").push(e)));
    let conversation = Uuid::now_v7();
    bus.subscribe(Topic::Conversation(conversation))
        .await
        .expect("subscribe");
    assert!(bus.ready().await);
    let sent: Vec<Envelope> = (1..=20)
        .map(|seq| envelope_for(conversation, seq))
        .collect();
    for e in &sent {
        bus.publish(Arc::new(e.clone())).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mine = received
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| matches!(&e.route, Route::Conversation { id, .. } if *id == conversation))
            .count();
        if mine >= sent.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got: Vec<Envelope> = received
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| matches!(&e.route, Route::Conversation { id, .. } if *id == conversation))
        .map(|e| (**e).clone())
        .collect();
    assert_eq!(
        got, sent,
        "every envelope arrives once, in publish order, unchanged"
    );
    bus.unsubscribe(Topic::Conversation(conversation))
        .await
        .expect("unsubscribe");
}

type Inbox = Arc<Mutex<Vec<Arc<Envelope>>>>;

fn inbox(bus: &dyn Bus) -> Inbox {
    let received: Inbox = Arc::default();
    let sink = received.clone();
    bus.attach(Arc::new(move |e| sink.lock().expect("lock").push(e)));
    received
}

fn of_conversation(inbox: &Inbox, conversation: Uuid) -> Vec<Envelope> {
    inbox
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| match &e.route {
            Route::Conversation { id, .. } => *id == conversation,
            Route::Users { .. } | Route::Department { .. } => match &e.event {
                crate::chat::event::Event::NewMessage(m) => m.conversation_id == conversation,
                _ => false,
            },
        })
        .map(|e| (**e).clone())
        .collect()
}

async fn wait_for(inbox: &Inbox, conversation: Uuid, count: usize) -> Vec<Envelope> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = of_conversation(inbox, conversation);
        if got.len() >= count || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two bus instances are two nodes: what one publishes to a topic the other holds arrives
/// there once (even when the route names several held topics), in publish order; a topic
/// given up stops arriving.
pub async fn run_two_nodes(a: &dyn Bus, b: &dyn Bus) {
    let at_a = inbox(a);
    let at_b = inbox(b);
    let conversation = Uuid::now_v7();
    let user = format!("contract-user-{}", Uuid::now_v7().simple());
    b.subscribe(Topic::Conversation(conversation))
        .await
        .expect("subscribe");
    b.subscribe(Topic::User(user.clone()))
        .await
        .expect("subscribe");
    assert!(a.ready().await && b.ready().await);
    let sent: Vec<Envelope> = (1..=20)
        .map(|seq| {
            let mut e = envelope_for(conversation, seq);
            // Every other envelope also names a user b holds: b must still get it once.
            if seq % 2 == 0 {
                e.route = Route::Conversation {
                    id: conversation,
                    also_users: vec![user.clone()],
                };
            }
            e
        })
        .collect();
    for e in &sent {
        a.publish(Arc::new(e.clone())).await.expect("publish");
    }
    let got = wait_for(&at_b, conversation, sent.len()).await;
    assert_eq!(got, sent, "b gets each envelope once, in order, unchanged");
    // Give stray duplicates time to show up before counting them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(of_conversation(&at_b, conversation).len(), sent.len());
    assert_eq!(
        of_conversation(&at_a, conversation),
        sent,
        "the publisher's own node delivers locally, once"
    );

    // A route to users only: reaches the node holding that user.
    let mut direct = envelope_for(conversation, 21);
    direct.route = Route::Users {
        ids: vec![user.clone(), "nobody-holds-this".into()],
    };
    a.publish(Arc::new(direct.clone())).await.expect("publish");
    let got = wait_for(&at_b, conversation, sent.len() + 1).await;
    assert_eq!(got.last(), Some(&direct));

    b.unsubscribe(Topic::Conversation(conversation))
        .await
        .expect("unsubscribe");
    b.unsubscribe(Topic::User(user.clone()))
        .await
        .expect("unsubscribe");
    let after = envelope_for(conversation, 22);
    a.publish(Arc::new(after)).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        of_conversation(&at_b, conversation).len(),
        sent.len() + 1,
        "nothing arrives for a topic given up"
    );

    // And the other way round.
    let back = Uuid::now_v7();
    a.subscribe(Topic::Conversation(back))
        .await
        .expect("subscribe");
    let reply = envelope_for(back, 1);
    b.publish(Arc::new(reply.clone())).await.expect("publish");
    assert_eq!(wait_for(&at_a, back, 1).await, vec![reply]);
}
