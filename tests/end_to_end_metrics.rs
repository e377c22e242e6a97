//! End to end for SREs: the gateway's metrics as a Prometheus server scrapes them and as
//! an OTLP collector receives them, after a mix of real runs (succeeded, failed, cancelled
//! by Oz, cancelled by an operator, rejected at capacity).

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::otlp::OtlpReceiver;
use common::{Stack, free_port, wait_until};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use serde_json::Value;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn http_get(url: &str) -> Option<String> {
    let output = Command::new("curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The value of the series `name{labels…}` in Prometheus text output.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Runs the mix of runs every test here looks at; returns the operator-cancelled run id.
fn run_the_mix(stack: &Stack) {
    // Capacity 1: a second run while the first sleeps is rejected at capacity (Oz offers
    // it again and it succeeds later).
    let first = stack.api.create("Sleep 2 seconds");
    stack.api.wait_for_state(&first, "INPROGRESS", RUN_TIMEOUT);
    let second = stack.api.create("Say hello");
    stack
        .gateway
        .wait_for_log("No node can take the task; rejecting it", RUN_TIMEOUT);
    stack.api.wait_for_state(&first, "SUCCEEDED", RUN_TIMEOUT);
    stack.api.wait_for_state(&second, "SUCCEEDED", RUN_TIMEOUT);

    let failing = stack.api.create("Please fail with exit 3");
    stack.api.wait_for_state(&failing, "FAILED", RUN_TIMEOUT);

    let cancelled = stack.api.create("Sleep 300 seconds");
    stack
        .api
        .wait_for_state(&cancelled, "INPROGRESS", RUN_TIMEOUT);
    let (status, body) = stack.api.cancel(&cancelled);
    assert_eq!(status, 200, "{body}");
    stack
        .api
        .wait_for_state(&cancelled, "CANCELLED", RUN_TIMEOUT);

    let by_operator = stack.api.create("Sleep 300 seconds");
    stack
        .api
        .wait_for_state(&by_operator, "INPROGRESS", RUN_TIMEOUT);
    let (ok, _, stderr) = stack.cli(&["cancel", &by_operator], &[]);
    assert!(ok, "{stderr}");
    let item = stack
        .api
        .wait_for_state(&by_operator, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "task_cancelled", "{item}");
}

fn prometheus_stack(port: u16) -> Stack {
    let port = port.to_string();
    Stack::start_full(
        &[],
        &[
            ("OTEL_METRICS_EXPORTER", "prometheus"),
            ("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1"),
            ("OTEL_EXPORTER_PROMETHEUS_PORT", &port),
        ],
    )
}

#[test]
fn the_prometheus_exporter_serves_the_catalog_primed_and_then_with_the_right_values() {
    let port = free_port();
    let stack = prometheus_stack(port);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    wait_until(Duration::from_secs(20), "/metrics to answer", || {
        text = http_get(&url).unwrap_or_default();
        text.contains("oz_worker_connected")
    });
    // Primed before any task: every catalog series is there at 0.
    let scope = ("otel_scope_name", "github.com/warpdotdev/oz-agent-worker");
    assert_eq!(
        sample(&text, "oz_worker_tasks_claimed_total", &[scope]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "oz_worker_tasks_rejected_total",
            &[("reason", "at_capacity")]
        ),
        Some(0.0)
    );
    for result in ["succeeded", "failed", "cancelled", "dispatched"] {
        assert_eq!(
            sample(
                &text,
                "oz_worker_tasks_completed_total",
                &[("result", result)]
            ),
            Some(0.0),
            "{result}"
        );
    }
    let failure_series = text
        .lines()
        .filter(|line| line.starts_with("oz_worker_task_failures_total{"))
        .count();
    assert_eq!(failure_series, 3 * 29, "every phase × reason is primed");
    for reason in ["dial_failed", "remote_close"] {
        assert_eq!(
            sample(
                &text,
                "oz_worker_websocket_reconnects_total",
                &[("reason", reason)]
            ),
            Some(0.0)
        );
    }
    assert_eq!(sample(&text, "oz_worker_connected", &[]), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "oz_worker_info",
            &[("backend", "fleet"), ("worker_id", common::WORKER_ID)]
        ),
        Some(1.0)
    );
    assert!(
        text.contains("service_name=\"oz-agent-worker\"") && text.contains("target_info"),
        "{text}"
    );
    assert!(
        !text.contains("oz_worker_task_duration_seconds_count"),
        "not primed"
    );

    let _agent = stack.agent("agent-a", &["--max-concurrent-tasks", "1"]);
    wait_until(Duration::from_secs(20), "capacity to show", || {
        text = http_get(&url).unwrap_or_default();
        sample(&text, "oz_worker_tasks_max_concurrent", &[]) == Some(1.0)
    });
    run_the_mix(&stack);
    let text = http_get(&url).expect("scrape");
    let value = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels).unwrap_or(-1.0);
    assert_eq!(
        value(
            "oz_worker_tasks_completed_total",
            &[("result", "succeeded")]
        ),
        2.0
    );
    assert_eq!(
        value("oz_worker_tasks_completed_total", &[("result", "failed")]),
        2.0
    );
    assert_eq!(
        value(
            "oz_worker_tasks_completed_total",
            &[("result", "cancelled")]
        ),
        1.0
    );
    assert_eq!(value("oz_worker_tasks_claimed_total", &[]), 5.0);
    assert!(
        value(
            "oz_worker_tasks_rejected_total",
            &[("reason", "at_capacity")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            "oz_worker_task_failures_total",
            &[("phase", "backend"), ("reason", "agent_invocation")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "oz_worker_task_failures_total",
            &[("phase", "backend"), ("reason", "task_cancelled")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "oz_worker_task_duration_seconds_count",
            &[("result", "succeeded")]
        ),
        2.0
    );
    assert_eq!(value("oz_worker_tasks_active", &[]), 0.0);
    assert_eq!(value("ozfleet_operator_cancels_total", &[]), 1.0);
    assert_eq!(
        value(
            "ozfleet_nodes_attached",
            &[("backend", "direct"), ("state", "ready")]
        ),
        1.0
    );
    assert_eq!(value("ozfleet_dispatch_latency_seconds_count", &[]), 5.0);
    let node_id = stack.node_id("agent-a");
    assert_eq!(
        value("ozfleet_node_capacity", &[("node_id", &node_id)]),
        1.0
    );
}

#[test]
fn prometheus_scrapes_the_gateway_and_the_reference_promql_answers() {
    let port = free_port();
    let stack = prometheus_stack(port);
    let _agent = stack.agent("agent-a", &["--max-concurrent-tasks", "1"]);
    run_the_mix(&stack);

    let prometheus_port = free_port();
    let config = stack.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ozfleet\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(stack.dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            stack.dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("Debian's prometheus (tests/run-all.sh installs it)");
    let _prometheus = common::ChildGuard(child);
    let query = |promql: &str| -> Option<Value> {
        let output = Command::new("curl")
            .args(["-s", "--max-time", "5", "-G"])
            .arg(format!("http://127.0.0.1:{prometheus_port}/api/v1/query"))
            .arg("--data-urlencode")
            .arg(format!("query={promql}"))
            .output()
            .ok()?;
        let body: Value = serde_json::from_slice(&output.stdout).ok()?;
        (body["status"] == "success").then(|| body["data"]["result"].clone())
    };
    let scalar = |promql: &str| -> Option<f64> {
        query(promql)?
            .get(0)?
            .get("value")?
            .get(1)?
            .as_str()?
            .parse()
            .ok()
    };
    wait_until(
        Duration::from_secs(60),
        "Prometheus to scrape the gateway",
        || scalar("sum(oz_worker_connected)") == Some(1.0),
    );
    assert_eq!(
        scalar(r#"sum(oz_worker_tasks_completed_total{result="succeeded"})"#),
        Some(2.0)
    );
    let by_result: HashMap<String, f64> =
        query("sum by (result) (oz_worker_tasks_completed_total)")
            .expect("query")
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                (
                    series["metric"]["result"].as_str().unwrap().to_owned(),
                    series["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
    assert_eq!(by_result["failed"], 2.0, "{by_result:?}");
    assert_eq!(by_result["cancelled"], 1.0, "{by_result:?}");
    assert_eq!(by_result["dispatched"], 0.0, "{by_result:?}");
    assert_eq!(
        scalar("count(oz_worker_tasks_active > 0)"),
        None,
        "nothing runs"
    );
    assert_eq!(
        scalar(r#"sum(oz_worker_tasks_max_concurrent > 0)"#),
        Some(1.0),
        "the saturation denominator"
    );
    assert_eq!(
        scalar(
            r#"sum by (phase, reason) (oz_worker_task_failures_total{phase="backend",reason="agent_invocation"})"#
        ),
        Some(1.0)
    );
    assert!(
        scalar(r#"sum(oz_worker_task_duration_seconds_count)"#).unwrap_or(0.0) >= 5.0,
        "the duration histogram"
    );
    assert_eq!(
        scalar(r#"count(oz_worker_info{backend="fleet"})"#),
        Some(1.0)
    );

    // Every query of the shipped dashboard is valid PromQL over these series and returns
    // data (rates may need a second scrape first).
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/grafana/ozfleet-fleet.json"),
        )
        .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                query(expr).is_some(),
                "dashboard panel {:?}: {expr} is not accepted by Prometheus",
                panel["title"]
            );
        }
    }
}

#[test]
fn otlp_push_carries_the_catalog_the_resource_and_the_scope() {
    let receiver = OtlpReceiver::start();
    let endpoint = receiver.endpoint();
    let stack = Stack::start_full(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    );
    let _agent = stack.agent("agent-a", &["--max-concurrent-tasks", "1"]);
    run_the_mix(&stack);

    let mut last = None;
    wait_until(
        Duration::from_secs(30),
        "an export with every result",
        || {
            let received = receiver.received.lock().unwrap();
            last = received.metrics.last().cloned();
            last.as_ref().is_some_and(|request| {
                int_sum(
                    request,
                    "oz_worker_tasks_completed_total",
                    ("result", "cancelled"),
                ) == Some(1)
                    && int_sum(
                        request,
                        "oz_worker_tasks_completed_total",
                        ("result", "failed"),
                    ) == Some(2)
            })
        },
    );
    let request = last.unwrap();
    let resource_metrics = &request.resource_metrics[0];
    let resource: HashMap<String, String> = resource_metrics
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .filter_map(
            |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(value) => Some((attribute.key.clone(), value.clone())),
                _ => None,
            },
        )
        .collect();
    assert_eq!(resource["service.name"], "oz-agent-worker");
    assert_eq!(resource["worker.id"], common::WORKER_ID);
    assert_eq!(resource["worker.backend"], "fleet");
    assert!(resource.contains_key("service.version"));
    let scope = resource_metrics.scope_metrics[0].scope.as_ref().unwrap();
    assert_eq!(scope.name, "github.com/warpdotdev/oz-agent-worker");

    assert_eq!(
        int_sum(
            &request,
            "oz_worker_tasks_completed_total",
            ("result", "succeeded")
        ),
        Some(2)
    );
    assert_eq!(
        int_sum(
            &request,
            "oz_worker_task_failures_total",
            ("reason", "task_cancelled")
        ),
        Some(1)
    );
    let duration = find_metric(&request, "oz_worker_task_duration_seconds").unwrap();
    assert_eq!(duration.unit, "s");
    let Some(metric::Data::Histogram(histogram)) = &duration.data else {
        panic!("the duration is a histogram");
    };
    assert_eq!(
        histogram.data_points[0].explicit_bounds,
        vec![
            0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0,
            7500.0, 10000.0
        ]
    );
    let connected = find_metric(&request, "oz_worker_connected").unwrap();
    assert!(matches!(connected.data, Some(metric::Data::Gauge(_))));
    let active = find_metric(&request, "oz_worker_tasks_active").unwrap();
    assert!(
        matches!(&active.data, Some(metric::Data::Sum(sum)) if !sum.is_monotonic),
        "an up-down counter"
    );
}

#[test]
fn one_run_is_one_trace_across_the_gateway_and_the_node_agent() {
    let receiver = OtlpReceiver::start();
    let endpoint = receiver.endpoint();
    let tracing = [
        ("OTEL_TRACES_EXPORTER", "otlp"),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let stack = Stack::start_full(&[], &tracing);
    let _agent = stack.agent_with_env("agent-a", &[], &tracing);
    let run = stack.api.create("Say hello");
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);

    // (service name, span) of every span received so far.
    let spans = || {
        let received = receiver.received.lock().unwrap();
        received
            .traces
            .iter()
            .flat_map(|request| &request.resource_spans)
            .flat_map(|resource| {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|resource| {
                        resource.attributes.iter().find(|a| a.key == "service.name")
                    })
                    .and_then(
                        |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(name) => Some(name.clone()),
                            _ => None,
                        },
                    )
                    .unwrap_or_default();
                resource
                    .scope_spans
                    .iter()
                    .flat_map(|scope| scope.spans.clone())
                    .map(move |span| (service.clone(), span))
            })
            .collect::<Vec<_>>()
    };
    let is_run = |span: &opentelemetry_proto::tonic::trace::v1::Span| {
        span.attributes.iter().any(|attribute| {
            attribute.key == "task.id"
                && matches!(
                    attribute.value.as_ref().and_then(|value| value.value.as_ref()),
                    Some(AnyValue::StringValue(id)) if *id == run
                )
        })
    };
    wait_until(Duration::from_secs(30), "both sides' spans", || {
        let spans = spans();
        spans
            .iter()
            .any(|(service, span)| service == "oz-agent-worker" && is_run(span))
            && spans
                .iter()
                .any(|(service, span)| service == "ozfleet-agent" && is_run(span))
    });
    let spans = spans();
    let (_, gateway) = spans
        .iter()
        .find(|(service, span)| service == "oz-agent-worker" && is_run(span))
        .unwrap();
    let (_, node) = spans
        .iter()
        .find(|(service, span)| service == "ozfleet-agent" && is_run(span))
        .unwrap();
    assert_eq!(gateway.name, "oz_worker.task");
    assert_eq!(node.name, "ozfleet_agent.task");
    assert_eq!(
        node.trace_id, gateway.trace_id,
        "one trace across the gRPC hop"
    );
    assert_eq!(
        node.parent_span_id, gateway.span_id,
        "the node's span is a child"
    );
    let events: Vec<&str> = gateway
        .events
        .iter()
        .map(|event| event.name.as_str())
        .collect();
    for expected in ["task.assigned", "task.claimed", "task.completed"] {
        assert!(events.contains(&expected), "{events:?}");
    }
}

fn find_metric<'a>(
    request: &'a ExportMetricsServiceRequest,
    name: &str,
) -> Option<&'a opentelemetry_proto::tonic::metrics::v1::Metric> {
    request
        .resource_metrics
        .iter()
        .flat_map(|resource| &resource.scope_metrics)
        .flat_map(|scope| &scope.metrics)
        .find(|metric| metric.name == name)
}

/// The integer value of a monotonic sum's point with the attribute `label`.
fn int_sum(request: &ExportMetricsServiceRequest, name: &str, label: (&str, &str)) -> Option<i64> {
    let Some(metric::Data::Sum(sum)) = &find_metric(request, name)?.data else {
        return None;
    };
    sum.data_points
        .iter()
        .filter(|point| {
            point.attributes.iter().any(|attribute| {
                attribute.key == label.0
                    && matches!(
                        attribute.value.as_ref().and_then(|value| value.value.as_ref()),
                        Some(AnyValue::StringValue(value)) if value == label.1
                    )
            })
        })
        .map(|point| match point.value {
            Some(number_data_point::Value::AsInt(value)) => value,
            other => panic!("{name} must have integer points, got {other:?}"),
        })
        .reduce(|a, b| a + b)
}
