//! Admin HTTP on a loopback address: `/healthz` (200 once the pipeline is up) and `/metrics`
//! (Prometheus text format).

use std::net::SocketAddr;

use axum::{routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::info;

use crate::shutdown::Shutdown;

/// Binds the admin listener (so a bad address fails start-up) and returns the server future.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    mut shutdown: Shutdown,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin HTTP on {addr}: {e}"))?;
    info!(listen = %addr, "admin HTTP listening (/healthz, /metrics)");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
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
