//! The tower layer under guestkey's gRPC servers that tells an
//! [`Observer`] the path, result code and duration of each call: the
//! source of `rpc_requests_total` and `rpc_duration_seconds` in
//! `guestkey-server`'s and `guestkeyd`'s `/metrics`.
//!
//! The code is read from the answer's headers: an error answered at once
//! carries `grpc-status` there (trailers-only), an answer with a body ends
//! with OK (a stream that fails later is not looked at). An answer that is
//! not an HTTP response at all counts as UNKNOWN (2).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Told of every call that got an answer.
pub trait Observer: Send + Sync + 'static {
    /// `path` is the call's (`/package.Service/Method`), `code` its gRPC
    /// status code, `seconds` the time to the answer's headers.
    fn call(&self, path: &str, code: i32, seconds: f64);
}

/// The name of gRPC status `code`, as the metrics label it.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|c| NAMES.get(c).copied())
        .unwrap_or("OTHER")
}

/// When the certificate in `pem` expires (Unix seconds; 0 if it does not
/// parse): the `certificate_expiry_timestamp_seconds` of both `/metrics`.
pub fn cert_expiry_unix(pem: &str) -> i64 {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .and_then(|(_, p)| {
            p.parse_x509()
                .ok()
                .map(|c| c.validity().not_after.timestamp())
        })
        .unwrap_or(0)
}

/// A scrape: the text of `/metrics` (OpenMetrics), or why there is none.
/// Run on a blocking thread (it may read a database or a store).
pub type Scrape = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` completes: the
/// text of `scrape`, or a 503 that says why there is none; any other path
/// is a 404.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    scrape: Scrape,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let handler = move || {
        let scrape = scrape.clone();
        async move {
            let text = tokio::task::spawn_blocking(move || scrape())
                .await
                .map_err(|e| format!("the scrape failed: {e}"))
                .and_then(|r| r);
            match text {
                Ok(t) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    t,
                ),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    format!("metrics unavailable: {e}\n"),
                ),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The layer (none: calls pass untouched).
#[derive(Clone)]
pub struct RpcLayer(pub Option<Arc<dyn Observer>>);

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = RpcCount<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcCount {
            inner,
            observer: self.0.clone(),
        }
    }
}

/// [`RpcLayer`]'s service.
#[derive(Clone)]
pub struct RpcCount<S> {
    inner: S,
    observer: Option<Arc<dyn Observer>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcCount<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(observer) = self.observer.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let path = req.uri().path().to_owned();
        let started = std::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                Err(_) => 2,
            };
            observer.call(&path, code, started.elapsed().as_secs_f64());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tower_layer::Layer;
    use tower_service::Service;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, i32)>>);
    impl Observer for Seen {
        fn call(&self, path: &str, code: i32, _: f64) {
            self.0.lock().unwrap().push((path.to_owned(), code));
        }
    }

    /// Answers `/ok` with a body, anything else with a trailers-only
    /// NOT_FOUND, `/down` with a transport error.
    #[derive(Clone)]
    struct Echo;
    impl tower_service::Service<http::Request<()>> for Echo {
        type Response = http::Response<()>;
        type Error = String;
        type Future = BoxFuture<Result<Self::Response, String>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let path = req.uri().path().to_owned();
            Box::pin(async move {
                match path.as_str() {
                    "/ok" => Ok(http::Response::new(())),
                    "/down" => Err("gone".to_owned()),
                    _ => Ok(http::Response::builder()
                        .header("grpc-status", "5")
                        .body(())
                        .unwrap()),
                }
            })
        }
    }

    #[tokio::test]
    async fn each_call_is_told_with_its_code() {
        let seen = Arc::new(Seen::default());
        let mut svc = RpcLayer(Some(seen.clone())).layer(Echo);
        for p in ["/ok", "/x.Y/Missing", "/down"] {
            let _ = svc
                .call(http::Request::builder().uri(p).body(()).unwrap())
                .await;
        }
        let got = seen.0.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                ("/ok".to_owned(), 0),
                ("/x.Y/Missing".to_owned(), 5),
                ("/down".to_owned(), 2)
            ]
        );
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!((code_name(17), code_name(-1)), ("OTHER", "OTHER"));
        assert_eq!(cert_expiry_unix("not a certificate"), 0);
        // No observer: the call passes, nothing is told.
        let mut plain = RpcLayer(None).layer(Echo);
        let r = plain
            .call(http::Request::builder().uri("/ok").body(()).unwrap())
            .await;
        assert!(r.is_ok());
    }
}
