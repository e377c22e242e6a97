//! OpenTelemetry for ozfleet's processes, set up exactly as the reference worker's
//! "autoexport" does (spec §10.1), so a collector or Prometheus configured for
//! `oz-agent-worker` keeps working:
//!
//! - `OTEL_METRICS_EXPORTER`: `otlp` (the default when unset), `prometheus` (HTTP
//!   `/metrics` on `OTEL_EXPORTER_PROMETHEUS_HOST`:`OTEL_EXPORTER_PROMETHEUS_PORT`, default
//!   `localhost:9464`), `console` (stdout) or `none`;
//! - OTLP: `OTEL_EXPORTER_OTLP_PROTOCOL` (or `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`)
//!   `http/protobuf` (default, port 4318) or `grpc` (4317); endpoints and headers from the
//!   standard `OTEL_EXPORTER_OTLP_*` variables; `OTEL_METRIC_EXPORT_INTERVAL` (ms);
//! - traces only when `OTEL_TRACES_EXPORTER` is set and not `none` (`otlp` or `console`).
//!
//! Nothing here can stop the service: a bad setting or an unreachable collector leaves
//! no-op instruments and one warning, never a failed start or a log flood.

mod exporters;
mod prometheus_http;
pub mod propagation;
pub mod task_span;

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use exporters::{ExporterChoice, MetricsExporter, OtlpProtocol, TracesExporter};

/// How long shutdown waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is reporting: the resource attributes every series and span carries.
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    /// `service.name` (it overrides `OTEL_SERVICE_NAME`, as the reference does).
    pub service_name: &'static str,
    pub service_version: String,
    /// `worker.id`; omitted when empty.
    pub worker_id: String,
    /// `worker.backend`; omitted when empty.
    pub backend: String,
    /// The instrumentation scope (`otel_scope_name` in Prometheus).
    pub scope: &'static str,
}

impl ServiceIdentity {
    fn resource(&self) -> Resource {
        let mut attributes = vec![KeyValue::new(
            "service.version",
            self.service_version.clone(),
        )];
        if !self.worker_id.is_empty() {
            attributes.push(KeyValue::new("worker.id", self.worker_id.clone()));
        }
        if !self.backend.is_empty() {
            attributes.push(KeyValue::new("worker.backend", self.backend.clone()));
        }
        // The builder's detectors add OTEL_RESOURCE_ATTRIBUTES and the SDK's attributes;
        // service.name is set last so it wins over OTEL_SERVICE_NAME.
        Resource::builder()
            .with_attributes(attributes)
            .with_service_name(self.service_name)
            .build()
    }
}

/// The process's telemetry: its meter (no-op when metrics are off), its tracer (when
/// traces are on) and the Prometheus endpoint (when chosen). Call [`Telemetry::shutdown`]
/// to flush the last points.
pub struct Telemetry {
    scope: InstrumentationScope,
    meters: SdkMeterProvider,
    tracers: Option<SdkTracerProvider>,
    prometheus: Option<SocketAddr>,
    servers: JoinSet<()>,
    stop: CancellationToken,
}

impl Telemetry {
    /// Sets up the exporters the environment asks for (`lookup` reads it). Must run
    /// inside a tokio runtime.
    pub async fn start(
        identity: &ServiceIdentity,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let choice = ExporterChoice::from_lookup(&lookup);
        let resource = identity.resource();
        // A bare scope name, as the reference's: dashboards match `otel_scope_name` only.
        let scope = InstrumentationScope::builder(identity.scope).build();
        let stop = CancellationToken::new();
        let mut servers = JoinSet::new();
        let mut prometheus = None;
        let meters = match exporters::meter_provider(&choice, resource.clone(), &lookup) {
            Ok(exporters::Meters::Push(provider)) => provider,
            Ok(exporters::Meters::Prometheus { provider, registry }) => {
                let address = choice.prometheus_address.clone();
                match prometheus_http::bind(&address).await {
                    Ok(listener) => {
                        prometheus = listener.local_addr().ok();
                        info!("Serving Prometheus metrics on http://{address}/metrics");
                        servers.spawn(prometheus_http::serve(listener, registry, stop.clone()));
                    }
                    Err(error) => warn!(
                        "Metrics are off: cannot listen on {address} for Prometheus \
                         (OTEL_EXPORTER_PROMETHEUS_HOST/PORT): {error}"
                    ),
                }
                provider
            }
            Ok(exporters::Meters::Off) => SdkMeterProvider::builder().build(),
            Err(error) => {
                warn!("Metrics are off: {error}");
                SdkMeterProvider::builder().build()
            }
        };
        let tracers = match exporters::tracer_provider(&choice, resource) {
            Ok(tracers) => tracers,
            Err(error) => {
                warn!("Traces are off: {error}");
                None
            }
        };
        Self {
            scope,
            meters,
            tracers,
            prometheus,
            servers,
            stop,
        }
    }

    /// Telemetry that records nothing (tests, or a process that wants none).
    pub fn disabled(identity: &ServiceIdentity) -> Self {
        Self {
            scope: InstrumentationScope::builder(identity.scope).build(),
            meters: SdkMeterProvider::builder().build(),
            tracers: None,
            prometheus: None,
            servers: JoinSet::new(),
            stop: CancellationToken::new(),
        }
    }

    /// The meter of this process's instrumentation scope.
    pub fn meter(&self) -> Meter {
        self.meters.meter_with_scope(self.scope.clone())
    }

    /// The tracer, when traces are on.
    pub fn tracer(&self) -> Option<BoxedTracer> {
        self.tracers.as_ref().map(|provider| {
            let tracer: SdkTracer = provider.tracer_with_scope(self.scope.clone());
            BoxedTracer::new(Box::new(tracer))
        })
    }

    /// Where `/metrics` is served, with the Prometheus exporter.
    pub fn prometheus_address(&self) -> Option<SocketAddr> {
        self.prometheus
    }

    /// Exports what is left and stops the exporters (bounded).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let meters = self.meters.clone();
        let tracers = self.tracers.clone();
        // The SDK's shutdown blocks until its last export; keep it off the runtime threads.
        let flush = tokio::task::spawn_blocking(move || {
            let _ = meters.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            if let Some(tracers) = tracers {
                let _ = tracers.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            }
        });
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT * 2, flush).await;
        while self.servers.join_next().await.is_some() {}
    }
}
