//! Metrics read back through the Prometheus text exposition, spans through the SDK's in-memory
//! exporter, and log lines through the production subscriber.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use prometheus_parse::{Sample, Scrape, Value as PromValue};
use serde_json::{Value, json};

use super::*;
use crate::app::App;
use crate::chat::CreateConversation;
use crate::chat::event::Outgoing;
use crate::chat::hub::{Outbound, SendFailure};
use crate::chat::model::{ConversationKind, Identity};
use crate::config::Config;
use crate::transport::{Session, dispatch};

/// A connection that takes everything and remembers the event names.
#[derive(Default)]
struct Sink(Mutex<Vec<&'static str>>);

impl Outbound for Sink {
    fn send(&self, event: &Arc<Outgoing>) -> Result<(), SendFailure> {
        self.0.lock().expect("lock").push(event.name);
        Ok(())
    }
    fn close(&self, _reason: crate::chat::hub::CloseReason) {}
}

fn who(user: &str) -> Identity {
    Identity {
        user_id: user.into(),
        name: user.into(),
        roles: vec![],
        departments: vec![],
        exp: i64::MAX,
    }
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("literal address")
}

/// Every sample of `/metrics`, parsed by a Prometheus text-format parser.
fn scrape(metrics: &Metrics) -> Vec<Sample> {
    let registry = metrics.registry().expect("metrics are on");
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encodes");
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition")
        .samples
}

fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

/// A counter's or gauge's value, summed over the series matching `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
            other => panic!("{name} is not a counter or gauge: {other:?}"),
        })
        .sum()
}

/// A histogram's observation count (its `+Inf` bucket), summed over matching series.
fn observations(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            PromValue::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test]
async fn a_scripted_session_moves_each_counter_and_histogram_by_exactly_its_events() {
    let mut config = Config::for_test();
    config.messages_per_second = 1;
    config.message_burst = 5;
    let app = App::build(&config, local()).await.expect("builds");
    let gw = app.gateway.clone();
    let metrics = gw.service.metrics().clone();
    assert!(metrics.enabled());

    let (alice, bob) = (who("alice"), who("bob"));
    let alice_out = Arc::new(Sink::default());
    let bob_out = Arc::new(Sink::default());
    let a = gw
        .service
        .connect(&alice, alice_out.clone())
        .await
        .expect("connects");
    let b = gw
        .service
        .connect(&bob, bob_out.clone())
        .await
        .expect("connects");
    let alice_session = Session::new(a, Arc::new(alice.clone()), alice_out.clone(), Transport::Ws);
    let bob_session = Session::new(
        b,
        Arc::new(bob.clone()),
        bob_out.clone(),
        Transport::SocketIo,
    );
    let room = gw
        .service
        .create_conversation(
            &alice,
            CreateConversation {
                kind: ConversationKind::Open,
                title: Some("lobby".into()),
                members: vec![],
                department_id: None,
            },
        )
        .await
        .expect("created");
    let before = scrape(&metrics);
    for session in [&alice_session, &bob_session] {
        dispatch(
            &gw,
            session,
            "join_conversation",
            json!({"conversationId": room.id}),
        )
        .await
        .expect("joins");
    }
    let send = |i: usize| json!({"conversationId": room.id, "content": format!("hello {i}"), "type": "text", "clientMsgId": format!("m{i}")});
    // The burst of 5 goes through; the next 3 are refused by the 1/s refill.
    let mut refused = 0;
    for i in 0..8 {
        match dispatch(&gw, &alice_session, "send_message", send(i)).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), "rate_limited", "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 3);
    // A retry of a committed clientMsgId is neither persisted nor broadcast again.
    dispatch(
        &gw,
        &bob_session,
        "send_message",
        json!({"conversationId": room.id, "content": "x", "type": "text", "clientMsgId": "b1"}),
    )
    .await
    .expect("sent");
    dispatch(
        &gw,
        &bob_session,
        "send_message",
        json!({"conversationId": room.id, "content": "x", "type": "text", "clientMsgId": "b1"}),
    )
    .await
    .expect("retry acked");

    let after = scrape(&metrics);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let delta_obs = |name: &str, labels: &[(&str, &str)]| {
        observations(&after, name, labels) - observations(&before, name, labels)
    };
    assert_eq!(
        delta("confab_messages_received_total", &[("transport", "ws")]),
        8.0
    );
    assert_eq!(
        delta(
            "confab_messages_received_total",
            &[("transport", "socketio")]
        ),
        2.0
    );
    assert_eq!(delta("confab_messages_persisted_total", &[]), 6.0);
    assert_eq!(
        delta("confab_rate_limited_total", &[("class", "user_messages")]),
        3.0
    );
    // Each fresh message fans out once, to both joined connections.
    assert_eq!(
        delta_obs("confab_fanout_size", &[("event", "new_message")]),
        6.0
    );
    let fanned: f64 = after
        .iter()
        .filter(|s| {
            s.metric == "confab_fanout_size_sum" && s.labels.get("event") == Some("new_message")
        })
        .map(|s| match s.value {
            PromValue::Untyped(v) | PromValue::Gauge(v) | PromValue::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(fanned, 12.0, "6 messages × 2 recipients");
    assert_eq!(
        alice_out
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|n| **n == "new_message")
            .count(),
        6
    );
    // Every insert attempt that passed the limit reached the store: 5 + 2.
    assert_eq!(
        delta_obs(
            "confab_backend_duration_seconds",
            &[("backend", "store"), ("operation", "insert_message")]
        ),
        7.0
    );
    assert_eq!(delta("confab_backend_errors_total", &[]), 0.0);
    assert!(
        delta_obs(
            "confab_backend_duration_seconds",
            &[("backend", "bus"), ("operation", "publish")]
        ) >= 6.0
    );
    assert_eq!(value(&after, "confab_draining", &[]), 0.0);
    metrics.set_draining(true);
    assert_eq!(value(&scrape(&metrics), "confab_draining", &[]), 1.0);
}

#[tokio::test]
async fn connections_reconnects_and_auth_failures_are_counted_by_transport() {
    let app = App::build(&Config::for_test(), local())
        .await
        .expect("builds");
    let metrics = app.gateway.service.metrics().clone();
    let first = metrics.connection_opened(Transport::Ws, "carol");
    let other = metrics.connection_opened(Transport::SocketIo, "dave");
    let samples = scrape(&metrics);
    assert_eq!(value(&samples, "confab_connections", &[]), 2.0);
    assert_eq!(
        value(&samples, "confab_connections", &[("transport", "ws")]),
        1.0
    );
    drop(first);
    // carol comes back within the window: a reconnect; dave's second device is not.
    let again = metrics.connection_opened(Transport::Ws, "carol");
    let second_device = metrics.connection_opened(Transport::SocketIo, "dave");
    metrics.auth_failed(Transport::Ws, "expired");
    let samples = scrape(&metrics);
    assert_eq!(value(&samples, "confab_connections", &[]), 3.0);
    assert_eq!(value(&samples, "confab_connects_total", &[]), 4.0);
    assert_eq!(
        value(&samples, "confab_disconnects_total", &[("transport", "ws")]),
        1.0
    );
    assert_eq!(value(&samples, "confab_reconnects_total", &[]), 1.0);
    assert_eq!(
        value(&samples, "confab_reconnects_total", &[("transport", "ws")]),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "confab_auth_failures_total",
            &[("transport", "ws"), ("reason", "expired")]
        ),
        1.0
    );
    drop((again, other, second_device));
    assert_eq!(value(&scrape(&metrics), "confab_connections", &[]), 0.0);
}

#[tokio::test]
async fn metrics_switched_off_record_nothing_and_metrics_answers_404() {
    let mut config = Config::for_test();
    config.metrics = false;
    let app = App::build(&config, local()).await.expect("builds");
    let metrics = app.gateway.service.metrics();
    assert!(!metrics.enabled());
    assert!(metrics.registry().is_none());
    let response = tower::ServiceExt::oneshot(
        app.router,
        axum::http::Request::get("/metrics")
            .body(axum::body::Body::empty())
            .expect("request"),
    )
    .await
    .expect("answers");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_metrics_route_serves_prometheus_text_with_the_connection_gauge() {
    let app = App::build(&Config::for_test(), local())
        .await
        .expect("builds");
    let _open = app
        .gateway
        .service
        .metrics()
        .connection_opened(Transport::SocketIo, "erin");
    let response = tower::ServiceExt::oneshot(
        app.router,
        axum::http::Request::get("/metrics")
            .body(axum::body::Body::empty())
            .expect("request"),
    )
    .await
    .expect("answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(prometheus::TEXT_FORMAT.as_bytes())
    );
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let text = String::from_utf8(body.to_vec()).expect("utf-8");
    let samples = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition")
        .samples;
    assert_eq!(
        value(&samples, "confab_connections", &[("transport", "socketio")]),
        1.0
    );
    // The OTel → Prometheus naming: an up-down counter is a gauge, a counter gets `_total`.
    assert!(text.contains("# TYPE confab_connections gauge"), "{text}");
    assert!(
        text.contains("# TYPE confab_connects_total counter"),
        "{text}"
    );
}

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        panic!(
            "no span {name} in {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    })
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "current_thread")]
async fn one_message_is_one_trace_from_receive_through_persist_to_publish() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = subscriber(
        LogFormat::Text,
        EnvFilter::new("warn"),
        std::io::sink,
        false,
        Some(provider.tracer("test")),
    );
    let _default = tracing::subscriber::set_default(subscriber);

    let app = App::build(&Config::for_test(), local())
        .await
        .expect("builds");
    let gw = app.gateway.clone();
    let alice = who("alice");
    let out = Arc::new(Sink::default());
    let conn = gw
        .service
        .connect(&alice, out.clone())
        .await
        .expect("connects");
    let session = Session::new(conn, Arc::new(alice.clone()), out, Transport::Ws);
    let room = gw
        .service
        .create_conversation(
            &alice,
            CreateConversation {
                kind: ConversationKind::Group,
                title: None,
                members: vec!["bob".into()],
                department_id: None,
            },
        )
        .await
        .expect("created");
    exporter.reset();
    let secret = "the body must not be exported";
    let ack = dispatch(
        &gw,
        &session,
        "send_message",
        json!({"conversationId": room.id, "content": secret, "type": "text", "clientMsgId": "t1"}),
    )
    .await
    .expect("sent");
    let ack: serde_json::Value = serde_json::from_str(ack.get()).expect("the ack is JSON");
    let seq = ack["message"]["seq"].as_i64().expect("seq");
    // A span is exported when its last handle drops: sqlx's SQLite worker thread holds one of
    // the persist span (for its own logs) a moment past the reply, and a child keeps its parents
    // open. Wait for all four rather than race that thread.
    let names = [
        "request",
        "chat.send",
        "store.insert_message",
        "bus.publish",
    ];
    let spans = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            provider.force_flush().expect("flushes");
            let spans = exporter.get_finished_spans().expect("spans");
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                return spans;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let ended: Vec<String> = exporter
            .get_finished_spans()
            .expect("spans")
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        panic!("the message's spans did not all end; ended: {ended:?}")
    });
    let request = span(&spans, "request");
    let send = span(&spans, "chat.send");
    let persist = span(&spans, "store.insert_message");
    let publish = span(&spans, "bus.publish");
    assert_eq!(
        request.parent_span_id,
        SpanId::INVALID,
        "the request is the trace's root"
    );
    assert_eq!(send.parent_span_id, request.span_context.span_id());
    assert_eq!(persist.parent_span_id, send.span_context.span_id());
    assert_eq!(publish.parent_span_id, send.span_context.span_id());
    let trace = request.span_context.trace_id();
    for s in [send, persist, publish] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{} is in the message's trace",
            s.name
        );
    }
    assert_eq!(attribute(request, "event").as_deref(), Some("send_message"));
    assert_eq!(attribute(request, "transport").as_deref(), Some("ws"));
    let id = room.id.to_string();
    for s in [send, persist, publish] {
        assert_eq!(
            attribute(s, "conversation_id").as_deref(),
            Some(id.as_str()),
            "{}",
            s.name
        );
        assert_eq!(attribute(s, "seq"), Some(seq.to_string()), "{}", s.name);
    }
    let everything = format!("{spans:?}");
    assert!(
        !everything.contains(secret),
        "message bodies are never in spans"
    );
    assert!(!everything.contains("t1\""), "nor client ids");
}

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
    }
}

/// A hostile id and reason, as a client could send them.
const FORGED: &str =
    "mallory\n2030-01-01T00:00:00Z  INFO audit: connection opened user=\"admin\"\r\x1b[2K";

fn log_hostile_values() {
    audit::connected(Transport::Ws, FORGED, 7, None);
    audit::auth_failed(Transport::SocketIo, "malformed", &FORGED, None);
    audit::membership("member_added", &uuid::Uuid::nil(), FORGED, FORGED);
    audit::admin("drain", Some(FORGED), &FORGED);
    // Display-formatted, as error texts are: escaped by the text formatter itself.
    tracing::warn!(error = %FORGED, "a backend failed");
}

#[test]
fn control_characters_in_user_input_cannot_forge_text_log_lines() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = subscriber(
        LogFormat::Text,
        EnvFilter::new("info"),
        move || writer.clone(),
        false,
        None,
    );
    tracing::subscriber::with_default(subscriber, log_hostile_values);
    let text = captured.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "one line per event:\n{text}");
    for line in &lines[..4] {
        assert!(line.contains(" INFO audit: "), "{line}");
    }
    assert!(lines[4].contains(" WARN "), "{}", lines[4]);
    for line in &lines {
        assert!(!line.contains('\r') && !line.contains('\x1b'), "{line:?}");
        assert!(
            line.contains(r#"mallory\n2030"#),
            "escaped, not raw: {line}"
        );
    }
    assert!(lines.iter().all(|l| !l.starts_with("2030-01-01")));
}

#[test]
fn control_characters_in_user_input_stay_inside_json_log_fields() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = subscriber(
        LogFormat::Json,
        EnvFilter::new("info"),
        move || writer.clone(),
        false,
        None,
    );
    tracing::subscriber::with_default(subscriber, log_hostile_values);
    let text = captured.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "one line per event:\n{text}");
    let first: Value = serde_json::from_str(lines[0]).expect("JSON line");
    assert_eq!(first["target"], "audit");
    assert_eq!(first["fields"]["action"], "connect");
    // The Debug-quoted value round-trips: the newline is data inside a string, not a line break.
    assert!(
        first["fields"]["user"]
            .as_str()
            .is_some_and(|u| u.contains(r"mallory\n2030")),
        "{first}"
    );
    for line in lines {
        serde_json::from_str::<Value>(line).expect("every line is one JSON object");
    }
}

// ---- a scripted session over real sockets ---------------------------------------------------

mod session {
    use std::time::Duration;

    use futures::{SinkExt, StreamExt};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

    use super::*;

    type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

    /// A client socket whose text frames arrive on a channel; `None` marks the close.
    struct Client {
        sink: futures::stream::SplitSink<Socket, WsMessage>,
        frames: mpsc::UnboundedReceiver<Option<(String, Option<u16>)>>,
        seen: Vec<String>,
    }

    impl Client {
        async fn open(url: &str) -> Self {
            let (socket, _) = connect_async(url).await.expect("upgrades");
            let (sink, mut stream) = socket.split();
            let (tx, frames) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    match m {
                        WsMessage::Text(t) => {
                            let _ = tx.send(Some((t.to_string(), None)));
                        }
                        WsMessage::Close(c) => {
                            let code = c.map(|c| u16::from(c.code));
                            let _ = tx.send(Some((String::new(), code)));
                            break;
                        }
                        _ => {}
                    }
                }
                let _ = tx.send(None);
            });
            Self {
                sink,
                frames,
                seen: Vec::new(),
            }
        }

        async fn send(&mut self, text: String) {
            self.sink.send(WsMessage::text(text)).await.expect("sends");
        }

        /// The next frame satisfying `pred` (frames passed over are kept in `seen`).
        async fn until(&mut self, pred: impl Fn(&str) -> bool) -> String {
            let wait = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match self.frames.recv().await.flatten() {
                        Some((t, None)) => {
                            self.seen.push(t.clone());
                            if pred(&t) {
                                return t;
                            }
                        }
                        Some((_, Some(code))) => return format!("close {code}"),
                        None => return "closed".to_owned(),
                    }
                }
            });
            wait.await.expect("the frame arrives in time")
        }

        fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
            self.seen.iter().filter(|t| pred(t)).count()
        }
    }

    async fn ws_client(base: &str, token: &str) -> Client {
        let mut c = Client::open(&format!("ws://{base}/ws?token={token}")).await;
        let hello = c.until(|_| true).await;
        assert!(hello.contains(r#""type":"connected""#), "{hello}");
        c
    }

    /// Socket.IO v4 over Engine.IO v4 on a WebSocket: open, then CONNECT with the token.
    async fn sio_client(base: &str, token: &str) -> (Client, String) {
        let mut c =
            Client::open(&format!("ws://{base}/socket.io/?EIO=4&transport=websocket")).await;
        let open = c.until(|_| true).await;
        assert!(open.starts_with('0'), "{open}");
        c.send(format!("40{}", json!({ "token": token }))).await;
        let answer = c
            .until(|t| t.starts_with("40") || t.starts_with("44"))
            .await;
        (c, answer)
    }

    fn new_message(t: &str) -> bool {
        t.contains("new_message")
    }

    #[tokio::test]
    async fn a_scripted_session_over_both_transports_reads_back_exactly_from_metrics() {
        let mut config = Config::for_test();
        config.messages_per_second = 1;
        config.message_burst = 5;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("address");
        let app = App::build(&config, addr).await.expect("builds");
        let gw = app.gateway.clone();
        let router = app.router.clone();
        let metrics = gw.service.metrics().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::app::serve(
            listener,
            app,
            async {
                let _ = stopped.await;
            },
            std::future::pending(),
        ));
        let base = addr.to_string();
        let mint = |user: &str| {
            gw.auth
                .mint(user, user, vec![], vec![], chrono::Duration::hours(1))
                .expect("mints")
        };
        let baseline = scrape(&metrics);

        // Two users, one per transport, in one open conversation.
        let mut alice = ws_client(&base, &mint("alice")).await;
        let (mut bob, connected) = sio_client(&base, &mint("bob")).await;
        assert!(connected.starts_with("40"), "{connected}");
        let room = gw
            .service
            .create_conversation(
                &who("alice"),
                CreateConversation {
                    kind: ConversationKind::Open,
                    title: Some("metrics".into()),
                    members: vec![],
                    department_id: None,
                },
            )
            .await
            .expect("created");
        let join = json!({ "conversationId": room.id });
        alice
            .send(json!({"type": "join_conversation", "id": 1, "payload": join}).to_string())
            .await;
        alice.until(|t| t.contains(r#""type":"ack","id":1"#)).await;
        bob.send(format!("421{}", json!(["join_conversation", join])))
            .await;
        bob.until(|t| t.starts_with("431")).await;

        // Eight sends: a burst of five passes, three are rate-limited.
        for i in 0..8 {
            let payload = json!({"conversationId": room.id, "content": format!("m{i}"), "type": "text", "clientMsgId": format!("c{i}")});
            alice
                .send(json!({"type": "send_message", "id": 10 + i, "payload": payload}).to_string())
                .await;
        }
        for i in 0..8 {
            let id = format!(r#""id":{}"#, 10 + i);
            alice
                .until(|t| {
                    t.contains(&id)
                        && (t.contains(r#""type":"ack""#) || t.contains(r#""type":"error""#))
                })
                .await;
        }
        assert_eq!(
            alice.count(|t| t.contains(r#""type":"error""#) && t.contains("rate_limited")),
            3
        );
        while alice.count(new_message) < 5 {
            alice.until(new_message).await;
        }
        while bob.count(new_message) < 5 {
            bob.until(new_message).await;
        }

        // Bad tokens on both transports.
        let mut refused = Client::open(&format!("ws://{base}/ws?token=not-a-token")).await;
        assert_eq!(refused.until(|_| false).await, "close 4001");
        let (_refused_sio, answer) = sio_client(&base, "not-a-token").await;
        assert!(answer.starts_with("44"), "{answer}");

        // Alice drops and comes back: a reconnect.
        alice.sink.close().await.expect("closes");
        let closed = async {
            loop {
                let s = scrape(&metrics);
                if value(&s, "confab_disconnects_total", &[("transport", "ws")]) >= 1.0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the close is counted");
        let _alice_again = ws_client(&base, &mint("alice")).await;

        // Socket writes are timed just after the flush that the client already read: wait for
        // the last few records to land.
        let expected_deliveries = async {
            loop {
                let s = scrape(&metrics);
                if observations(&s, "confab_delivery_duration_seconds", &[]) >= 10.0
                    && observations(&s, "confab_ack_duration_seconds", &[("transport", "ws")])
                        >= 9.0
                {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let after = tokio::time::timeout(Duration::from_secs(5), expected_deliveries)
            .await
            .expect("deliveries are recorded");
        let d = |name: &str, labels: &[(&str, &str)]| {
            value(&after, name, labels) - value(&baseline, name, labels)
        };
        let n = |name: &str, labels: &[(&str, &str)]| {
            observations(&after, name, labels) - observations(&baseline, name, labels)
        };
        let ws = [("transport", "ws")];
        let sio = [("transport", "socketio")];
        assert_eq!(
            value(&after, "confab_connections", &[]),
            2.0,
            "alice again and bob"
        );
        assert_eq!(d("confab_connects_total", &ws), 2.0);
        assert_eq!(d("confab_connects_total", &sio), 1.0);
        assert_eq!(d("confab_disconnects_total", &ws), 1.0);
        assert_eq!(d("confab_reconnects_total", &ws), 1.0);
        assert_eq!(d("confab_reconnects_total", &sio), 0.0);
        assert_eq!(
            d(
                "confab_auth_failures_total",
                &[("transport", "ws"), ("reason", "malformed")]
            ),
            1.0
        );
        assert_eq!(
            d(
                "confab_auth_failures_total",
                &[("transport", "socketio"), ("reason", "malformed")]
            ),
            1.0
        );
        assert_eq!(d("confab_messages_received_total", &ws), 8.0);
        assert_eq!(d("confab_messages_received_total", &sio), 0.0);
        assert_eq!(d("confab_messages_persisted_total", &[]), 5.0);
        assert_eq!(
            d("confab_rate_limited_total", &[("class", "user_messages")]),
            3.0
        );
        assert_eq!(d("confab_messages_sent_total", &ws), 5.0);
        assert_eq!(d("confab_messages_sent_total", &sio), 5.0);
        assert_eq!(n("confab_delivery_duration_seconds", &ws), 5.0);
        assert_eq!(n("confab_delivery_duration_seconds", &sio), 5.0);
        assert_eq!(
            n(
                "confab_ack_duration_seconds",
                &[("transport", "ws"), ("event", "send_message")]
            ),
            8.0
        );
        assert_eq!(
            n(
                "confab_ack_duration_seconds",
                &[("transport", "ws"), ("event", "join_conversation")]
            ),
            1.0
        );
        assert_eq!(
            n(
                "confab_ack_duration_seconds",
                &[("transport", "socketio"), ("event", "join_conversation")]
            ),
            1.0
        );
        assert_eq!(n("confab_fanout_size", &[("event", "new_message")]), 5.0);
        assert_eq!(
            n(
                "confab_backend_duration_seconds",
                &[("backend", "store"), ("operation", "insert_message")]
            ),
            5.0
        );
        assert!(
            n("confab_send_queue_depth", &ws) >= 1.0,
            "the /ws writer samples its queue"
        );
        assert_eq!(d("confab_send_queue_closes_total", &[]), 0.0);
        assert_eq!(d("confab_backend_errors_total", &[]), 0.0);

        // The same numbers over HTTP, as Prometheus scrapes them.
        let response = tower::ServiceExt::oneshot(
            router,
            axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("answers");
        let body = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .expect("body");
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        let over_http = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("valid exposition")
            .samples;
        assert_eq!(
            value(&over_http, "confab_messages_persisted_total", &[]),
            5.0
        );
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
}
