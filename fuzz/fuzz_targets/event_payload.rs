//! Event payload parsing: every client event's payload schema, fed arbitrary JSON, plus the
//! redaction of parse errors (which must never repeat a long value, such as a token).
#![no_main]

use confab_gateway::transport::EVENTS;
use confab_gateway::transport::protocol::{parse_request, redact};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(json) {
        let redacted = redact(&text);
        assert!(redacted.len() <= text.len() + 64 * (text.len() / 25 + 1));
    }
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    let event = EVENTS[selector as usize % EVENTS.len()];
    let mut long = Vec::new();
    long_strings(&payload, &mut long);
    if let Err(e) = parse_request(event, payload) {
        let text = e.to_string();
        // No run of the client's text longer than 32 characters without a space survives.
        for s in long {
            for run in s.split(char::is_whitespace) {
                if run.chars().count() > 32 {
                    assert!(!text.contains(run), "{text} repeats a long client string");
                }
            }
        }
    }
});

/// Every string (key or value) in `v` long enough that an error must not repeat it.
fn long_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match v {
        Value::String(s) if s.chars().count() > 24 => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| long_strings(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                if k.chars().count() > 24 {
                    out.push(k.clone());
                }
                long_strings(v, out);
            }
        }
        _ => {}
    }
}
