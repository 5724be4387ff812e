//! Fair shares of the node's sockets, decided at accept time, before hyper reads a byte.
//!
//! `max_connections` only counts subscribers, and only once their request has been parsed;
//! a client that opens plain HTTP connections, or many connections from one address, could
//! take every file descriptor first. So every accepted TCP connection (WebSocket, SSE and
//! plain HTTP alike) takes a `ConnSlot` here: one from the node-wide `max_sockets`, one from
//! its address's `max_connections_per_ip`, and one token from its address's connect bucket.
//! The slot is released when the last holder drops it, on every path: a finished HTTP
//! connection, or the subscriber registration that outlives its upgraded request.
//!
//! Addresses are keyed as a client would be billed: an IPv4-mapped IPv6 address is its
//! IPv4 address, and other IPv6 addresses count per /64 (one customer's usual allocation,
//! so one host cannot escape the cap by rotating through its own addresses).
//!
//! The table is bounded: an address leaves it when it has no connection and its bucket is
//! full again (on release, or by the periodic `sweep`), and when it reaches
//! `2 * max_sockets` entries every address without a connection is dropped at once. Since
//! an address with a connection holds a socket, at most `max_sockets` entries survive that,
//! so the O(n) purge runs at most once per `max_sockets` new addresses.
//!
//! The connect bucket (`rate::TokenBucket`) lives in the same entry, under the same lock,
//! as the connection count, so that one bounded table decides both and an entry is removed
//! only when both are idle; governor's keyed limiter keeps its own map, whose size we could
//! not bound together with ours.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Config;
use crate::error_code::ErrorCode;
use crate::fd_limit::FILE_HEADROOM;
use crate::metrics::{Metrics, RefusalLabel};
use crate::rate::{Rate, TokenBucket};

tokio::task_local! {
    /// The slot of the TCP connection whose task is running. hyper polls handlers inside
    /// the connection task, so a subscriber `Registration` created there can keep the slot
    /// for as long as it lives: a WebSocket outlives its HTTP exchange once upgraded, and
    /// must go on counting against its address until it closes.
    pub static CONN_SLOT: Arc<ConnSlot>;
}

/// Why a connection was refused at accept; each is a metric label and a fixed response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    MaxSockets,
    PerIp,
    ConnectRate,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::MaxSockets, Refusal::PerIp, Refusal::ConnectRate];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxSockets => "max_sockets",
            Refusal::PerIp => "per_ip",
            Refusal::ConnectRate => "connect_rate",
        }
    }

    /// The whole HTTP/1.1 answer written to a refused socket, built once: refusing must
    /// cost less than the connection attempt did.
    pub fn response(self) -> &'static [u8] {
        static RESPONSES: LazyLock<[Vec<u8>; 3]> = LazyLock::new(|| {
            Refusal::ALL.map(|r| {
                let (code, message) = match r {
                    Refusal::MaxSockets => (
                        ErrorCode::ServerFull,
                        "this node holds its maximum of open sockets (max_sockets)",
                    ),
                    Refusal::PerIp => (
                        ErrorCode::TooManyConnectionsPerIp,
                        "your address holds its maximum of open connections \
                         (max_connections_per_ip)",
                    ),
                    Refusal::ConnectRate => (
                        ErrorCode::ConnectRateExceeded,
                        "your address opens connections too fast (connect_rate_per_ip)",
                    ),
                };
                let body =
                    serde_json::json!({"error": {"code": code.as_str(), "message": message}})
                        .to_string();
                let status = code.status().expect("refusals are HTTP answers");
                let status = format!(
                    "{} {}",
                    status.as_str(),
                    status.canonical_reason().unwrap_or("")
                );
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            })
        });
        &RESPONSES[self as usize]
    }
}

/// One accepted TCP connection's share. Dropping the last clone gives it back.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    key: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.release(self.key, Instant::now());
    }
}

struct Entry {
    conns: u32,
    connects: TokenBucket,
}

pub struct ConnLimits {
    max_sockets: usize,
    max_per_ip: u32,
    connect_rate: Rate,
    max_tracked: usize,
    sockets: AtomicUsize,
    /// Held only for a map operation, never across an `.await`.
    table: Mutex<HashMap<IpAddr, Entry>>,
    refused: [Counter; 3],
    sockets_gauge: Gauge,
    tracked_gauge: Gauge,
}

/// How an address is counted: IPv4-mapped IPv6 as IPv4, other IPv6 by its /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

impl ConnLimits {
    pub fn new(cfg: &Config, metrics: &Metrics) -> Self {
        ConnLimits {
            max_sockets: cfg.max_sockets,
            max_per_ip: cfg.max_connections_per_ip.min(u32::MAX as usize) as u32,
            connect_rate: Rate {
                per_second: f64::from(cfg.connect_rate_per_ip),
                burst: f64::from(cfg.connect_burst_per_ip),
            },
            max_tracked: cfg.max_sockets.saturating_mul(2).max(1024),
            sockets: AtomicUsize::new(0),
            table: Mutex::new(HashMap::new()),
            refused: Refusal::ALL.map(|r| {
                metrics
                    .refused_connections
                    .get_or_create(&RefusalLabel { reason: r.label() })
                    .clone()
            }),
            sockets_gauge: metrics.sockets.clone(),
            tracked_gauge: metrics.tracked_ips.clone(),
        }
    }

    /// Takes a share for a new connection from `peer`, or says why not.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnSlot, Refusal> {
        self.admit_at(peer, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Result<ConnSlot, Refusal> {
        let max = self.max_sockets;
        if self
            .sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            self.refused[Refusal::MaxSockets as usize].inc();
            return Err(Refusal::MaxSockets);
        }
        let key = ip_key(peer);
        let verdict = {
            let mut table = self.table.lock();
            if table.len() >= self.max_tracked && !table.contains_key(&key) {
                table.retain(|_, e| e.conns > 0);
            }
            let rate = self.connect_rate;
            let e = table.entry(key).or_insert_with(|| Entry {
                conns: 0,
                connects: TokenBucket::full(rate, now),
            });
            let verdict = if e.conns >= self.max_per_ip {
                Err(Refusal::PerIp)
            } else if !e.connects.take(rate, now) {
                Err(Refusal::ConnectRate)
            } else {
                e.conns += 1;
                Ok(())
            };
            self.tracked_gauge.set(table.len() as i64);
            verdict
        };
        match verdict {
            Ok(()) => {
                self.sockets_gauge.inc();
                Ok(ConnSlot {
                    limits: self.clone(),
                    key,
                })
            }
            Err(why) => {
                self.sockets.fetch_sub(1, Ordering::AcqRel);
                self.refused[why as usize].inc();
                Err(why)
            }
        }
    }

    fn release(&self, key: IpAddr, now: Instant) {
        {
            let mut table = self.table.lock();
            if let Some(e) = table.get_mut(&key) {
                e.conns = e.conns.saturating_sub(1);
                if e.conns == 0 {
                    e.connects.refill(self.connect_rate, now);
                    if e.connects.is_full(self.connect_rate) {
                        table.remove(&key);
                    }
                }
            }
            self.tracked_gauge.set(table.len() as i64);
        }
        self.sockets.fetch_sub(1, Ordering::AcqRel);
        self.sockets_gauge.dec();
    }

    /// Forgets every address with no connection whose bucket has refilled: what it would
    /// be told on its next connection no longer depends on its past. O(table); the server
    /// runs it once a second.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let mut table = self.table.lock();
        let rate = self.connect_rate;
        table.retain(|_, e| {
            if e.conns > 0 {
                return true;
            }
            e.connects.refill(rate, now);
            !e.connects.is_full(rate)
        });
        self.tracked_gauge.set(table.len() as i64);
    }

    /// Open TCP connections of any kind.
    pub fn open_sockets(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }

    /// Addresses in the table (with connections, or a bucket still refilling).
    pub fn tracked_ips(&self) -> usize {
        self.table.lock().len()
    }

    /// Open connections counted against `ip`'s address.
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.table
            .lock()
            .get(&ip_key(ip))
            .map_or(0, |e| e.conns as usize)
    }

    /// What the limits need from the open-file limit: every socket, plus the files and
    /// descriptors the process holds besides (data store, listener, runtime, stdio).
    pub fn files_needed(&self) -> u64 {
        self.max_sockets as u64 + FILE_HEADROOM
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(tweak: impl FnOnce(&mut Config)) -> Arc<ConnLimits> {
        let mut cfg = Config::default();
        tweak(&mut cfg);
        Arc::new(ConnLimits::new(&cfg, &Metrics::new()))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4_and_ipv6_counts_per_64() {
        assert_eq!(ip_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            ip_key(ip("2001:db8:1:2::1")),
            ip_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(ip_key(ip("2001:db8:1:2::1")), ip_key(ip("2001:db8:1:3::1")));
        let l = limits(|c| c.max_connections_per_ip = 1);
        let _a = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            l.admit(ip("::ffff:10.0.0.1")).err(),
            Some(Refusal::PerIp),
            "the mapped form is the same client"
        );
    }

    #[test]
    fn per_ip_cap_is_released_on_drop_and_entries_leave() {
        let l = limits(|c| c.max_connections_per_ip = 2);
        let a = l.admit(ip("10.0.0.1")).unwrap();
        let b = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1")).err(), Some(Refusal::PerIp));
        let _other = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.connections_from(ip("10.0.0.1")), 2);
        drop(a);
        let c = l.admit(ip("10.0.0.1")).unwrap();
        drop((b, c, _other));
        assert_eq!(l.open_sockets(), 0);
        // Buckets still refilling keep the entries; once full, a sweep removes them.
        l.sweep_at(Instant::now() + Duration::from_secs(3600));
        assert_eq!(l.tracked_ips(), 0);
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let l = limits(|c| {
            c.connect_burst_per_ip = 3;
            c.connect_rate_per_ip = 2;
        });
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(l.admit_at(ip("10.0.0.1"), t0).unwrap());
        }
        assert_eq!(
            l.admit_at(ip("10.0.0.1"), t0).err(),
            Some(Refusal::ConnectRate)
        );
        // Another address has its own bucket.
        held.push(l.admit_at(ip("10.0.0.2"), t0).unwrap());
        // Half a second buys one connection at 2/s, not two.
        let t1 = t0 + Duration::from_millis(500);
        held.push(l.admit_at(ip("10.0.0.1"), t1).unwrap());
        assert_eq!(
            l.admit_at(ip("10.0.0.1"), t1).err(),
            Some(Refusal::ConnectRate)
        );
        let refused = l.refused[Refusal::ConnectRate as usize].get();
        assert_eq!(refused, 2);
    }

    #[test]
    fn total_socket_cap_counts_every_address() {
        let l = limits(|c| c.max_sockets = 2);
        let _a = l.admit(ip("10.0.0.1")).unwrap();
        let b = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.3")).err(), Some(Refusal::MaxSockets));
        drop(b);
        assert!(l.admit(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn defaults_let_a_10000_client_benchmark_from_4_addresses_connect_at_once() {
        let l = limits(|_| {});
        let t0 = Instant::now();
        let mut held = Vec::new();
        for i in 0..10_000u32 {
            let src = IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
            held.push(l.admit_at(src, t0).expect("admitted on defaults"));
        }
        // Its publishers and a few thousand other users still fit.
        for _ in 0..2_000 {
            held.push(l.admit_at(ip("127.0.0.1"), t0).unwrap());
        }
        assert_eq!(l.open_sockets(), 12_000);
        // Everyone leaves and comes back 3 s later (a second benchmark run, a NAT's
        // reconnect storm after a deploy): the buckets have refilled.
        held.clear();
        let t1 = t0 + std::time::Duration::from_secs(3);
        for i in 0..10_000u32 {
            let src = IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
            held.push(l.admit_at(src, t1).expect("admitted again 3 s later"));
        }
    }

    #[test]
    fn table_stays_bounded_under_many_addresses() {
        let l = limits(|c| c.max_sockets = 10);
        let cap = l.max_tracked;
        let t0 = Instant::now();
        let held: Vec<_> = (0..5u32)
            .map(|i| l.admit_at(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), t0))
            .collect();
        for i in 0..(cap as u32 * 3) {
            let slot = l
                .admit_at(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), t0)
                .unwrap();
            drop(slot);
            assert!(l.tracked_ips() <= cap);
        }
        // Addresses with connections are never forgotten.
        for i in 0..5u32 {
            assert_eq!(
                l.connections_from(IpAddr::from((0x0a00_0000 + i).to_be_bytes())),
                1
            );
        }
        drop(held);
    }
}
