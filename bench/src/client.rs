//! One generator connection: TCP from a chosen 127.x source address, WebSocket upgrade, handshake.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::wire::{self, Incoming, Transport};

pub type Ws = WebSocketStream<TcpStream>;

/// An open, authenticated connection.
pub struct Client {
    pub ws: Ws,
    pub transport: Transport,
    next_id: u64,
}

fn host_port(base: &str) -> Result<SocketAddr> {
    let hp = base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    hp.parse()
        .with_context(|| format!("server address {hp:?} must be IP:PORT"))
}

/// Opens a connection from `source` (each 127.x address has its own ephemeral-port range, which
/// is how one machine holds more connections than one address's ports allow).
pub async fn connect(
    base: &str,
    transport: Transport,
    token: &str,
    source: IpAddr,
) -> Result<Client> {
    let addr = host_port(base)?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding source address {source}"))?;
    let tcp = sock.connect(addr).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    // Small buffers keep the generator's own memory low at 19k connections per process.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let url = transport.url(base, token);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(cfg))
        .await
        .context("websocket upgrade")?;
    let mut c = Client {
        ws,
        transport,
        next_id: 0,
    };
    if transport == Transport::Sio {
        c.ws.send(Message::text(wire::sio_connect(token))).await?;
    }
    // The handshake has a deadline so a stuck server shows up as a failed connect, not a hang.
    tokio::time::timeout(Duration::from_secs(30), c.await_connected())
        .await
        .map_err(|_| anyhow!("no connect confirmation within 30 s"))??;
    Ok(c)
}

impl Client {
    async fn await_connected(&mut self) -> Result<()> {
        loop {
            let text = self.next_text().await?;
            match wire::classify(self.transport, &text) {
                Incoming::Connected => return Ok(()),
                Incoming::Refused(why) => bail!("refused: {why}"),
                Incoming::Ping => self.ws.send(Message::text(wire::PONG)).await?,
                _ => {}
            }
        }
    }

    /// The next text frame; closes and errors end the connection.
    pub async fn next_text(&mut self) -> Result<String> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection ended"),
            }
        }
    }

    /// Sends a request and returns its ack id.
    pub async fn send_request(&mut self, event: &str, payload: &Value) -> Result<u64> {
        self.next_id += 1;
        let id = self.next_id;
        self.ws
            .send(Message::text(wire::request(
                self.transport,
                id,
                event,
                payload,
            )))
            .await?;
        Ok(id)
    }

    /// Sends a request and waits for its ack, answering pings and skipping events meanwhile
    /// (used only during set-up and recovery, where events are handled by the caller's `on_event`).
    pub async fn call(
        &mut self,
        event: &str,
        payload: &Value,
        mut on_event: impl FnMut(&str),
    ) -> Result<Value> {
        let want = self.send_request(event, payload).await?;
        loop {
            let text = self.next_text().await?;
            match wire::classify(self.transport, &text) {
                Incoming::Ack { id, body } if id == want => {
                    let v: Value = serde_json::from_str(body)?;
                    if let Some(e) = v.get("error").or_else(|| {
                        (v.get("type").and_then(Value::as_str) == Some("error"))
                            .then(|| &v["payload"])
                    }) {
                        bail!("{event} failed: {e}");
                    }
                    return Ok(v);
                }
                Incoming::Ping => self.ws.send(Message::text(wire::PONG)).await?,
                Incoming::Event { frame } => on_event(frame),
                Incoming::Refused(why) => bail!("{event} refused: {why}"),
                _ => {}
            }
        }
    }
}
