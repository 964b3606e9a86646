//! Pod views, the fleet memory and the HTTP source against a local server.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use super::*;

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("a valid Pod")
}

fn running_pod(name: &str, ip: &str, ready: bool) -> Pod {
    pod(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "gateway", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
}

fn reading(name: &str, connections: Option<i64>, terminating: bool) -> PodReading {
    PodReading {
        pod: GatewayPod {
            name: name.to_owned(),
            key: name.to_owned(),
            ready: !terminating,
            terminating,
            target: None,
            deletion_cost: None,
        },
        metrics: connections.map(|connections| GatewayMetrics {
            connections,
            draining: false,
        }),
        fresh: true,
    }
}

#[test]
fn a_ready_running_pod_is_read_on_its_http_port() {
    let view = GatewayPod::from_pod(&running_pod("gw-a", "10.0.0.7", true)).expect("named");
    assert_eq!(view.key, "uid-gw-a");
    assert!(view.ready && !view.terminating);
    assert_eq!(
        view.target,
        Some(PodTarget {
            name: "gw-a".into(),
            addr: "10.0.0.7:8080".parse().expect("addr"),
        })
    );
    let mut on_other_port = running_pod("gw-b", "fd00::5", true);
    if let Some(spec) = on_other_port.spec.as_mut() {
        spec.containers[0].ports = Some(vec![
            k8s_openapi::api::core::v1::ContainerPort {
                name: Some("debug".into()),
                container_port: 6060,
                ..Default::default()
            },
            k8s_openapi::api::core::v1::ContainerPort {
                name: Some("http".into()),
                container_port: 9000,
                ..Default::default()
            },
        ]);
    }
    let view = GatewayPod::from_pod(&on_other_port).expect("named");
    assert_eq!(
        view.target.map(|t| t.addr.to_string()),
        Some("[fd00::5]:9000".into())
    );
}

#[test]
fn unready_pods_are_not_read_unless_they_are_draining() {
    let unready = GatewayPod::from_pod(&running_pod("gw", "10.0.0.7", false)).expect("named");
    assert_eq!(unready.target, None);
    let mut terminating = running_pod("gw", "10.0.0.7", false);
    terminating.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let view = GatewayPod::from_pod(&terminating).expect("named");
    assert!(view.terminating);
    assert!(
        view.target.is_some(),
        "a draining pod's count still matters"
    );
}

#[test]
fn odd_pod_objects_give_no_target_and_never_panic() {
    let pending = pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}));
    let view = GatewayPod::from_pod(&pending).expect("named");
    assert_eq!(
        (view.key.as_str(), view.target, view.ready),
        ("p", None, false)
    );
    let bad_ip = pod(
        json!({"metadata": {"name": "p"}, "status": {"phase": "Running", "podIP": "not-an-ip",
        "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    assert_eq!(GatewayPod::from_pod(&bad_ip).expect("named").target, None);
    let no_spec_port = pod(
        json!({"metadata": {"name": "p"}, "status": {"phase": "Running", "podIP": "10.1.1.1",
        "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    assert_eq!(
        GatewayPod::from_pod(&no_spec_port)
            .and_then(|p| p.target)
            .map(|t| t.addr.port()),
        Some(8080)
    );
    assert_eq!(GatewayPod::from_pod(&pod(json!({"metadata": {}}))), None);
}

#[test]
fn the_deletion_cost_annotation_is_read_when_it_is_a_number() {
    let mut p = running_pod("gw", "10.0.0.7", true);
    p.metadata.annotations = Some([(DELETION_COST_ANNOTATION.to_owned(), "420".to_owned())].into());
    assert_eq!(
        GatewayPod::from_pod(&p).expect("named").deletion_cost,
        Some(420)
    );
    p.metadata.annotations =
        Some([(DELETION_COST_ANNOTATION.to_owned(), "lots".to_owned())].into());
    assert_eq!(GatewayPod::from_pod(&p).expect("named").deletion_cost, None);
}

#[test]
fn totals_sum_known_counts_and_unknown_is_not_zero() {
    let obs = Observation {
        listed: true,
        pods: vec![
            reading("a", Some(100), false),
            reading("b", None, false),
            reading("c", Some(7), true),
        ],
    };
    assert_eq!(obs.connections(), Some(107));
    assert_eq!(obs.unknown_pods(), 1);
    assert_eq!(obs.draining_pods(), 1);
    // The terminating pod is already draining: the budget is about the pods still to go.
    assert_eq!(obs.connections_per_pod(), Some(100));

    let none_known = Observation {
        listed: true,
        pods: vec![reading("a", None, false)],
    };
    assert_eq!(none_known.connections(), None);
    assert_eq!(none_known.connections_per_pod(), None);
    assert_eq!(
        Observation {
            listed: true,
            pods: vec![]
        }
        .connections(),
        Some(0)
    );
    assert_eq!(Observation::default().connections(), None, "not listed");
}

#[test]
fn a_pod_saying_it_drains_counts_as_draining() {
    let mut r = reading("a", Some(5), false);
    r.metrics = Some(GatewayMetrics {
        connections: 5,
        draining: true,
    });
    let obs = Observation {
        listed: true,
        pods: vec![r, reading("b", Some(5), false)],
    };
    assert_eq!(obs.draining_pods(), 1);
}

#[test]
fn huge_counts_saturate_the_total() {
    let obs = Observation {
        listed: true,
        pods: vec![
            reading("a", Some(i64::MAX), false),
            reading("b", Some(5), false),
        ],
    };
    assert_eq!(obs.connections(), Some(i64::MAX));
}

fn view(name: &str) -> GatewayPod {
    GatewayPod::from_pod(&running_pod(name, "10.0.0.1", true)).expect("named")
}

fn metrics(connections: i64) -> Option<GatewayMetrics> {
    Some(GatewayMetrics {
        connections,
        draining: false,
    })
}

#[test]
fn a_failed_read_keeps_the_last_known_count_and_gone_pods_are_forgotten() {
    let memory = FleetMemory::default();
    let first = memory.merge(
        "chat/demo",
        vec![(view("a"), metrics(40)), (view("b"), None)],
    );
    assert_eq!(first[0].metrics, metrics(40));
    assert!(first[0].fresh);
    assert_eq!((first[1].metrics, first[1].fresh), (None, false));

    let second = memory.merge(
        "chat/demo",
        vec![(view("a"), None), (view("b"), metrics(3))],
    );
    assert_eq!(second[0].metrics, metrics(40), "last known, not 0");
    assert!(!second[0].fresh);
    assert_eq!(second[1].metrics, metrics(3));

    // Pod a is gone; when a pod of that uid shows up again it starts from nothing.
    memory.merge("chat/demo", vec![(view("b"), None)]);
    let fourth = memory.merge("chat/demo", vec![(view("a"), None)]);
    assert_eq!(fourth[0].metrics, None);
}

#[test]
fn clusters_are_remembered_apart_and_forgotten_on_deletion() {
    let memory = FleetMemory::default();
    memory.merge("chat/one", vec![(view("a"), metrics(1))]);
    memory.merge("chat/two", vec![(view("a"), metrics(2))]);
    assert_eq!(
        memory.merge("chat/one", vec![(view("a"), None)])[0].metrics,
        metrics(1)
    );
    memory.forget("chat/two");
    assert_eq!(
        memory.merge("chat/two", vec![(view("a"), None)])[0].metrics,
        None
    );
}

#[test]
fn the_patch_clock_runs_per_pod() {
    let memory = FleetMemory::default();
    memory.merge(
        "chat/demo",
        vec![(view("a"), metrics(1)), (view("b"), metrics(1))],
    );
    let at = Instant::now();
    memory.cost_patched("chat/demo", "uid-a", at);
    let now = at + Duration::from_secs(12);
    assert_eq!(
        memory.since_cost_patch("chat/demo", "uid-a", now),
        Some(Duration::from_secs(12))
    );
    assert_eq!(memory.since_cost_patch("chat/demo", "uid-b", now), None);
}

/// A local stand-in for a gateway pod's `/metrics`.
async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

async fn read_from(addr: SocketAddr, timeout: Duration) -> Result<GatewayMetrics, ScrapeError> {
    let source = HttpConnectionSource::new(timeout);
    source
        .read(&PodTarget {
            name: "gw".into(),
            addr,
        })
        .await
}

#[tokio::test]
async fn the_http_source_reads_a_gateway_page() {
    let page = "# HELP confab_connections Open client connections\n# TYPE confab_connections gauge\n\
                confab_connections{otel_scope_name=\"confab-gateway\",transport=\"socketio\"} 11\n\
                confab_connections{otel_scope_name=\"confab-gateway\",transport=\"ws\"} 31\n\
                confab_draining{otel_scope_name=\"confab-gateway\"} 1\n";
    let addr = serve(Router::new().route("/metrics", get(move || async move { page }))).await;
    assert_eq!(
        read_from(addr, SCRAPE_TIMEOUT).await.expect("reads"),
        GatewayMetrics {
            connections: 42,
            draining: true,
        }
    );
}

#[tokio::test]
async fn the_http_source_refuses_errors_garbage_and_floods() {
    let addr = serve(Router::new().route(
        "/metrics",
        get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "draining") }),
    ))
    .await;
    let err = read_from(addr, SCRAPE_TIMEOUT).await.expect_err("503");
    assert!(matches!(err, ScrapeError::Status(503)), "{err}");
    assert_eq!(err.metric_label(), "status");

    let flood = "confab_connections 1\n".repeat(MAX_PAGE_BYTES / 20 + 10);
    let addr = serve(Router::new().route("/metrics", get(move || async move { flood }))).await;
    let err = read_from(addr, SCRAPE_TIMEOUT)
        .await
        .expect_err("too large");
    assert!(matches!(err, ScrapeError::TooLarge), "{err}");

    let addr = serve(Router::new().route("/metrics", get(|| async { "<html>hello</html>" }))).await;
    let err = read_from(addr, SCRAPE_TIMEOUT).await.expect_err("garbage");
    assert!(
        matches!(err, ScrapeError::Parse(ParseError::Syntax { line: 1, .. })),
        "{err}"
    );
    assert_eq!(err.metric_label(), "parse");

    let addr =
        serve(Router::new().route("/metrics", get(|| async { vec![0xff_u8, 0xfe, 0x00] }))).await;
    let err = read_from(addr, SCRAPE_TIMEOUT)
        .await
        .expect_err("not UTF-8");
    assert!(matches!(err, ScrapeError::NotUtf8), "{err}");
}

#[tokio::test]
async fn the_http_source_gives_up_on_a_slow_pod() {
    let addr = serve(Router::new().route(
        "/metrics",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "confab_connections 1\n"
        }),
    ))
    .await;
    let started = std::time::Instant::now();
    let err = read_from(addr, Duration::from_millis(200))
        .await
        .expect_err("times out");
    assert!(matches!(err, ScrapeError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn the_http_source_reports_a_refused_connection() {
    // Bind then drop: nothing listens on the port any more.
    let addr = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        listener.local_addr().expect("addr")
    };
    let err = read_from(addr, SCRAPE_TIMEOUT).await.expect_err("refused");
    assert!(matches!(err, ScrapeError::Request(_)), "{err}");
    assert_eq!(err.metric_label(), "request");
}
