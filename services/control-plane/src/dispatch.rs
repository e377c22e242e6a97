//! Offers queued runs to connected workers and keeps the store and the [`WorkerRegistry`] in step.
//!
//! Every change that involves both takes the worker registry lock first and calls the store while
//! holding it, so that, for example, a cancellation and a claim of the same run cannot
//! interleave. The store never calls back into the worker registry, so the two locks cannot
//! deadlock.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::TaskImages;
use ozfleet_proto::oz::{assignment_frame, cancellation_frame};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use uuid::Uuid;

use crate::error::ApiError;
use crate::store::{Run, RunState, Store, Timestamp};
use crate::worker_registry::{ConnectionId, Offer, WorkerRegistry};

pub struct Dispatcher {
    pub(crate) store: Arc<Store>,
    workers: Mutex<WorkerRegistry>,
    wakeup: Notify,
    pub(crate) reoffer_delay: Duration,
    images: TaskImages,
}

impl Dispatcher {
    pub fn new(store: Arc<Store>, reoffer_delay: Duration, images: TaskImages) -> Self {
        Self {
            store,
            workers: Mutex::new(WorkerRegistry::default()),
            wakeup: Notify::new(),
            reoffer_delay,
            images,
        }
    }

    pub(crate) fn lock_workers(&self) -> MutexGuard<'_, WorkerRegistry> {
        // The worker registry is plain bookkeeping that every method leaves consistent before it can
        // panic, so a poisoned lock still guards a usable value.
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the dispatch loop for another pass: something it acts on has changed.
    pub fn wake(&self) {
        self.wakeup.notify_one();
    }

    /// Offers queued runs whenever woken, and when the earliest rejected run may be
    /// offered again; returns when `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next_due = self.offer_queued_runs();
            let reoffer_timer = async {
                match next_due {
                    Some(instant) => sleep_until(instant).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wakeup.notified() => {}
                () = reoffer_timer => {}
            }
        }
    }

    /// One dispatch pass: offers every queued run whose worker is connected and which is
    /// neither already offered nor waiting after a rejection. Returns when the earliest
    /// waiting run becomes due.
    fn offer_queued_runs(&self) -> Option<Instant> {
        let mut workers = self.lock_workers();
        let worker_ids = workers.connected_worker_ids();
        if worker_ids.is_empty() {
            return None;
        }
        let queued = match self.store.queued_runs_for(&worker_ids) {
            Ok(queued) => queued,
            Err(error) => {
                // The next change that wakes the dispatcher tries again.
                error!("cannot read queued runs: {error}");
                return None;
            }
        };
        let now = Instant::now();
        let mut next_due: Option<Instant> = None;
        for run in queued {
            if workers.has_offer(&run.run_id) {
                continue;
            }
            if let Some(not_before) = workers.reoffer_not_before(&run.run_id)
                && not_before > now
            {
                next_due = Some(next_due.map_or(not_before, |due| due.min(not_before)));
                continue;
            }
            let Some(connection) = workers.next_connection_for(&run.worker_host) else {
                continue;
            };
            let execution_id = Uuid::now_v7().to_string();
            let frame = assignment_frame(&assignment_data(&run, &execution_id, &self.images));
            if workers.send(connection, frame) {
                info!(
                    "offered run {} to worker {} (connection {connection}, execution {execution_id})",
                    run.run_id, run.worker_host
                );
                workers.record_offer(
                    &run.run_id,
                    Offer {
                        connection,
                        execution_id,
                    },
                );
            }
        }
        next_due
    }

    /// Registers a new worker connection and sends it the cancellations its worker has
    /// yet to act on (the worker may have been disconnected when they were requested).
    pub fn worker_connected(
        &self,
        worker_id: &str,
        outbox: UnboundedSender<String>,
    ) -> ConnectionId {
        let mut workers = self.lock_workers();
        let connection = workers.connect(worker_id, outbox);
        match self.store.runs_awaiting_cancellation(worker_id) {
            Ok(run_ids) => {
                for run_id in run_ids {
                    info!("sending the pending cancellation of run {run_id} to worker {worker_id}");
                    workers.send(connection, cancellation_frame(&run_id));
                }
            }
            Err(error) => {
                error!("cannot read pending cancellations of worker {worker_id}: {error}")
            }
        }
        drop(workers);
        self.wake();
        connection
    }

    /// Forgets a closed connection; runs offered to it and not claimed are queued again.
    pub fn worker_disconnected(&self, connection: ConnectionId, worker_id: &str) {
        let withdrawn = self.lock_workers().disconnect(connection);
        for run_id in &withdrawn {
            info!(
                "run {run_id} is queued again: worker {worker_id} disconnected before claiming it"
            );
        }
        self.wake();
    }

    pub fn is_worker_connected(&self, worker_id: &str) -> bool {
        self.lock_workers().is_connected(worker_id)
    }

    /// Cancels a run: a queued run at once; a run a worker holds by telling that worker,
    /// which reports the cancellation when done.
    pub fn cancel_run(&self, run_id: &str) -> Result<(), ApiError> {
        let mut workers = self.lock_workers();
        let run = self
            .store
            .get(run_id)?
            .ok_or_else(|| ApiError::RunNotFound(run_id.to_owned()))?;
        if run.state.is_terminal() {
            return Err(ApiError::RunFinished {
                run_id: run.run_id,
                state: run.state,
            });
        }
        let now = Timestamp::now();
        if run.state == RunState::Queued {
            // Claims are handled under the worker registry lock, so the run is still queued here.
            self.store.cancel_queued(run_id, now)?;
            workers.forget_run(run_id);
            info!("run {run_id} QUEUED -> CANCELLED (cancelled before any worker claimed it)");
            return Ok(());
        }
        self.store.request_cancellation(run_id, now)?;
        let claimed_by = run.claimed_by.unwrap_or_default();
        let reached = workers.send_to_holder(run_id, &claimed_by, cancellation_frame(run_id));
        if reached == 0 {
            info!(
                "cancellation of run {run_id} requested; worker {claimed_by} is disconnected and \
                 will be told when it reconnects"
            );
        } else {
            info!("cancellation of run {run_id} requested; told worker {claimed_by}");
        }
        Ok(())
    }
}

/// The `task_assignment` data for one offer of `run` (spec `oz-agent-worker.md` §1.6).
pub fn assignment_data(run: &Run, execution_id: &str, images: &TaskImages) -> Value {
    let mut agent_config_snapshot = run.agent_config.clone();
    // A run's `skill` takes precedence over `config.skill_spec`, and the worker reads the
    // skill from the snapshot.
    if let Some(skill) = &run.skill {
        agent_config_snapshot.insert("skill_spec".into(), Value::String(skill.clone()));
    }
    let mut data = json!({
        "task_id": run.run_id,
        "execution_id": execution_id,
        "task": {
            "id": run.run_id,
            "title": run.title,
            "task_definition": { "prompt": run.prompt },
            "created_at": run.created_at,
            "updated_at": run.updated_at,
            "owner": { "Type": if run.team { "TEAM" } else { "USER" }, "Id": 1 },
            "agent_config_snapshot": agent_config_snapshot,
        },
        "env_vars": { "WARP_API_KEY": run.run_token.expose() },
    });
    for (key, image) in [
        ("docker_image", &images.docker_image),
        ("sidecar_image", &images.sidecar_image),
    ] {
        if !image.is_empty() {
            data[key] = Value::String(image.clone());
        }
    }
    // Oz derives these from the run's environment; this control plane lets a run name
    // them in its config instead (for trials and tests), overriding the defaults.
    for key in ["docker_image", "sidecar_image", "instance_shape"] {
        if let Some(value) = run.agent_config.get(key) {
            data[key] = value.clone();
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::RunToken;
    use ozfleet_proto::oz::{ServerMessage, parse_server_message};
    use serde_json::Map;

    fn queued_run(skill: Option<&str>, team: bool) -> Run {
        let mut agent_config = Map::new();
        agent_config.insert("worker_host".into(), "w1".into());
        agent_config.insert("model_id".into(), "m1".into());
        agent_config.insert("skill_spec".into(), "org/repo:old".into());
        Run {
            run_id: "019a-run".into(),
            title: "Fix bug".into(),
            prompt: "do it".into(),
            skill: skill.map(str::to_owned),
            team,
            agent_config,
            worker_host: "w1".into(),
            state: RunState::Queued,
            run_token: RunToken::generate("019a-run"),
            created_at: Timestamp::from_micros(1_767_225_600_000_000),
            updated_at: Timestamp::from_micros(1_767_225_601_000_000),
            started_at: None,
            claimed_by: None,
            execution_id: None,
            status_message: None,
            failure_reason: None,
            exit_code: None,
            cancel_requested: false,
        }
    }

    fn parsed(run: &Run) -> ozfleet_proto::oz::TaskAssignment {
        let frame = assignment_frame(&assignment_data(run, "019a-exec", &TaskImages::default()));
        match parse_server_message(&frame).expect("the worker can parse the assignment") {
            ServerMessage::TaskAssignment { assignment, .. } => *assignment,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    #[test]
    fn assignments_carry_the_run_as_the_worker_reads_it() {
        let run = queued_run(None, false);
        let assignment = parsed(&run);
        assert_eq!(assignment.task_id, "019a-run");
        assert_eq!(assignment.execution_id, "019a-exec");
        assert_eq!(assignment.task.id, "019a-run");
        assert_eq!(assignment.task.title, "Fix bug");
        assert_eq!(assignment.task.task_definition.unwrap().prompt, "do it");
        assert_eq!(
            assignment.task.created_at.unwrap(),
            time::macros::datetime!(2026-01-01 0:00 UTC)
        );
        let owner = assignment.task.owner.unwrap();
        assert_eq!((owner.kind.as_str(), owner.id), ("USER", 1));
        let snapshot = assignment.task.agent_config_snapshot.unwrap();
        assert_eq!(snapshot.model_id, "m1");
        assert_eq!(snapshot.skill_spec, "org/repo:old");
        assert_eq!(
            assignment.env_vars.0["WARP_API_KEY"],
            run.run_token.expose()
        );
    }

    #[test]
    fn configured_images_are_sent_and_absent_ones_omitted() {
        let run = queued_run(None, false);
        let images = TaskImages {
            docker_image: "localhost:5999/busybox:1".into(),
            sidecar_image: String::new(),
        };
        let data = assignment_data(&run, "019a-exec", &images);
        assert_eq!(data["docker_image"], "localhost:5999/busybox:1");
        assert!(data.get("sidecar_image").is_none(), "{data}");
        assert!(parsed(&run).docker_image.is_empty());
    }

    #[test]
    fn a_run_config_may_name_its_images_and_shape() {
        let mut run = queued_run(None, false);
        run.agent_config
            .insert("docker_image".into(), json!("my/img:2"));
        run.agent_config
            .insert("instance_shape".into(), json!({"vcpus": 1, "memory_gb": 1}));
        let images = TaskImages {
            docker_image: "default/img:1".into(),
            sidecar_image: "sidecar:1".into(),
        };
        let frame = assignment_frame(&assignment_data(&run, "019a-exec", &images));
        let ServerMessage::TaskAssignment { assignment, .. } =
            parse_server_message(&frame).unwrap()
        else {
            panic!("not an assignment");
        };
        assert_eq!(assignment.docker_image, "my/img:2");
        assert_eq!(assignment.sidecar_image, "sidecar:1");
        let shape = assignment.instance_shape.unwrap();
        assert_eq!((shape.vcpus, shape.memory_gb), (1, 1));
    }

    #[test]
    fn the_run_skill_overrides_the_config_skill_and_teams_own_team_runs() {
        let assignment = parsed(&queued_run(Some("org/repo:new"), true));
        assert_eq!(
            assignment.task.agent_config_snapshot.unwrap().skill_spec,
            "org/repo:new"
        );
        assert!(assignment.task.owner.unwrap().is_team());
    }
}
