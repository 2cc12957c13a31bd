//! A TCP relay the test can cut: a replica that reaches Redis through it is partitioned
//! from the store (and only that replica) when the test says so, and back when it says so.
//!
//! Cut, it drops every connection it relays and holds new ones open in silence (a
//! partition, not a refusal: the client sees its commands time out); restored, it drops
//! the silent ones (the client reconnects) and relays again.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The connections' tasks end with the sender (their `wait_for` fails).
        self.task.abort();
    }
}

impl Relay {
    /// Relays 127.0.0.1:`target` from a port of its own on loopback.
    pub async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (cut, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    if *rx.borrow() {
                        // Silence until restored, then gone.
                        let _ = rx.wait_for(|cut| !*cut).await;
                        return;
                    }
                    let connect = TcpStream::connect(("127.0.0.1", target));
                    let Ok(Ok(mut up)) =
                        tokio::time::timeout(Duration::from_secs(2), connect).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }

    /// `redis://` through the relay.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Partitions whoever connects through the relay.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Relays again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}
