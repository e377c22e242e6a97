//! The operators' CLI over the gateway's admin API: `ozfleet status`, `nodes`, `tasks`,
//! `drain`, `undrain`, `cancel`. Aligned tables for people, `--output json` for scripts;
//! errors say what is wrong (gateway unreachable, token refused, unknown node or task).

use std::process::ExitCode;

use anyhow::{Context, bail};
use futures::StreamExt;
use ozfleet_proto::v1::admin_service_client::AdminServiceClient;
use ozfleet_proto::v1::{self as pb};
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::{AdminArgs, AdminCommand, OutputFormat};

type Client = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <admin token>` to every call when a token is configured.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

pub async fn run(args: AdminArgs, command: AdminCommand) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args).await?;
    let output = args.output;
    match command {
        AdminCommand::Status => {
            let fleet = call(&args, client.get_fleet(pb::GetFleetRequest {})).await?;
            print_fleet(&fleet, output);
        }
        AdminCommand::Nodes => {
            let nodes = call(&args, client.list_nodes(pb::ListNodesRequest {})).await?;
            print_nodes(&nodes.nodes, output);
        }
        AdminCommand::Tasks { state, node, watch } => {
            let state = match state.as_deref() {
                None => pb::TaskState::Unspecified,
                Some(text) => parse_task_state(text)?,
            };
            if watch {
                return watch_events(&args, &mut client).await;
            }
            let request = pb::ListTasksRequest {
                state: state.into(),
                node_id: node.unwrap_or_default(),
            };
            let tasks = call(&args, client.list_tasks(request)).await?;
            print_tasks(&tasks.tasks, output);
        }
        AdminCommand::Drain { node } => {
            let request = pb::DrainNodeRequest { node_id: node };
            let response = call(&args, client.drain_node(request)).await?;
            print_nodes(response.node.as_slice(), output);
        }
        AdminCommand::Undrain { node } => {
            let request = pb::UndrainNodeRequest { node_id: node };
            let response = call(&args, client.undrain_node(request)).await?;
            print_nodes(response.node.as_slice(), output);
        }
        AdminCommand::Cancel { task } => {
            let request = pb::CancelTaskRequest { task_id: task };
            let response = call(&args, client.cancel_task(request)).await?;
            print_tasks(response.task.as_slice(), output);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--admin` as a URL: `HOST:PORT` or `http://HOST:PORT`.
fn admin_url(admin: &str) -> String {
    if admin.contains("://") {
        admin.to_owned()
    } else {
        format!("http://{admin}")
    }
}

async fn connect(args: &AdminArgs) -> anyhow::Result<Client> {
    let url = admin_url(&args.admin);
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("--admin {:?} is not a valid address", args.admin))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.with_context(|| {
        format!("cannot reach the gateway's admin API at {url}: is the gateway running, and is --admin right?")
    })?;
    let token = super::admin_token(&args.admin_token)?;
    let bearer = match token {
        None => None,
        Some(token) => {
            let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
                .parse()
                .context("the admin token has characters not allowed in a gRPC header")?;
            value.set_sensitive(true);
            Some(value)
        }
    };
    Ok(AdminServiceClient::with_interceptor(
        channel,
        Bearer(bearer),
    ))
}

/// Awaits an admin call, turning its status into an error that says what to do.
async fn call<T>(
    args: &AdminArgs,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match call.await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(explain(args, &status)),
    }
}

fn explain(args: &AdminArgs, status: &tonic::Status) -> anyhow::Error {
    match status.code() {
        Code::Unauthenticated => anyhow::anyhow!(
            "the gateway refused the admin token ({}): pass the gateway's token with --admin-token-file or OZFLEET_ADMIN_TOKEN",
            status.message()
        ),
        Code::NotFound | Code::InvalidArgument => anyhow::anyhow!("{}", status.message()),
        Code::Unavailable => anyhow::anyhow!(
            "cannot reach the gateway's admin API at {}: {}",
            admin_url(&args.admin),
            status.message()
        ),
        _ => anyhow::anyhow!(
            "the admin call failed: {} ({:?})",
            status.message(),
            status.code()
        ),
    }
}

fn parse_task_state(text: &str) -> anyhow::Result<pb::TaskState> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("TASK_STATE_").unwrap_or(&upper);
    match name {
        "OFFERED" => Ok(pb::TaskState::Offered),
        "RUNNING" => Ok(pb::TaskState::Running),
        "LOST" => Ok(pb::TaskState::Lost),
        _ => bail!("unknown task state {text:?}: use offered, running or lost"),
    }
}

async fn watch_events(args: &AdminArgs, client: &mut Client) -> anyhow::Result<ExitCode> {
    let mut events = call(args, client.watch_events(pb::WatchEventsRequest {})).await?;
    if args.output == OutputFormat::Table {
        println!(
            "{}",
            row(&["AT", "EVENT", "NODE", "TASK", "DETAIL"], &WATCH_WIDTHS)
        );
    }
    while let Some(event) = events.next().await {
        let event = event.map_err(|status| explain(args, &status))?;
        match args.output {
            OutputFormat::Json => println!("{}", event_json(&event)),
            OutputFormat::Table => println!(
                "{}",
                row(
                    &[
                        &time(event.at.as_ref()),
                        &event.kind,
                        &event.node_id,
                        &event.task_id,
                        &event.detail,
                    ],
                    &WATCH_WIDTHS
                )
            ),
        }
    }
    eprintln!("The gateway ended the event stream.");
    Ok(ExitCode::SUCCESS)
}

const WATCH_WIDTHS: [usize; 4] = [25, 22, 24, 24];

fn time(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(|at| time::OffsetDateTime::from_unix_timestamp(at.seconds).ok())
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn node_state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state) {
        Ok(pb::NodeState::Ready) => "ready",
        Ok(pb::NodeState::Draining) => "draining",
        Ok(pb::NodeState::Disconnected) => "disconnected",
        _ => "unknown",
    }
}

fn task_state_name(state: i32) -> &'static str {
    match pb::TaskState::try_from(state) {
        Ok(pb::TaskState::Offered) => "offered",
        Ok(pb::TaskState::Running) => "running",
        Ok(pb::TaskState::Lost) => "lost",
        _ => "unknown",
    }
}

fn backend_name(backend: i32) -> &'static str {
    match pb::BackendKind::try_from(backend) {
        Ok(pb::BackendKind::Direct) => "direct",
        Ok(pb::BackendKind::Docker) => "docker",
        Ok(pb::BackendKind::Kubernetes) => "kubernetes",
        _ => "unknown",
    }
}

/// One table row: each cell padded to its column's width, the last one as is.
fn row(cells: &[&str], widths: &[usize]) -> String {
    let mut line = String::new();
    for (index, cell) in cells.iter().enumerate() {
        match widths.get(index) {
            Some(width) => line.push_str(&format!("{cell:<width$}  ")),
            None => line.push_str(cell),
        }
    }
    line.trim_end().to_owned()
}

/// Prints rows with columns as wide as their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.len()).collect();
    for cells in rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths.pop();
    println!("{}", row(header, &widths));
    for cells in rows {
        let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
        println!("{}", row(&cells, &widths));
    }
}

fn print_fleet(fleet: &pb::GetFleetResponse, output: OutputFormat) {
    if output == OutputFormat::Json {
        println!("{}", fleet_json(fleet));
        return;
    }
    let capacity = if fleet.capacity_unlimited {
        "unlimited".to_owned()
    } else {
        fleet.capacity_total.to_string()
    };
    let upstream = if fleet.upstream_connected {
        "connected"
    } else {
        "DISCONNECTED"
    };
    println!("worker id      {}", fleet.worker_id);
    println!("gateway        {}", fleet.version);
    println!("upstream (Oz)  {upstream}");
    println!(
        "nodes          {} attached ({} draining), {} away",
        fleet.nodes_connected, fleet.nodes_draining, fleet.nodes_disconnected
    );
    println!("capacity       {capacity}");
    println!(
        "tasks          {} active, {} offered",
        fleet.tasks_active, fleet.tasks_offered
    );
}

fn print_nodes(nodes: &[pb::Node], output: OutputFormat) {
    if output == OutputFormat::Json {
        let nodes: Vec<Value> = nodes.iter().map(node_json).collect();
        println!("{}", Value::Array(nodes));
        return;
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            let capacity = match node.max_concurrent_tasks {
                0 => "unlimited".to_owned(),
                limit => limit.to_string(),
            };
            let labels: Vec<String> = {
                let mut labels: Vec<_> = node.labels.iter().collect();
                labels.sort();
                labels
                    .into_iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect()
            };
            let mut state = node_state_name(node.state).to_owned();
            if node.draining && node.state == pb::NodeState::Disconnected as i32 {
                state.push_str(" (draining)");
            }
            vec![
                node.node_id.clone(),
                node.name.clone(),
                state,
                backend_name(node.backend).to_owned(),
                format!("{}/{capacity}", node.active_tasks),
                node.version.clone(),
                node.epoch.to_string(),
                time(node.connected_since.as_ref()),
                labels.join(","),
            ]
        })
        .collect();
    print_table(
        &[
            "NODE", "NAME", "STATE", "BACKEND", "TASKS", "VERSION", "EPOCH", "SINCE", "LABELS",
        ],
        &rows,
    );
}

fn print_tasks(tasks: &[pb::Task], output: OutputFormat) {
    if output == OutputFormat::Json {
        let tasks: Vec<Value> = tasks.iter().map(task_json).collect();
        println!("{}", Value::Array(tasks));
        return;
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|task| {
            let mut state = task_state_name(task.state).to_owned();
            if task.cancel_requested {
                state.push_str(" (cancelling)");
            }
            vec![
                task.task_id.clone(),
                task.execution_id.clone(),
                task.node_id.clone(),
                state,
                time(task.started_at.as_ref()),
            ]
        })
        .collect();
    print_table(&["TASK", "EXECUTION", "NODE", "STATE", "SINCE"], &rows);
}

fn fleet_json(fleet: &pb::GetFleetResponse) -> Value {
    json!({
        "worker_id": fleet.worker_id,
        "upstream_connected": fleet.upstream_connected,
        "version": fleet.version,
        "nodes_connected": fleet.nodes_connected,
        "nodes_draining": fleet.nodes_draining,
        "nodes_disconnected": fleet.nodes_disconnected,
        "capacity_total": fleet.capacity_total,
        "capacity_unlimited": fleet.capacity_unlimited,
        "tasks_active": fleet.tasks_active,
        "tasks_offered": fleet.tasks_offered,
    })
}

fn node_json(node: &pb::Node) -> Value {
    json!({
        "node_id": node.node_id,
        "name": node.name,
        "backend": backend_name(node.backend),
        "labels": node.labels,
        "version": node.version,
        "max_concurrent_tasks": node.max_concurrent_tasks,
        "active_tasks": node.active_tasks,
        "state": node_state_name(node.state),
        "draining": node.draining,
        "epoch": node.epoch,
        "connected_since": time(node.connected_since.as_ref()),
    })
}

fn task_json(task: &pb::Task) -> Value {
    json!({
        "task_id": task.task_id,
        "execution_id": task.execution_id,
        "node_id": task.node_id,
        "state": task_state_name(task.state),
        "started_at": time(task.started_at.as_ref()),
        "cancel_requested": task.cancel_requested,
    })
}

fn event_json(event: &pb::WatchEventsResponse) -> Value {
    json!({
        "at": time(event.at.as_ref()),
        "kind": event.kind,
        "node_id": event.node_id,
        "task_id": event.task_id,
        "execution_id": event.execution_id,
        "epoch": event.epoch,
        "detail": event.detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_accept_host_port_and_urls() {
        assert_eq!(admin_url("127.0.0.1:7071"), "http://127.0.0.1:7071");
        assert_eq!(admin_url("http://gw:7071"), "http://gw:7071");
    }

    #[test]
    fn task_states_parse_in_either_spelling() {
        assert_eq!(parse_task_state("running").unwrap(), pb::TaskState::Running);
        assert_eq!(
            parse_task_state("TASK_STATE_OFFERED").unwrap(),
            pb::TaskState::Offered
        );
        let error = parse_task_state("sleeping").unwrap_err().to_string();
        assert!(error.contains("offered, running or lost"), "{error}");
    }

    #[test]
    fn rows_align_on_the_widest_cell() {
        assert_eq!(row(&["a", "bb", "c"], &[3, 2]), "a    bb  c");
    }
}
