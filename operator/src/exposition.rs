//! A tolerant reader of the Prometheus text exposition, for the gateway's `/metrics` page.
//!
//! It reads what the operator needs (`confab_connections`, `confab_draining`) from the text
//! format 0.0.4 and its OpenMetrics flavour: `# HELP`/`# TYPE`/`# EOF` lines, labels with
//! escaped values, optional timestamps and exemplars. Every sample line is checked, so an HTML
//! error page or random bytes are refused as a whole instead of yielding a made-up zero.

/// The connection gauge the gateway exports, one sample per transport.
pub const CONNECTIONS: &str = "confab_connections";
/// 1 while the gateway is draining, else 0; always exported.
pub const DRAINING: &str = "confab_draining";

/// What one gateway says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayMetrics {
    /// Open client connections, summed over every `confab_connections` sample.
    pub connections: i64,
    pub draining: bool,
}

/// Why a page could not be read; `line` counts from 1.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: {what}")]
    Syntax { line: usize, what: &'static str },
    #[error("line {line}: {name} has the value {value:?}, not a finite count ≥ 0")]
    BadValue {
        line: usize,
        name: String,
        value: String,
    },
    #[error("no {CONNECTIONS} or {DRAINING} samples: not a Confab gateway's metrics")]
    NotAGateway,
}

/// One sample: its metric name, labels (unescaped) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample of a text exposition, or the first line that is not one.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    numbered_samples(text)
        .map(|sample| sample.map(|(_, s)| s))
        .collect()
}

/// Each sample with its line number (from 1), skipping blank lines and comments: `# HELP`,
/// `# TYPE`, `# UNIT` and `# EOF` carry nothing the operator needs.
fn numbered_samples(text: &str) -> impl Iterator<Item = Result<(usize, Sample), ParseError>> + '_ {
    text.lines().enumerate().filter_map(|(index, raw)| {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let number = index + 1;
        Some(
            sample(line)
                .map(|s| (number, s))
                .map_err(|what| ParseError::Syntax { line: number, what }),
        )
    })
}

/// The connection count and drain state of a gateway's `/metrics` page.
///
/// A page with `confab_draining` but no `confab_connections` sample reads as 0 connections: an
/// OpenTelemetry up-down counter has no series until its first connection. A page with
/// neither is not a gateway's, and reads as an error (unknown is not 0).
pub fn gateway_metrics(text: &str) -> Result<GatewayMetrics, ParseError> {
    let mut connections = 0.0_f64;
    let mut draining = false;
    let mut seen = false;
    for numbered in numbered_samples(text) {
        let (line, s) = numbered?;
        let bad = || ParseError::BadValue {
            line,
            name: s.name.clone(),
            value: s.value.to_string(),
        };
        if s.name == CONNECTIONS {
            if !s.value.is_finite() || s.value < 0.0 {
                return Err(bad());
            }
            connections += s.value;
            seen = true;
        } else if s.name == DRAINING {
            if !s.value.is_finite() {
                return Err(bad());
            }
            draining |= s.value > 0.0;
            seen = true;
        }
    }
    if !seen {
        return Err(ParseError::NotAGateway);
    }
    // Sums of integers stay exact up to 2^53; beyond that `as` saturates, it cannot panic.
    Ok(GatewayMetrics {
        connections: connections.round() as i64,
        draining,
    })
}

/// `name{label="value",...} value [timestamp] [# exemplar]`.
fn sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("expected a metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(after)?;
        labels = parsed;
        rest = after;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("expected a space before the value");
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("expected a value")?;
    let value = float(value).ok_or("the value is not a number")?;
    match fields.next() {
        None => {}
        // OpenMetrics exemplars follow a `#`.
        Some(exemplar) if exemplar.starts_with('#') => {}
        Some(timestamp) => {
            float(timestamp).ok_or("the timestamp is not a number")?;
            match fields.next() {
                None => {}
                Some(exemplar) if exemplar.starts_with('#') => {}
                Some(_) => return Err("unexpected text after the timestamp"),
            }
        }
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Go's `ParseFloat` spellings as Prometheus writes them (`NaN`, `+Inf`, `-Inf`, `1e3`).
fn float(text: &str) -> Option<f64> {
    let ok = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'))
        || matches!(text, "NaN" | "+Inf" | "-Inf" | "Inf");
    if !ok {
        return None;
    }
    text.parse().ok()
}

type Labels = Vec<(String, String)>;

/// The labels after `{`, and what follows the closing `}`.
fn label_set(mut rest: &str) -> Result<(Labels, &str), &'static str> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("unterminated label set")?;
        let name = &rest[..name_end];
        if name.is_empty() {
            return Err("expected a label name");
        }
        rest = rest[name_end..].trim_start();
        rest = rest
            .strip_prefix('=')
            .ok_or("expected = after a label name")?;
        rest = rest.trim_start();
        rest = rest
            .strip_prefix('"')
            .ok_or("expected a quoted label value")?;
        let (value, after) = quoted(rest)?;
        labels.push((name.to_owned(), value));
        rest = after.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected , or } after a label value");
        }
    }
}

/// A label value up to its closing quote, unescaping `\\`, `\"` and `\n`.
fn quoted(text: &str) -> Result<(String, &str), &'static str> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, other)) => {
                    // The text format leaves other escapes undefined; keep them as written.
                    value.push('\\');
                    value.push(other);
                }
                None => return Err("unterminated label value"),
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the gateway's OpenTelemetry Prometheus exporter writes, trimmed.
    const GATEWAY_PAGE: &str = r#"# HELP confab_connections Open client connections on this gateway
# TYPE confab_connections gauge
confab_connections{otel_scope_name="confab-gateway",transport="socketio"} 1200
confab_connections{otel_scope_name="confab-gateway",transport="ws"} 34
# HELP confab_draining 1 while this gateway drains
# TYPE confab_draining gauge
confab_draining{otel_scope_name="confab-gateway"} 0
# HELP confab_connects_total Client connections opened (authenticated)
# TYPE confab_connects_total counter
confab_connects_total{otel_scope_name="confab-gateway",transport="ws"} 99
# HELP confab_delivery_latency_seconds Publish to socket write
# TYPE confab_delivery_latency_seconds histogram
confab_delivery_latency_seconds_bucket{otel_scope_name="confab-gateway",le="0.005"} 10
confab_delivery_latency_seconds_bucket{otel_scope_name="confab-gateway",le="+Inf"} 12
confab_delivery_latency_seconds_sum{otel_scope_name="confab-gateway"} 0.031
confab_delivery_latency_seconds_count{otel_scope_name="confab-gateway"} 12
# HELP target_info Target metadata
# TYPE target_info gauge
target_info{service_name="confab-gateway",note="say \"hi\"\\ then\nbye",empty=""} 1
"#;

    #[test]
    fn connections_are_summed_over_transports_and_other_metrics_ignored() {
        assert_eq!(
            gateway_metrics(GATEWAY_PAGE),
            Ok(GatewayMetrics {
                connections: 1234,
                draining: false,
            })
        );
    }

    #[test]
    fn escaped_label_values_are_unescaped() {
        let samples = parse(GATEWAY_PAGE).expect("parses");
        let info = samples
            .iter()
            .find(|s| s.name == "target_info")
            .expect("target_info");
        assert_eq!(
            info.labels,
            [
                ("service_name".to_owned(), "confab-gateway".to_owned()),
                ("note".to_owned(), "say \"hi\"\\ then\nbye".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
        );
        assert_eq!(samples.len(), 9);
    }

    #[test]
    fn a_label_value_may_contain_braces_commas_and_the_metric_name() {
        let page = "confab_connections{transport=\"ws\",note=\"} confab_connections{x=\\\"1\\\"} 5,\"} 7\nconfab_draining 1\n";
        assert_eq!(
            gateway_metrics(page),
            Ok(GatewayMetrics {
                connections: 7,
                draining: true,
            })
        );
    }

    #[test]
    fn only_the_exact_metric_name_counts() {
        let page = "confab_connections_total 100\nconfab_connectionsx 5\nmy_confab_connections 3\nconfab_connections 2\nconfab_draining 0\n";
        assert_eq!(gateway_metrics(page).map(|m| m.connections), Ok(2));
    }

    #[test]
    fn timestamps_exemplars_blank_lines_and_openmetrics_eof_are_accepted() {
        let page = "\n# TYPE confab_connections gauge\r\nconfab_connections{transport=\"ws\"} 3 1712345678000\r\n  confab_connections{transport=\"socketio\",} 4e0 # {trace_id=\"abc\"} 1.0\n\nconfab_draining 1.0\n# EOF\n";
        assert_eq!(
            gateway_metrics(page),
            Ok(GatewayMetrics {
                connections: 7,
                draining: true,
            })
        );
    }

    #[test]
    fn a_page_with_the_drain_gauge_but_no_connection_series_means_no_connections() {
        let page = "# TYPE confab_connections gauge\nconfab_draining{otel_scope_name=\"confab-gateway\"} 0\n";
        assert_eq!(gateway_metrics(page).map(|m| m.connections), Ok(0));
    }

    #[test]
    fn a_page_without_any_gateway_metric_is_unknown_not_zero() {
        assert_eq!(
            gateway_metrics("process_cpu_seconds_total 1.5\n"),
            Err(ParseError::NotAGateway)
        );
        assert_eq!(gateway_metrics(""), Err(ParseError::NotAGateway));
    }

    #[test]
    fn garbage_is_an_error_naming_the_line() {
        let cases = [
            ("<html><body>502 Bad Gateway</body></html>", 1),
            (
                "confab_draining 0\nconfab_connections{transport=\"ws\" 5\n",
                2,
            ),
            ("confab_connections{transport=\"ws} 5\n", 1),
            ("confab_connections{transport=ws} 5\n", 1),
            ("confab_connections{=\"ws\"} 5\n", 1),
            ("confab_connections five\n", 1),
            ("confab_connections\n", 1),
            ("confab_connections 5 123 456\n", 1),
            ("confab_connections 5 soon\n", 1),
            ("9lives 1\n", 1),
            ("confab_connections{transport=\"ws\"}5\n", 1),
            ("confab_connections{transport=\"\\", 1),
            ("\u{0}\u{1}\u{ff}binary", 1),
        ];
        for (page, line) in cases {
            match gateway_metrics(page) {
                Err(ParseError::Syntax { line: at, .. }) => assert_eq!(at, line, "{page:?}"),
                other => panic!("{page:?} read as {other:?}"),
            }
        }
    }

    #[test]
    fn impossible_connection_values_are_refused() {
        for value in ["NaN", "+Inf", "-1", "-Inf"] {
            let page = format!("confab_draining 0\nconfab_connections {value}\n");
            assert!(
                matches!(
                    gateway_metrics(&page),
                    Err(ParseError::BadValue { line: 2, .. })
                ),
                "{value}"
            );
        }
        assert!(matches!(
            gateway_metrics("confab_draining NaN\n"),
            Err(ParseError::BadValue { line: 1, .. })
        ));
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        let page = "confab_connections{transport=\"ws\"} 1e300\nconfab_connections{transport=\"socketio\"} 1e300\n";
        assert_eq!(gateway_metrics(page).map(|m| m.connections), Ok(i64::MAX));
        let page = "confab_connections 9007199254740992\nconfab_connections 1\n";
        assert!(gateway_metrics(page).is_ok_and(|m| m.connections >= 9_007_199_254_740_992));
    }

    #[test]
    fn no_input_makes_the_reader_panic() {
        // Every prefix of a page cuts it somewhere awkward: inside a name, a label, an escape.
        let page = format!("{GATEWAY_PAGE}confab_connections{{a=\"é\\\"ü\"}} 1\n");
        for end in (0..=page.len()).filter(|&i| page.is_char_boundary(i)) {
            let _ = gateway_metrics(&page[..end]);
            let _ = parse(&page[..end]);
        }
    }
}
