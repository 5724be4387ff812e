//! A real `redis-server` for the tests of the Redis broker: started on a free loopback port
//! in its own temporary directory (no persistence unless asked), stopped when dropped. No
//! mock: the broker's Lua scripts, streams and pub/sub run against the real thing.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

/// Whether `redis-server` is installed, under the one missing-tool policy of
/// `common::tools` (a failure under CI, a noted skip elsewhere).
pub fn available() -> bool {
    super::tools::require("redis-server", "apt-get install -y redis-server").is_some()
}

/// A node started as the real binary, `crier serve --redis URL`, on a free port: the
/// process (killed when dropped), its address and its data directory.
pub fn node(redis: &RedisServer) -> (super::Proc, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (proc, addr) = super::serve_binary(dir.path(), "127.0.0.1:0", &["--redis", &redis.url()]);
    (proc, addr, dir)
}

impl RedisServer {
    /// Starts `redis-server` (scripts/test installs it when missing). A port taken between
    /// finding it free and redis binding it makes redis exit: then another port is tried.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Persistent: every write is in the AOF (fsynced) before Redis answers it, so a
    /// SIGKILL and `restart` keep every acknowledged write.
    pub fn start_with_aof() -> RedisServer {
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// Like `start`, with extra `redis-server` options after the defaults (so they win),
    /// e.g. `["--appendonly", "yes", "--appendfsync", "always"]` for a Redis that keeps
    /// what it acknowledged across a SIGKILL. `restart` starts it again with them, in the
    /// same directory, so it reloads its files.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            // Kept in the directory rather than a new field, so constructors added
            // elsewhere keep compiling.
            std::fs::write(dir.path().join(EXTRA_ARGS), extra.join("\n")).unwrap();
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = spawn(port, dir.path());
            let deadline = Instant::now() + super::WAIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: try another
                }
                if ping(port, child.id()) {
                    return RedisServer { child, port, dir };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    /// SIGKILL: what Redis had in memory and had not written to its files is gone (without
    /// `start_with` persistence options, everything).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and directory, with the same options, after
    /// `kill`: empty, or reloaded from its files when it was started with persistence.
    pub fn restart(&mut self) {
        self.child = spawn(self.port, self.dir.path());
        let deadline = Instant::now() + super::WAIT;
        while !ping(self.port, self.child.id()) {
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// The file in a server's directory holding its extra options, one per line.
const EXTRA_ARGS: &str = "crier-test-args";

fn spawn(port: u16, dir: &std::path::Path) -> Child {
    let extra = std::fs::read_to_string(dir.join(EXTRA_ARGS)).unwrap_or_default();
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        // DEBUG SLEEP stalls it, for the tests of a stalled Redis.
        .args(["--enable-debug-command", "local"])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra.split('\n').filter(|_| !extra.is_empty()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("redis-server runs (apt-get install redis-server)")
}

/// Whether redis answers PING on the port.
/// Whether the Redis answering on `port` is the process `pid`. A port picked by binding
/// port 0 and letting go can be picked by another test (or test process) meanwhile: its
/// Redis answers PING as well, and a test that took it for its own would see it killed
/// under it ("broken pipe") when the other test ends.
fn ping(port: u16, pid: u32) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    // A bulk string: `$LEN\r\n` then the text, which names the server's process id.
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !text.ends_with(b"\r\n\r\n") && text.len() < 64 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&text)
        .lines()
        .any(|l| l.trim() == format!("process_id:{pid}"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
