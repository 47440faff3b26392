//! `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::metrics::OperatorMetrics;

/// Serves the metrics and the health check until the process ends.
pub async fn serve(address: SocketAddr, metrics: Arc<OperatorMetrics>) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<OperatorMetrics>>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving /metrics and /healthz");
    axum::serve(listener, app).await?;
    Ok(())
}
