//! `confab-bench check`: whether a run's results.json shows every scenario working (the test command's gate).
//!
//! It checks that the harness measured something, not how fast: a smoke run's numbers are
//! meaningless as measurements, but zero connections, zero samples, a lost message or a NaN
//! (written as `null` by serde_json) mean the harness or a server has rotted. It also refuses
//! rows that contradict themselves — more deliveries than were expected, a storm whose clients
//! all reconnected and none failed yet not all caught up, a fully delivered step whose
//! delivered/s is under 95 % of its accepted rate — since those are bugs in the measure.

use serde_json::Value;

/// The scenarios a full results.json holds.
pub const ALL: [&str; 5] = ["s1", "s2", "s3", "s4", "s5"];

/// Every problem found in `results` for the `wanted` scenarios; empty when all is well.
pub fn problems(results: &Value, wanted: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for &s in wanted {
        let rows = match results.get(s).and_then(Value::as_array) {
            Some(rows) if !rows.is_empty() => rows,
            Some(_) => {
                out.push(format!("{s}: no rows"));
                continue;
            }
            None => {
                out.push(format!(
                    "{s}: missing (the scenario did not run, or failed before recording a row)"
                ));
                continue;
            }
        };
        for (i, row) in rows.iter().enumerate() {
            let at = Row::new(s, i, row);
            nulls(&at, row, String::new(), &mut out);
            match s {
                "s1" => {
                    at.positive("connected", &mut out);
                    at.zero("failed", &mut out);
                    at.present("kb_per_connection", &mut out);
                }
                "s2" | "s3" | "s5" => {
                    at.positive("totals.connected", &mut out);
                    at.positive("totals.sent", &mut out);
                    at.positive("totals.accepted", &mut out);
                    at.positive("totals.received", &mut out);
                    at.zero("totals.failed", &mut out);
                    answers_add_up(&at, &mut out);
                    if s != "s2" {
                        deliveries_add_up(&at, &mut out);
                    }
                }
                "s4" => {
                    at.positive("totals.connected", &mut out);
                    at.positive("totals.sent", &mut out);
                    at.zero("totals.failed", &mut out);
                    at.zero("totals.lost", &mut out);
                    at.positive("totals.dropped", &mut out);
                    at.equal("totals.reconnected", "totals.dropped", &mut out);
                    at.equal("totals.caught_up", "totals.reconnected", &mut out);
                }
                _ => {}
            }
        }
    }
    out
}

/// One row of one scenario, named the way a reader finds it in results.md.
struct Row<'a> {
    label: String,
    row: &'a Value,
}

impl<'a> Row<'a> {
    fn new(scenario: &str, i: usize, row: &'a Value) -> Row<'a> {
        let name: Vec<&str> = ["server", "transport"]
            .iter()
            .filter_map(|k| row.get(*k).and_then(Value::as_str))
            .collect();
        let label = if name.is_empty() {
            format!("{scenario} row {i}")
        } else {
            format!("{scenario} row {i} ({})", name.join(" "))
        };
        Row { label, row }
    }

    fn get(&self, path: &str) -> Option<f64> {
        path.split('.')
            .try_fold(self.row, |v, k| v.get(k))
            .and_then(Value::as_f64)
    }

    fn present(&self, path: &str, out: &mut Vec<String>) -> Option<f64> {
        let v = self.get(path).filter(|v| v.is_finite());
        if v.is_none() {
            out.push(format!("{}: {path} is missing or not a number", self.label));
        }
        v
    }

    fn positive(&self, path: &str, out: &mut Vec<String>) {
        if let Some(v) = self.present(path, out)
            && v <= 0.0
        {
            out.push(format!("{}: {path} is {v}, expected > 0", self.label));
        }
    }

    fn zero(&self, path: &str, out: &mut Vec<String>) {
        if let Some(v) = self.present(path, out)
            && v != 0.0
        {
            out.push(format!("{}: {path} is {v}, expected 0", self.label));
        }
    }

    fn equal(&self, path: &str, other: &str, out: &mut Vec<String>) {
        if let (Some(a), Some(b)) = (self.present(path, out), self.present(other, out))
            && a != b
        {
            out.push(format!("{}: {path} is {a} but {other} is {b}", self.label));
        }
    }
}

/// Every send is accepted, refused, failed or unanswered, exactly once.
fn answers_add_up(at: &Row, out: &mut Vec<String>) {
    let n = |k: &str| at.get(&format!("totals.{k}")).unwrap_or(0.0);
    let answered = n("accepted") + n("refused") + n("errors") + n("unanswered");
    if answered != n("sent") {
        out.push(format!(
            "{}: accepted + refused + errors + unanswered is {answered} but sent is {}",
            at.label,
            n("sent")
        ));
    }
}

/// A fan-out row: no more deliveries than accepted sends × members (sends never answered may
/// have been delivered too, so they count as an upper bound), and a fully delivered row's
/// delivered/s is not under 95 % of its accepted rate. Every send is scheduled inside the send
/// window and arrives at most the row's max latency later, so the span from the start to the
/// last delivery is at most window + max latency: a slower rate means the span was wrong.
fn deliveries_add_up(at: &Row, out: &mut Vec<String>) {
    let (Some(expected), Some(delivered)) = (at.get("expected"), at.get("delivered")) else {
        out.push(format!("{}: expected or delivered is missing", at.label));
        return;
    };
    let n = |k: &str| at.get(&format!("totals.{k}")).unwrap_or(0.0);
    let accepted = n("accepted");
    let members = if accepted > 0.0 {
        expected / accepted
    } else {
        0.0
    };
    let bound = expected + n("unanswered") * members;
    if delivered > bound {
        out.push(format!(
            "{}: delivered {delivered} is more than expected {expected} (accepted × members{})",
            at.label,
            if n("unanswered") > 0.0 {
                ", with every unanswered send counted"
            } else {
                ""
            }
        ));
    }
    let rate = at.get("delivered_per_s").unwrap_or(0.0);
    let span = n("duration_s") + n("recv_max_ms") / 1000.0;
    if delivered >= expected && expected > 0.0 && span > 0.0 && rate < 0.95 * expected / span {
        out.push(format!(
            "{}: every expected delivery arrived, yet delivered/s {rate:.0} is under 95 % of the accepted rate {:.0} \
             ({expected} in {:.2} s of sending plus {:.0} ms max latency)",
            at.label,
            expected / span,
            n("duration_s"),
            n("recv_max_ms")
        ));
    }
}

/// serde_json writes NaN and infinities as `null`: any null in a row is a number that was not finite.
fn nulls(at: &Row, v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Null => out.push(format!("{}: {path} is not a finite number", at.label)),
        Value::Object(m) => {
            for (k, v) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                nulls(at, v, p, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                nulls(at, v, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn totals() -> Value {
        json!({"connected": 20, "failed": 0, "sent": 40, "accepted": 40, "refused": 0,
            "errors": 0, "unanswered": 0, "received": 400, "duration_s": 2.0, "window_s": 2.01,
            "ack_p50_ms": 1.2, "ack_p99_ms": 3.4, "recv_p99_ms": 5.6, "recv_max_ms": 9.0,
            "disconnects": 0, "dropped": 0, "reconnected": 0, "caught_up": 0, "lost": 0})
    }

    fn fanout() -> Value {
        json!({"server": "Confab", "transport": "socket.io", "expected": 400, "delivered": 400,
            "delivered_per_s": 199.0, "totals": totals()})
    }

    fn healthy() -> Value {
        let mut storm = totals();
        storm["dropped"] = json!(57);
        storm["reconnected"] = json!(57);
        storm["caught_up"] = json!(57);
        json!({
            "mode": "Smoke",
            "pinning": {"server": null, "generator": null},
            "s1": [{"server": "Confab", "transport": "/ws", "connected": 100, "failed": 0,
                    "kb_per_connection": 11.3}],
            "s2": [{"server": "Confab", "transport": "socket.io", "totals": totals()}],
            "s3": [fanout()],
            "s4": [{"transport": "/ws", "totals": storm}],
            "s5": [fanout()],
        })
    }

    #[test]
    fn a_healthy_run_has_no_problems() {
        assert_eq!(problems(&healthy(), &ALL), Vec::<String>::new());
    }

    #[test]
    fn a_missing_scenario_is_named() {
        let mut r = healthy();
        r.as_object_mut().expect("an object").remove("s3");
        let p = problems(&r, &ALL);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("s3: missing"), "{p:?}");
        assert!(problems(&r, &["s1", "s2"]).is_empty());
    }

    #[test]
    fn a_lost_message_in_the_storm_fails_naming_s4_and_the_field() {
        let mut r = healthy();
        r["s4"][0]["totals"]["lost"] = json!(1);
        assert_eq!(
            problems(&r, &ALL),
            vec!["s4 row 0 (/ws): totals.lost is 1, expected 0"]
        );
    }

    #[test]
    fn a_client_that_never_reconnected_fails() {
        let mut r = healthy();
        r["s4"][0]["totals"]["reconnected"] = json!(56);
        let p = problems(&r, &ALL);
        assert!(
            p.iter()
                .any(|m| m == "s4 row 0 (/ws): totals.reconnected is 56 but totals.dropped is 57"),
            "{p:?}"
        );
    }

    #[test]
    fn a_storm_whose_clients_all_reconnected_and_none_failed_must_have_all_caught_up() {
        // The old Socket.IO row: every client back, nothing failed or lost, one "synced".
        let mut r = healthy();
        r["s4"][0]["totals"]["caught_up"] = json!(1);
        assert_eq!(
            problems(&r, &ALL),
            vec!["s4 row 0 (/ws): totals.caught_up is 1 but totals.reconnected is 57"]
        );
    }

    #[test]
    fn more_deliveries_than_accepted_sends_times_members_are_refused() {
        let mut r = healthy();
        r["s3"][0]["delivered"] = json!(401);
        let p = problems(&r, &ALL);
        assert_eq!(
            p,
            vec![
                "s3 row 0 (Confab socket.io): delivered 401 is more than expected 400 (accepted × members)"
            ]
        );
        // Unanswered sends may have been delivered: they raise the bound, not the expectation.
        r["s3"][0]["totals"]["accepted"] = json!(39);
        r["s3"][0]["totals"]["unanswered"] = json!(1);
        r["s3"][0]["expected"] = json!(390);
        r["s3"][0]["delivered"] = json!(400);
        assert_eq!(problems(&r, &ALL), Vec::<String>::new());
    }

    #[test]
    fn a_fully_delivered_step_slower_than_its_accepted_rate_is_refused() {
        // The 100 × 100 bug: everything delivered, but divided by a window a third too long.
        let mut r = healthy();
        r["s5"][0]["delivered_per_s"] = json!(400.0 / 3.0);
        let p = problems(&r, &ALL);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("s5 row 0 (Confab socket.io): every expected delivery arrived, yet delivered/s 133 is under 95 %"), "{p:?}");
        // A long tail explains a longer span: 400 in 2 s plus 1 s max latency is 133/s at least.
        r["s5"][0]["totals"]["recv_max_ms"] = json!(1000.0);
        assert_eq!(problems(&r, &ALL), Vec::<String>::new());
        // Not everything delivered: the rate says nothing about the window.
        r["s5"][0]["totals"]["recv_max_ms"] = json!(9.0);
        r["s5"][0]["delivered"] = json!(300);
        assert_eq!(problems(&r, &ALL), Vec::<String>::new());
    }

    #[test]
    fn sends_must_add_up_to_their_answers() {
        let mut r = healthy();
        r["s2"][0]["totals"]["refused"] = json!(2);
        assert_eq!(
            problems(&r, &ALL),
            vec![
                "s2 row 0 (Confab socket.io): accepted + refused + errors + unanswered is 42 but sent is 40"
            ]
        );
    }

    #[test]
    fn zero_samples_and_nan_percentiles_fail() {
        let mut r = healthy();
        r["s2"][0]["totals"]["received"] = json!(0);
        r["s3"][0]["totals"]["ack_p99_ms"] = Value::Null;
        r["s1"][0]["connected"] = json!(0);
        assert_eq!(
            problems(&r, &ALL),
            vec![
                "s1 row 0 (Confab /ws): connected is 0, expected > 0",
                "s2 row 0 (Confab socket.io): totals.received is 0, expected > 0",
                "s3 row 0 (Confab socket.io): totals.ack_p99_ms is not a finite number",
            ]
        );
    }
}
