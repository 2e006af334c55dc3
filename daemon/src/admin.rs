//! Admin HTTP on a loopback address: `/healthz` and `/metrics` (Prometheus text format).
//!
//! `/healthz` answers with a JSON body (see [`crate::health::Report`]): status `ok`, or
//! `degraded` when a destination is down (records are buffered; 200 either way), or `failing`
//! when the buffer does not take writes (503).

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
    metrics: PrometheusHandle,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
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
                    let code = if report.buffer.accepts_writes {
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
    Ok(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
    })
}
