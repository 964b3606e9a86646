//! Harness for end-to-end tests across processes: find the built gateway binary, start it on a
//! free port, read the URL it prints, stop it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `confab-gateway` binary: `$CONFAB_GATEWAY_BIN`, else the workspace's target directory.
pub fn gateway_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CONFAB_GATEWAY_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug").join("confab-gateway");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build -p confab-gateway` first or set CONFAB_GATEWAY_BIN",
        bin.display()
    );
    bin
}

/// A running gateway process, killed when dropped.
pub struct Running {
    pub child: Child,
    pub url: String,
    /// Every stdout line printed up to and including the URL line, plus what follows shortly.
    pub stdout: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` (a gateway invocation) and waits for its "listening on" line.
pub fn start(mut command: Command) -> Running {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("gateway binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let url = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let found = line.split("listening on ").nth(1).map(str::to_owned);
                lines.push(line);
                if let Some(url) = found {
                    break url;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("gateway output");
                panic!(
                    "gateway did not print its URL; stdout: {lines:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    };
    // The dev-mode lines follow the URL line at once.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        lines.push(line);
    }
    Running {
        child,
        url,
        stdout: lines,
    }
}
