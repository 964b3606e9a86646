//! `confab-bench check`: whether a run's results.json shows every scenario working (the test command's gate).
//!
//! It checks that the harness measured something, not how fast: a smoke run's numbers are
//! meaningless as measurements, but zero connections, zero samples, a lost message or a NaN
//! (written as `null` by serde_json) mean the harness or a server has rotted.

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
                    at.positive("totals.acked", &mut out);
                    at.positive("totals.received", &mut out);
                    at.zero("totals.failed", &mut out);
                }
                "s4" => {
                    at.positive("totals.connected", &mut out);
                    at.positive("totals.sent", &mut out);
                    at.zero("totals.failed", &mut out);
                    at.zero("totals.lost", &mut out);
                    at.positive("totals.disconnects", &mut out);
                    at.equal("totals.reconnected", "totals.disconnects", &mut out);
                    at.equal("totals.synced", "totals.reconnected", &mut out);
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
        json!({"connected": 20, "failed": 0, "sent": 40, "acked": 40, "ack_errors": 0,
            "received": 400, "ack_p50_ms": 1.2, "ack_p99_ms": 3.4, "recv_p99_ms": 5.6,
            "disconnects": 0, "reconnected": 0, "synced": 0, "lost": 0})
    }

    fn healthy() -> Value {
        let mut storm = totals();
        storm["disconnects"] = json!(57);
        storm["reconnected"] = json!(57);
        storm["synced"] = json!(57);
        json!({
            "mode": "Smoke",
            "pinning": {"server": null, "generator": null},
            "s1": [{"server": "Confab", "transport": "/ws", "connected": 100, "failed": 0,
                    "kb_per_connection": 11.3}],
            "s2": [{"server": "Confab", "transport": "socket.io", "totals": totals()}],
            "s3": [{"server": "Confab", "transport": "socket.io", "totals": totals()}],
            "s4": [{"transport": "/ws", "totals": storm}],
            "s5": [{"offered": 100.0, "totals": totals()}],
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
                .any(|m| m
                    == "s4 row 0 (/ws): totals.reconnected is 56 but totals.disconnects is 57"),
            "{p:?}"
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
