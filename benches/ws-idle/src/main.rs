//! Resident memory per idle WebSocket connection, for the gateway's `/ws` and for bare servers on candidate libraries.
//!
//! `ws-idle gateway PATH/TO/confab-gateway [N...]`: starts the gateway, opens N authenticated
//! `/ws` connections (without and with a permessage-deflate offer) and prints the growth of the
//! gateway's RSS divided by N.
//! `ws-idle libs [N...]`: the same against a minimal echo server per library, each in its own
//! process (`ws-idle serve LIB`), with the buffer settings the gateway uses where a library has
//! them.
//!
//! Clients are raw TCP sockets that send the upgrade request by hand and then stay silent, so
//! the client side costs the measured server nothing.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const LIBS: &[&str] = &["axum-tungstenite", "yawc", "soketto", "ratchet"];
const SECRET: &str = "bench-secret-bench-secret-bench-secret!";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let counts = |from: usize| -> anyhow::Result<Vec<usize>> {
        let given: Vec<usize> = args[from..].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
        Ok(if given.is_empty() { vec![1000, 10000] } else { given })
    };
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args.get(2).context("serve LIB")?).await,
        Some("libs") => {
            println!("{:<18} {:>8} {:>9} {:>14}", "server", "conns", "deflate", "bytes/conn");
            for lib in LIBS {
                for &n in &counts(2)? {
                    for deflate in [false, true] {
                        let exe = std::env::current_exe()?;
                        let mut child = Command::new(exe)
                            .args(["serve", lib])
                            .stdout(Stdio::piped())
                            .kill_on_drop(true)
                            .spawn()?;
                        let port = read_port(&mut child, "port ").await?;
                        let per = measure(&child, port, "/", n, deflate).await?;
                        println!("{lib:<18} {n:>8} {deflate:>9} {per:>14.0}");
                        child.kill().await?;
                    }
                }
            }
            Ok(())
        }
        Some("gateway") => {
            let bin = args.get(2).context("gateway PATH/TO/confab-gateway")?;
            let token = mint(bin).await?;
            println!("{:<18} {:>8} {:>9} {:>14}", "server", "conns", "deflate", "bytes/conn");
            for &n in &counts(3)? {
                for deflate in [false, true] {
                    let data = std::env::temp_dir().join(format!("ws-idle-{}", std::process::id()));
                    let mut child = Command::new(bin)
                        .env("CONFAB_LISTEN", "127.0.0.1:0")
                        .env("CONFAB_DATA_DIR", &data)
                        .env("CONFAB_DATABASE_URL", "sqlite::memory:")
                        .env("CONFAB_JWT_SECRET", SECRET)
                        .env("CONFAB_CONNECTS_PER_SECOND", "1000000")
                        .env("CONFAB_CONNECT_BURST", "1000000")
                        .env("CONFAB_MAX_CONNECTIONS_PER_ADDRESS", "1000000")
                        .env("RUST_LOG", "error")
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .kill_on_drop(true)
                        .spawn()?;
                    let port = read_port(&mut child, "listening on http://127.0.0.1:").await?;
                    let path = format!("/ws?token={token}");
                    let per = measure(&child, port, &path, n, deflate).await?;
                    println!("{:<18} {n:>8} {deflate:>9} {per:>14.0}", "confab /ws");
                    child.kill().await?;
                    let _ = std::fs::remove_dir_all(&data);
                }
            }
            Ok(())
        }
        _ => bail!("usage: ws-idle gateway PATH/TO/confab-gateway [N...] | ws-idle libs [N...]"),
    }
}

async fn mint(bin: &str) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(["token", "--sub", "bench", "--ttl", "1d"])
        .env("CONFAB_JWT_SECRET", SECRET)
        .output()
        .await?;
    let text = String::from_utf8(out.stdout)?;
    text.split_whitespace()
        .find(|w| w.matches('.').count() == 2 && w.len() > 40)
        .map(str::to_owned)
        .context("no token in the output of `confab-gateway token`")
}

async fn read_port(child: &mut Child, marker: &str) -> anyhow::Result<u16> {
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(rest) = line.split(marker).nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(digits.parse()?);
        }
    }
    bail!("the server exited before printing its port")
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// Opens `n` idle connections and returns the server's RSS growth per connection.
async fn measure(child: &Child, port: u16, path: &str, n: usize, deflate: bool) -> anyhow::Result<f64> {
    let pid = child.id().context("pid")?;
    // Warm up: the first connections pay for lazily built runtime state.
    let mut warm = Vec::new();
    for _ in 0..20 {
        warm.push(open(port, path, deflate).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;
    let mut held = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(100) {
        let batch = (n - chunk * 100).min(100);
        let opened = futures::future::try_join_all((0..batch).map(|_| open(port, path, deflate))).await?;
        held.extend(opened);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes(pid)?;
    drop(held);
    drop(warm);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

/// An upgraded connection that will never send or read another byte.
async fn open(port: u16, path: &str, deflate: bool) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("closed during the handshake");
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

// ---- bare servers: accept, upgrade, then wait for frames like a real server would ----------

async fn serve(lib: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("port {}", listener.local_addr()?.port());
    match lib {
        "axum-tungstenite" => {
            use axum::extract::ws::WebSocketUpgrade;
            let app = axum::Router::new().route(
                "/",
                axum::routing::get(|ws: WebSocketUpgrade| async move {
                    ws.read_buffer_size(1024)
                        .write_buffer_size(1024)
                        .on_upgrade(|mut s| async move { while let Some(Ok(_)) = s.recv().await {} })
                }),
            );
            axum::serve(listener, app).await?;
        }
        "yawc" => loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|mut req: hyper::Request<hyper::body::Incoming>| async move {
                    let options = yawc::Options::default()
                        .with_read_buffer_capacity(1024)
                        .with_write_buffer_capacity(1024)
                        .with_compression_threshold(1024)
                        .server_no_context_takeover();
                    let (resp, fut) = yawc::WebSocket::upgrade_with_options(&mut req, options)
                        .map_err(std::io::Error::other)?;
                    tokio::spawn(async move {
                        if let Ok(mut ws) = fut.await {
                            while ws.next_frame().await.is_ok() {}
                        }
                    });
                    Ok::<_, std::io::Error>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        },
        "soketto" => loop {
            use tokio_util::compat::TokioAsyncReadCompatExt;
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let io = futures::io::BufReader::with_capacity(
                    1024,
                    futures::io::BufWriter::with_capacity(1024, stream.compat()),
                );
                let mut server = soketto::handshake::Server::new(io);
                server.add_extension(Box::new(soketto::extension::deflate::Deflate::new(
                    soketto::Mode::Server,
                )));
                let Ok(req) = server.receive_request().await else { return };
                let key = req.key();
                let accept = soketto::handshake::server::Response::Accept { key, protocol: None };
                if server.send_response(&accept).await.is_err() {
                    return;
                }
                let (_tx, mut rx) = server.into_builder().finish();
                let mut buf = Vec::new();
                while rx.receive_data(&mut buf).await.is_ok() {
                    buf.clear();
                }
            });
        },
        "ratchet" => loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(upgrader) = ratchet_rs::accept_with(
                    stream,
                    ratchet_rs::WebSocketConfig::default(),
                    ratchet_rs::deflate::DeflateExtProvider::default(),
                    ratchet_rs::SubprotocolRegistry::default(),
                )
                .await
                else {
                    return;
                };
                let Ok(upgraded) = upgrader.upgrade().await else { return };
                let mut ws = upgraded.websocket;
                let mut buf = bytes::BytesMut::new();
                while ws.read(&mut buf).await.is_ok() {
                    buf.clear();
                }
            });
        },
        other => bail!("unknown library {other:?}; one of {LIBS:?}"),
    }
    Ok(())
}
