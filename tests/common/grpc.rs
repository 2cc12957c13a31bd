//! A gRPC-like upstream: a real HTTP/2 (h2c, prior knowledge) hyper server answering every
//! request with one length-prefixed message and a `grpc-status` trailer, as gRPC servers do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The server; `set_status` changes the `grpc-status` of the next answers.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    status: Arc<AtomicU32>,
    pub requests: Arc<AtomicU64>,
    /// Every request so far carried `te: trailers` and a gRPC content type.
    pub saw_grpc_headers: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One gRPC message frame: uncompressed flag, big-endian length, payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl GrpcUpstream {
    pub async fn start(name: &'static str) -> GrpcUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU32::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let saw = Arc::new(AtomicBool::new(true));
        let (s, r, w) = (status.clone(), requests.clone(), saw.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, r, w) = (s.clone(), r.clone(), w.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, r, w) = (s.clone(), r.clone(), w.clone());
                        async move {
                            r.fetch_add(1, Ordering::SeqCst);
                            let grpc = req.headers().get("te").is_some_and(|v| v == "trailers")
                                && req
                                    .headers()
                                    .get("content-type")
                                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            if !grpc {
                                w.store(false, Ordering::SeqCst);
                            }
                            // Read the request message fully, as a unary call does.
                            let _ = req.into_body().collect().await;
                            let code = s.load(Ordering::SeqCst);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", code.to_string().parse().unwrap());
                            if code != 0 {
                                trailers
                                    .insert("grpc-message", "canary unavailable".parse().unwrap());
                            }
                            let body = Full::new(Bytes::from(frame(name.as_bytes())))
                                .with_trailers(async move { Some(Ok(trailers)) });
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("x-upstream", name)
                                    .body(body)
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GrpcUpstream {
            addr,
            status,
            requests,
            saw_grpc_headers: saw,
            task,
        }
    }

    pub fn set_status(&self, code: u32) {
        self.status.store(code, Ordering::SeqCst);
    }
}
