//! Admin HTTP on a loopback address: `/healthz` and `/metrics` (Prometheus text format).
//!
//! `/healthz` answers with a JSON body (see [`crate::health::Report`]): status `ok`, or
//! `degraded` when a destination is down (records are buffered; 200 either way), `starting`
//! until ingress listens (503: the admin listener opens first, and a 200 must mean devices can
//! connect), or `failing` when the buffer does not take writes (503).
//!
//! With `admin.token_file`, every request must carry `Authorization: Bearer <token>` (401
//! otherwise; compared in constant time); the token is read once at start.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::info;

use crate::health::Health;
use crate::shutdown::Shutdown;

/// Binds the admin listener (so a bad address fails start-up) and returns the server future.
pub async fn serve(
    addr: SocketAddr,
    token_file: Option<&std::path::Path>,
    metrics: PrometheusHandle,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let token = match token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read admin.token_file {}: {e}", path.display())
            })?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                anyhow::bail!(
                    "admin.token_file {}: the token must be at least 16 characters",
                    path.display()
                );
            }
            Some(std::sync::Arc::new(t))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin HTTP on {addr}: {e}"))?;
    info!(listen = %addr, "admin HTTP listening (/healthz, /metrics)");
    let app = Router::new()
        .route(
            "/healthz",
            get(move || {
                let report = health.report();
                async move {
                    let code = if report.ready && report.buffer.accepts_writes {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let mut body = serde_json::to_string_pretty(&report).unwrap_or_default();
                    body.push('\n');
                    (code, [("content-type", "application/json")], body).into_response()
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move { body }
            }),
        );
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                if let Some(t) = token {
                    let given = req
                        .headers()
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or("");
                    let ok: bool =
                        subtle::ConstantTimeEq::ct_eq(given.as_bytes(), t.as_bytes()).into();
                    if !ok {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [("www-authenticate", "Bearer")],
                            "a bearer token is required (admin.token_file)\n",
                        )
                            .into_response();
                    }
                }
                next.run(req).await
            }
        },
    ));
    Ok(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, auth: Option<&str>) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let header = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        s.write_all(format!("GET /healthz HTTP/1.0\r\n{header}\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or("").to_string()
    }

    #[tokio::test]
    async fn with_a_token_file_every_request_needs_the_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef-secret\n").unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let (_trigger, shutdown) = crate::shutdown::channel();
        let health = Health::default();
        health.set_ready();
        let server = serve(addr, Some(&token), metrics, health, shutdown)
            .await
            .unwrap();
        tokio::spawn(server);
        assert!(get(addr, None).await.contains("401"));
        assert!(get(addr, Some("Bearer wrong")).await.contains("401"));
        assert!(get(addr, Some("Bearer 0123456789abcdef-secret"))
            .await
            .contains("200"));
        // A short token is refused at start.
        std::fs::write(&token, "short").unwrap();
        let (_t, shutdown) = crate::shutdown::channel();
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let e = serve(addr, Some(&token), metrics, Health::default(), shutdown)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("at least 16"), "{e}");
    }
}
