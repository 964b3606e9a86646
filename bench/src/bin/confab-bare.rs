//! The near-limit reference: a bare tokio-tungstenite room broadcaster with no chat logic.
//!
//! It speaks just enough of `/ws` for the generator (`join_conversation`, `send_message`, acks):
//! no auth, no store, no seq bookkeeping beyond a counter. A delivery to a full queue is dropped
//! (the generator counts what arrives); an ack never is. A broadcast is serialised once and the
//! bytes shared; each connection's writer feeds what is queued and flushes once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Tx = mpsc::Sender<Utf8Bytes>;

#[derive(Default)]
struct Rooms {
    members: RwLock<HashMap<String, Vec<(u64, Tx)>>>,
    seq: AtomicU64,
    next_conn: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let listen = std::env::var("BARE_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&listen).await?;
    println!(
        "Bare broadcaster listening on http://{}",
        listener.local_addr()?
    );
    let rooms = Arc::new(Rooms::default());
    loop {
        let (tcp, peer) = listener.accept().await?;
        let rooms = rooms.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(tcp, peer, rooms).await {
                // Clients come and go in storms; only odd failures are worth a line.
                if !e.to_string().contains("Connection reset") {
                    eprintln!("{peer}: {e}");
                }
            }
        });
    }
}

async fn serve(tcp: TcpStream, _peer: SocketAddr, rooms: Arc<Rooms>) -> Result<()> {
    tcp.set_nodelay(true)?;
    // Frames fed are buffered up to 16 KiB and written by the flush: with a write buffer of 0,
    // tungstenite writes every frame to the socket as it is fed (one syscall per delivery),
    // which capped this "near-limit" reference at ~130k deliveries/s, below Confab itself.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024);
    let ws = tokio_tungstenite::accept_async_with_config(tcp, Some(cfg)).await?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(1024);
    let me = rooms.next_conn.fetch_add(1, Ordering::Relaxed);
    let writer = tokio::spawn(async move {
        sink.send(Message::text(r#"{"type":"connected","payload":{}}"#))
            .await?;
        while let Some(first) = rx.recv().await {
            sink.feed(Message::Text(first)).await?;
            while let Ok(more) = rx.try_recv() {
                sink.feed(Message::Text(more)).await?;
            }
            sink.flush().await?;
        }
        anyhow::Ok(())
    });
    let mut joined: Vec<String> = Vec::new();
    while let Some(msg) = stream.next().await {
        let Message::Text(text) = msg? else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        let id = frame.get("id").cloned().unwrap_or(Value::Null);
        let payload = &frame["payload"];
        let room = payload["conversationId"].as_str().unwrap_or_default();
        match frame["type"].as_str().unwrap_or_default() {
            "join_conversation" => {
                rooms
                    .members
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(room.to_owned())
                    .or_default()
                    .push((me, tx.clone()));
                joined.push(room.to_owned());
                let ack = json!({"type":"ack","id":id,"payload":{"lastSeq":0}});
                let _ = tx.try_send(ack.to_string().into());
            }
            "send_message" => {
                let seq = rooms.seq.fetch_add(1, Ordering::Relaxed) + 1;
                let event: Utf8Bytes = json!({"type":"new_message","payload":{
                    "conversationId": room, "seq": seq, "content": payload["content"]}})
                .to_string()
                .into();
                {
                    // try_send never waits, so delivering under the read lock holds it briefly.
                    let members = rooms.members.read().unwrap_or_else(|p| p.into_inner());
                    for (_, t) in members.get(room).into_iter().flatten() {
                        // A full queue drops here; the generator counts what arrives.
                        let _ = t.try_send(event.clone());
                    }
                }
                let ack = json!({"type":"ack","id":id,"payload":{"seq":seq}});
                // The ack waits for room in the sender's own queue (it is a member too, so its
                // queue fills with the room's traffic): a dropped ack would leave a delivered
                // message unaccounted for. The wait slows this sender's reads: backpressure.
                if tx.send(ack.to_string().into()).await.is_err() {
                    break;
                }
            }
            _ => {}
        }
    }
    let mut members = rooms.members.write().unwrap_or_else(|p| p.into_inner());
    for r in joined {
        if let Some(m) = members.get_mut(&r) {
            m.retain(|(c, _)| *c != me);
        }
    }
    drop(members);
    writer.abort();
    Ok(())
}
