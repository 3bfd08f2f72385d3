//! A server process a test owns (on a free port, with its own data directory), so it
//! can kill and restart it without touching the shared one.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test-owned server: `program` with `args`, listening on `port`.
pub struct OwnServer {
    program: &'static str,
    args: Vec<String>,
    child: Option<Child>,
    /// The loopback port it listens on.
    pub port: u16,
}

impl OwnServer {
    /// Starts the server and waits until it accepts connections.
    pub fn start(program: &'static str, args: Vec<String>, port: u16) -> Self {
        let mut s = Self {
            program,
            args,
            child: None,
            port,
        };
        s.spawn();
        s
    }

    /// Starts it (again), on the same port and data.
    pub fn spawn(&mut self) {
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} is installed (scripts/test installs it): {e}",
                    self.program
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it the way a crash would (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}
