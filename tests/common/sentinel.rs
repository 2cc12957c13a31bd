//! Redis Sentinel for the fleet's failover tests: a replica of a [`Redis`] and a sentinel
//! (`redis-server --sentinel`, as Debian's `redis-sentinel` runs it) that monitors the
//! primary and fails over to the replica within about a second of the primary's death.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::ports::{self, ReservedPort};
use super::{eventually, Redis};

impl Redis {
    /// Restarts this server (empty) as a replica of the server on `primary_port`, returned
    /// once it answers PING (its link to the primary comes up by itself).
    pub async fn restart_as_replica_of(&mut self, primary_port: u16) {
        self.extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary_port.to_string(),
        ];
        self.restart().await;
    }

    /// Restarts this server as a primary: without the `--replicaof` of an earlier
    /// [`Redis::restart_as_replica_of`], which would otherwise make a primary that comes
    /// back a replica of its own replica (a loop with no primary, seen in chaos seed 703694).
    pub async fn restart_as_primary(&mut self) {
        self.extra.clear();
        self.restart().await;
    }

    /// A server replicating `primary`, returned once its link to the primary is up.
    pub async fn start_replica_of(primary: &Redis) -> Redis {
        let mut r = Redis::new(false);
        r.extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ];
        r.restart().await;
        let port = r.port;
        eventually(
            "the replica's link to the primary",
            Duration::from_secs(20),
            || async move {
                let info = info(port, "replication").await;
                if info.contains("master_link_status:up") {
                    Ok(())
                } else {
                    Err(info)
                }
            },
        )
        .await;
        r
    }
}

/// `INFO <section>` of the server on `port` (empty when it does not answer).
pub async fn info(port: u16, section: &str) -> String {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
        return String::new();
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return String::new();
    };
    redis::cmd("INFO")
        .arg(section)
        .query_async::<String>(&mut conn)
        .await
        .unwrap_or_default()
}

/// One sentinel monitoring `master` (quorum 1: it alone decides a failover), the primary
/// declared down after 500 ms without an answer.
pub struct Sentinel {
    pub port: u16,
    pub master: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    _reserved: ReservedPort,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Sentinel {
    /// Starts monitoring `primary` and returns once the sentinel knows `replicas` replicas
    /// of it (a failover needs one to promote).
    pub async fn start(primary: &Redis, master: &str, replicas: usize) -> Sentinel {
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let dir = tempfile::tempdir().expect("tempdir");
        // Sentinel rewrites its config file: it must be its own, writable.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {master} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {master} 500\n\
                 sentinel failover-timeout {master} 3000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir = dir.path().display(),
                primary = primary.port,
            ),
        )
        .expect("sentinel.conf");
        let log = std::fs::File::create(dir.path().join("sentinel.log")).expect("sentinel log");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel (Debian's redis-server or redis-sentinel)");
        let s = Sentinel {
            port,
            master: master.to_string(),
            child: Some(child),
            dir,
            _reserved: reserved,
        };
        let pid = s.child.as_ref().map(Child::id).unwrap_or(0);
        eventually("the sentinel to listen", Duration::from_secs(20), || {
            let listening = ports::listening_ports(pid).contains(&port);
            async move {
                if listening {
                    Ok(())
                } else {
                    Err("not listening yet")
                }
            }
        })
        .await;
        let sentinel = &s;
        eventually(
            "the sentinel to know the primary's replicas",
            Duration::from_secs(30),
            || async move {
                let n = sentinel.replicas().await;
                if n >= replicas {
                    Ok(())
                } else {
                    Err(format!("{n} replicas known"))
                }
            },
        )
        .await;
        s
    }

    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()
    }

    /// How many replicas of the master the sentinel knows.
    async fn replicas(&self) -> usize {
        let Some(mut c) = self.conn().await else {
            return 0;
        };
        redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(&self.master)
            .query_async::<Vec<redis::Value>>(&mut c)
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }

    /// The primary's port as the sentinel names it now.
    pub async fn primary_port(&self) -> Option<u16> {
        let mut c = self.conn().await?;
        let (_, port): (String, String) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(&mut c)
            .await
            .ok()?;
        port.parse().ok()
    }

    /// The sentinel's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}
