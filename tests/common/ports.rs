//! Loopback ports for the processes a test starts, without the bind-and-release race (a
//! port the test frees for a child can be taken by anyone before the child binds it).
//!
//! - [`listening_ports`]: what a process actually listens on, read back from `/proc`, for
//!   a child told to listen on port 0 (the OS picks a free port, the test reads it back).
//! - [`ReservedPort`]: a port held for a child that cannot be given port 0 (Kanaria's proxy
//!   listeners: see [`crate::common::Proxy`]) or that must get the same port again when it
//!   restarts (Redis).
//! - [`DeadAddr`]: an address where connections are refused for as long as the test runs.
//!
//! Linux only, like the rest of the suite (`/proc`, and the kernel's rules for binding a
//! port that a socket with `SO_REUSEADDR` holds).

use std::collections::HashSet;
use std::net::SocketAddr;

use tokio::net::TcpSocket;

/// A loopback port held for a child process to listen on: a socket bound to
/// `127.0.0.1:PORT` with `SO_REUSEADDR` that never listens. While it is held, the kernel
/// gives the port to no `bind(…:0)` and to no outgoing connection, so nothing else takes
/// it; a server that sets `SO_REUSEADDR` itself (std's and tokio's `TcpListener`, Pingora,
/// `redis-server` all do) can still bind and listen on it, as often as it restarts. The
/// port is free again when this is dropped.
pub struct ReservedPort {
    port: u16,
    _socket: TcpSocket,
}

impl ReservedPort {
    /// A port the OS picks.
    pub fn new() -> ReservedPort {
        Self::on(0).expect("reserve a loopback port")
    }

    /// `port` itself (e.g. one a killed child just released), or the error if it is taken.
    pub fn on(port: u16) -> std::io::Result<ReservedPort> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        let port = socket.local_addr()?.port();
        Ok(ReservedPort {
            port,
            _socket: socket,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// An address where nothing listens, for as long as this value lives: a socket bound to it
/// without `SO_REUSEADDR` that never listens. A connection to it is refused (the kernel
/// answers a SYN to a port without a listener with a reset), and no one else can bind it,
/// with or without `SO_REUSEADDR`, so it cannot start answering mid-test.
pub struct DeadAddr {
    pub addr: SocketAddr,
    _socket: TcpSocket,
}

impl DeadAddr {
    pub fn new() -> DeadAddr {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a dead address");
        let addr = socket.local_addr().expect("dead address");
        DeadAddr {
            addr,
            _socket: socket,
        }
    }
}

/// The TCP ports process `pid` listens on (IPv4 and IPv6, sorted, each once), read from
/// `/proc`: the inodes of its socket descriptors matched against the LISTEN rows (state
/// `0A`) of `/proc/PID/net/tcp` and `tcp6`. Empty if the process is gone.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let mut ports: Vec<u16> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|row| {
                    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    let f: Vec<&str> = row.split_whitespace().collect();
                    let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
                    if *state != "0A" || !inodes.contains(*inode) {
                        return None;
                    }
                    u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
