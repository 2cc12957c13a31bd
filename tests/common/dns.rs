//! A small authoritative DNS server on loopback UDP, answering A and AAAA queries from a
//! table the test changes while it runs (TTL 0): the resolver a test controls.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// What the server answers for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// These addresses (the A query gets the IPv4 ones, AAAA the IPv6 ones).
    Addrs(Vec<IpAddr>),
    /// SERVFAIL.
    ServFail,
    /// Nothing at all (the query times out).
    Silent,
}

/// The server; stopped when dropped. Names not in the table get NXDOMAIN.
pub struct DnsServer {
    pub addr: SocketAddr,
    table: Arc<Mutex<HashMap<String, Answer>>>,
    /// Queries received so far.
    pub queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let table: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let (t, q) = (table.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let table = t.lock().unwrap().clone();
                if let Some(reply) = reply(&buf[..n], &table) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            table,
            queries,
            task,
        }
    }

    /// What `name` (lower case, no final dot) answers from now on.
    pub fn set(&self, name: &str, answer: Answer) {
        self.table.lock().unwrap().insert(name.to_string(), answer);
    }
}

/// The answer to one query message, `None` to stay silent (or on a malformed query).
fn reply(q: &[u8], table: &HashMap<String, Answer>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let (rcode, ips) = match table.get(&labels.join(".")) {
        None => (3, Vec::new()),
        Some(Answer::ServFail) => (2, Vec::new()),
        Some(Answer::Silent) => return None,
        Some(Answer::Addrs(ips)) => (0, ips.clone()),
    };
    let answers: Vec<Vec<u8>> = ips
        .iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), 1) => Some(v4.octets().to_vec()),
            (IpAddr::V6(v6), 28) => Some(v6.octets().to_vec()),
            _ => None,
        })
        .collect();
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]);
    // QR, opcode 0, AA, RD as asked; RA; the rcode.
    r.push(0x84 | (q[2] & 0x01));
    r.push(0x80 | rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    for data in answers {
        // The name as a pointer to the question's, the type asked, IN, TTL 0.
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    Some(r)
}
