//! Which exporters the `OTEL_*` environment selects, and building them.

use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsExporter {
    Otlp,
    Prometheus,
    Console,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracesExporter {
    Otlp,
    Console,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

/// The exporters the environment asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExporterChoice {
    /// `Err` holds an unsupported value, reported once and treated as off.
    pub metrics: Result<MetricsExporter, String>,
    pub metrics_protocol: Result<OtlpProtocol, String>,
    pub traces: Option<Result<TracesExporter, String>>,
    pub traces_protocol: Result<OtlpProtocol, String>,
    /// `host:port` for the Prometheus endpoint.
    pub prometheus_address: String,
}

fn value(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name)
        .map(|value| value.trim().to_ascii_lowercase())
        .filter(|value| !value.is_empty())
}

fn protocol(
    lookup: &impl Fn(&str) -> Option<String>,
    signal_variable: &str,
) -> Result<OtlpProtocol, String> {
    match value(lookup, signal_variable)
        .or_else(|| value(lookup, "OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
    {
        None | Some("http/protobuf") => Ok(OtlpProtocol::HttpProtobuf),
        Some("grpc") => Ok(OtlpProtocol::Grpc),
        Some(other) => Err(format!(
            "OTLP protocol {other:?} is not supported (use http/protobuf or grpc)"
        )),
    }
}

impl ExporterChoice {
    pub fn from_lookup(lookup: &impl Fn(&str) -> Option<String>) -> Self {
        // Unset means OTLP, as in the reference's source (spec §2.1 of oz-platform.md).
        let metrics = match value(lookup, "OTEL_METRICS_EXPORTER").as_deref() {
            None | Some("otlp") => Ok(MetricsExporter::Otlp),
            Some("prometheus") => Ok(MetricsExporter::Prometheus),
            Some("console") => Ok(MetricsExporter::Console),
            Some("none") => Ok(MetricsExporter::None),
            Some(other) => Err(format!(
                "OTEL_METRICS_EXPORTER={other:?} is not supported (use otlp, prometheus, console or none)"
            )),
        };
        let traces = match value(lookup, "OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("none") => None,
            Some("otlp") => Some(Ok(TracesExporter::Otlp)),
            Some("console") => Some(Ok(TracesExporter::Console)),
            Some(other) => Some(Err(format!(
                "OTEL_TRACES_EXPORTER={other:?} is not supported (use otlp, console or none)"
            ))),
        };
        let host = lookup("OTEL_EXPORTER_PROMETHEUS_HOST")
            .map(|host| host.trim().to_owned())
            .filter(|host| !host.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let port = lookup("OTEL_EXPORTER_PROMETHEUS_PORT")
            .map(|port| port.trim().to_owned())
            .filter(|port| !port.is_empty())
            .unwrap_or_else(|| "9464".into());
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        Self {
            metrics,
            metrics_protocol: protocol(lookup, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
            traces,
            traces_protocol: protocol(lookup, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            prometheus_address: format!("{host}:{port}"),
        }
    }
}

pub enum Meters {
    /// Pushed (OTLP, console).
    Push(SdkMeterProvider),
    /// Pulled from the registry by the `/metrics` endpoint.
    Prometheus {
        provider: SdkMeterProvider,
        registry: prometheus::Registry,
    },
    Off,
}

pub fn meter_provider(
    choice: &ExporterChoice,
    resource: Resource,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Meters, String> {
    let exporter = choice.metrics.clone()?;
    let builder = SdkMeterProvider::builder().with_resource(resource);
    let interval = lookup("OTEL_METRIC_EXPORT_INTERVAL")
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis);
    match exporter {
        MetricsExporter::None => Ok(Meters::Off),
        MetricsExporter::Console => {
            let exporter = opentelemetry_stdout::MetricExporter::default();
            let reader = periodic(exporter, interval);
            Ok(Meters::Push(builder.with_reader(reader).build()))
        }
        MetricsExporter::Otlp => {
            let exporter = match choice.metrics_protocol.clone()? {
                OtlpProtocol::HttpProtobuf => MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build(),
                OtlpProtocol::Grpc => MetricExporter::builder().with_tonic().build(),
            }
            .map_err(|error| format!("cannot set up the OTLP metric exporter: {error}"))?;
            let reader = periodic(exporter, interval);
            Ok(Meters::Push(builder.with_reader(reader).build()))
        }
        MetricsExporter::Prometheus => {
            let registry = prometheus::Registry::new();
            // Names are exported exactly as the instruments are named (the catalog already
            // carries `_total` and `_seconds`), as the Go exporter does for such names.
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .without_counter_suffixes()
                .without_units()
                .build()
                .map_err(|error| format!("cannot set up the Prometheus exporter: {error}"))?;
            Ok(Meters::Prometheus {
                provider: builder.with_reader(exporter).build(),
                registry,
            })
        }
    }
}

/// A push reader on the tokio runtime (the OTLP clients need one), at the configured
/// interval or the SDK's default of 60 s.
fn periodic<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>(
    exporter: E,
    interval: Option<std::time::Duration>,
) -> PeriodicReader<E> {
    let reader = PeriodicReader::builder(exporter, Tokio);
    match interval {
        Some(interval) => reader.with_interval(interval).build(),
        None => reader.build(),
    }
}

pub fn tracer_provider(
    choice: &ExporterChoice,
    resource: Resource,
) -> Result<Option<SdkTracerProvider>, String> {
    let Some(exporter) = choice.traces.clone() else {
        return Ok(None);
    };
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let provider = match exporter? {
        TracesExporter::Console => builder
            .with_span_processor(
                BatchSpanProcessor::builder(opentelemetry_stdout::SpanExporter::default(), Tokio)
                    .build(),
            )
            .build(),
        TracesExporter::Otlp => {
            let exporter = match choice.traces_protocol.clone()? {
                OtlpProtocol::HttpProtobuf => SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build(),
                OtlpProtocol::Grpc => SpanExporter::builder().with_tonic().build(),
            }
            .map_err(|error| format!("cannot set up the OTLP span exporter: {error}"))?;
            builder
                .with_span_processor(BatchSpanProcessor::builder(exporter, Tokio).build())
                .build()
        }
    };
    Ok(Some(provider))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn choice(pairs: &[(&str, &str)]) -> ExporterChoice {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        ExporterChoice::from_lookup(&|name: &str| env.get(name).cloned())
    }

    #[test]
    fn unset_means_otlp_over_http_and_no_traces() {
        let chosen = choice(&[]);
        assert_eq!(chosen.metrics, Ok(MetricsExporter::Otlp));
        assert_eq!(chosen.metrics_protocol, Ok(OtlpProtocol::HttpProtobuf));
        assert_eq!(chosen.traces, None);
        assert_eq!(chosen.prometheus_address, "localhost:9464");
    }

    #[test]
    fn values_are_trimmed_and_case_insensitive() {
        let chosen = choice(&[
            ("OTEL_METRICS_EXPORTER", " Prometheus "),
            ("OTEL_EXPORTER_PROMETHEUS_HOST", "0.0.0.0"),
            ("OTEL_EXPORTER_PROMETHEUS_PORT", "9999"),
            ("OTEL_TRACES_EXPORTER", "OTLP"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert_eq!(chosen.metrics, Ok(MetricsExporter::Prometheus));
        assert_eq!(chosen.prometheus_address, "0.0.0.0:9999");
        assert_eq!(chosen.traces, Some(Ok(TracesExporter::Otlp)));
        assert_eq!(chosen.traces_protocol, Ok(OtlpProtocol::Grpc));
        assert_eq!(choice(&[("OTEL_TRACES_EXPORTER", "none")]).traces, None);
        assert_eq!(
            choice(&[("OTEL_METRICS_EXPORTER", "none")]).metrics,
            Ok(MetricsExporter::None)
        );
    }

    #[test]
    fn signal_protocols_win_and_unknown_values_are_named() {
        let chosen = choice(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(chosen.metrics_protocol, Ok(OtlpProtocol::HttpProtobuf));
        assert_eq!(chosen.traces_protocol, Ok(OtlpProtocol::Grpc));
        let odd = choice(&[("OTEL_METRICS_EXPORTER", "statsd")]);
        assert!(odd.metrics.unwrap_err().contains("statsd"));
        let odd = choice(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
        assert!(odd.metrics_protocol.unwrap_err().contains("http/json"));
    }

    #[test]
    fn ipv6_prometheus_hosts_are_bracketed() {
        let chosen = choice(&[("OTEL_EXPORTER_PROMETHEUS_HOST", "::1")]);
        assert_eq!(chosen.prometheus_address, "[::1]:9464");
    }
}
