//! The upstream keep-alive pool (vendored pingora-pool's `StreamPool` behind Pingora's
//! `TransportConnector`, patch 0013): a released connection is reused; one past its idle
//! timeout is never reused and is closed by the pool's sweeper; one the upstream closed is
//! never handed out and is closed; the size cap evicts the least recently released (with the
//! keep-alive pool callback); dropping the connector closes what it holds. Real TCP
//! connections to listeners on 127.0.0.1, observed from the upstream's side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::upstreams::peer::BasicPeer;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn upstream() -> (TcpListener, BasicPeer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    (listener, BasicPeer::new(&addr))
}

async fn accept(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the connector connected")
        .expect("accept")
        .0
}

/// Waits for the upstream's end of a connection to see it closed (end of stream, or a reset
/// when the pool closed it with unread data) and returns how long that took.
async fn closed_within(server: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(limit, server.read(&mut buf))
        .await
        .expect("the pool closed the connection in time");
    match read {
        Ok(n) => assert_eq!(n, 0, "end of stream, not data"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    start.elapsed()
}

/// Writes through the connector's stream and reads it on `server`: proves both ends are one
/// connection.
async fn same_connection(stream: &mut pingora::protocols::Stream, server: &mut TcpStream) {
    stream.write_all(b"ping").await.expect("write");
    stream.flush().await.expect("flush");
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut buf))
        .await
        .expect("data in time")
        .expect("read");
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn reuse_returns_the_pooled_connection() {
    let (listener, peer) = upstream().await;
    let connector = TransportConnector::new(None);
    let (stream, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(!reused);
    let mut server = accept(&listener).await;
    connector.release_stream(
        stream,
        pingora::upstreams::peer::Peer::reuse_hash(&peer),
        None,
    );

    let (mut stream, reused) = connector.get_stream(&peer).await.expect("reuse");
    assert!(reused, "the released connection is handed out again");
    same_connection(&mut stream, &mut server).await;

    // Nothing pooled now: the next stream is a new connection.
    let (_fresh, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(!reused);
    let _second = accept(&listener).await;
}

#[tokio::test]
async fn idle_timeout_expired_connection_is_closed_by_the_sweeper_not_reused() {
    let (listener, mut peer) = upstream().await;
    peer.options.idle_timeout = Some(Duration::from_millis(200));
    let connector = TransportConnector::new(None);
    let (stream, _) = connector.get_stream(&peer).await.expect("connect");
    let mut server = accept(&listener).await;
    let key = pingora::upstreams::peer::Peer::reuse_hash(&peer);
    connector.release_stream(stream, key, peer.options.idle_timeout);

    // The sweeper is woken for the deadline: closed soon after 200 ms, well within the 1 s
    // sweep interval plus slack.
    let took = closed_within(&mut server, Duration::from_secs(3)).await;
    assert!(
        took >= Duration::from_millis(150),
        "not before its idle timeout: {took:?}"
    );

    let (_fresh, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(!reused, "an expired connection is never reused");
    let _second = accept(&listener).await;
}

#[tokio::test]
async fn connection_past_its_timeout_is_not_reused_even_before_a_sweep() {
    let (listener, mut peer) = upstream().await;
    let connector = TransportConnector::new(None);
    let (stream, _) = connector.get_stream(&peer).await.expect("connect");
    let _server = accept(&listener).await;
    // A zero idle timeout expires at release: the reuse's own deadline check refuses it,
    // whether or not the sweeper ran.
    peer.options.idle_timeout = Some(Duration::ZERO);
    let key = pingora::upstreams::peer::Peer::reuse_hash(&peer);
    connector.release_stream(stream, key, peer.options.idle_timeout);
    let (_fresh, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(!reused);
}

#[tokio::test]
async fn connection_the_upstream_closed_is_never_handed_out_and_is_closed() {
    let (listener, peer) = upstream().await;
    let connector = TransportConnector::new(None);
    let key = pingora::upstreams::peer::Peer::reuse_hash(&peer);

    // The upstream half-closes an idle connection (sends FIN, keeps reading): the sweeper
    // notices within its 1 s interval and closes our end, which the upstream reads as EOF.
    let (stream, _) = connector.get_stream(&peer).await.expect("connect");
    let mut server = accept(&listener).await;
    connector.release_stream(stream, key, None);
    server.shutdown().await.expect("half-close");
    let took = closed_within(&mut server, Duration::from_secs(3)).await;
    // Nothing but a sweep closes it (no reuse was asked for); the bound leaves room for a
    // loaded machine.
    assert!(
        took <= Duration::from_millis(2_500),
        "closed by a sweep: {took:?}"
    );
    let (_fresh, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(!reused);
    let _fresh_server = accept(&listener).await;

    // Closed by the upstream and asked for at once: the reuse's own check refuses it once our
    // reactor has seen the FIN (it polls on each park; a short sleep parks it).
    let connector = TransportConnector::new(None);
    let (stream, _) = connector.get_stream(&peer).await.expect("connect");
    let server = accept(&listener).await;
    connector.release_stream(stream, key, None);
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_fresh, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(
        !reused,
        "a connection the upstream closed is never handed out"
    );
    let _fresh_server = accept(&listener).await;

    // Unexpected data on an idle connection: not handed out either.
    let connector = TransportConnector::new(None);
    let (stream, _) = connector.get_stream(&peer).await.expect("connect");
    let mut server = accept(&listener).await;
    connector.release_stream(stream, key, None);
    server
        .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_fresh, reused) = connector.get_stream(&peer).await.expect("connect");
    assert!(
        !reused,
        "a connection with unexpected data is never handed out"
    );
    closed_within(&mut server, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn the_size_cap_evicts_the_least_recently_released() {
    let (listener, peer) = upstream().await;
    let evictions: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let seen = evictions.clone();
    let mut options = ConnectorOptions::new(1);
    options.keepalive_pool_callback = Some(Arc::new(move |idle| {
        seen.lock().expect("callback lock").push(idle)
    }));
    let connector = TransportConnector::new(Some(options));
    let key = pingora::upstreams::peer::Peer::reuse_hash(&peer);

    let (a, _) = connector.get_stream(&peer).await.expect("connect a");
    let mut server_a = accept(&listener).await;
    let (b, _) = connector.get_stream(&peer).await.expect("connect b");
    let mut server_b = accept(&listener).await;
    connector.release_stream(a, key, None);
    assert!(evictions.lock().expect("lock").is_empty());
    connector.release_stream(b, key, None);

    // A pool of one: releasing b evicts a, which is closed and reported.
    closed_within(&mut server_a, Duration::from_secs(3)).await;
    assert_eq!(evictions.lock().expect("lock").len(), 1);
    let (mut stream, reused) = connector.get_stream(&peer).await.expect("reuse");
    assert!(reused);
    same_connection(&mut stream, &mut server_b).await;
}

#[tokio::test]
async fn dropping_the_connector_closes_its_idle_connections() {
    let (listener, peer) = upstream().await;
    let connector = TransportConnector::new(None);
    let (stream, _) = connector.get_stream(&peer).await.expect("connect");
    let mut server = accept(&listener).await;
    connector.release_stream(
        stream,
        pingora::upstreams::peer::Peer::reuse_hash(&peer),
        None,
    );
    // The sweeper holds the pool weakly: the connector is the pool's only owner.
    drop(connector);
    closed_within(&mut server, Duration::from_secs(3)).await;
}
