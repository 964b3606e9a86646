//! The `/ws` frame decoder: any text frame a client may send, before and after authentication.
#![no_main]

use confab_gateway::transport::protocol::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match ClientFrame::decode(data) {
        Ok(frame) => {
            // A decoded frame's payload goes on to the request parsers, as in the transport.
            let _ = confab_gateway::transport::protocol::parse_request(&frame.kind, frame.payload);
        }
        Err((_, e)) => {
            // The error names the problem without repeating long client text (tokens).
            let text = e.to_string();
            assert!(
                text.len() < 2048,
                "an error message of {} bytes",
                text.len()
            );
        }
    }
});
