//! One generator connection: TCP from a chosen 127.x source address, WebSocket upgrade, handshake.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::net::TcpSocket;

use crate::wire::{self, Incoming, Transport};
use crate::ws::Conn;

/// An open, authenticated connection.
pub struct Client {
    pub conn: Conn,
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
    connect_resuming(base, transport, token, source, None).await
}

/// [`connect`] with resume cursors (`{conversationId: lastSeq}`) in the handshake: the server
/// replays what was missed before any live event.
pub async fn connect_resuming(
    base: &str,
    transport: Transport,
    token: &str,
    source: IpAddr,
    cursors: Option<&Value>,
) -> Result<Client> {
    let addr = host_port(base)?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding source address {source}"))?;
    let tcp = sock.connect(addr).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let conn = Conn::upgrade(tcp, addr, &transport.path(token, cursors))
        .await
        .context("websocket upgrade")?;
    let mut c = Client {
        conn,
        transport,
        next_id: 0,
    };
    if transport == Transport::Sio {
        c.conn.send_text(&wire::sio_connect(token, cursors)).await?;
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
            let text = self.conn.next_text().await?;
            match wire::classify(self.transport, &text) {
                Incoming::Connected => return Ok(()),
                Incoming::Refused(why) => bail!("refused: {why}"),
                Incoming::Ping => self.conn.send_text(wire::PONG).await?,
                _ => {}
            }
        }
    }

    /// The id the next request gets.
    pub fn next_request_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends a request and returns its ack id.
    pub async fn send_request(&mut self, event: &str, payload: &Value) -> Result<u64> {
        let id = self.next_request_id();
        self.conn
            .send_text(&wire::request(self.transport, id, event, payload))
            .await?;
        Ok(id)
    }

    /// Sends a request and waits for its ack, answering pings meanwhile; events go to `on_event`
    /// (set-up only: the timed phase handles acks in the worker's receive loop).
    pub async fn call(
        &mut self,
        event: &str,
        payload: &Value,
        mut on_event: impl FnMut(&str),
    ) -> Result<Value> {
        let want = self.send_request(event, payload).await?;
        loop {
            let text = self.conn.next_text().await?;
            match wire::classify(self.transport, &text) {
                Incoming::Ack { id, body } if id == want => {
                    let v: Value = serde_json::from_str(body)?;
                    if let Some(e) = wire::ack_error(&v) {
                        bail!("{event} failed: {e}");
                    }
                    return Ok(v);
                }
                Incoming::Ping => self.conn.send_text(wire::PONG).await?,
                Incoming::Event { frame } => on_event(frame),
                Incoming::Refused(why) => bail!("{event} refused: {why}"),
                _ => {}
            }
        }
    }
}
