//! Following a task Job to its end (spec §5.5): a Job watch and a Pod watch, each
//! re-opened when it closes or reports an error, a 30 s safety poll, and an extra check
//! when an unschedulable pod reaches `unschedulable_timeout`. Success is only ever
//! concluded from the Job's `Complete` condition.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{ListParams, LogParams, WatchEvent, WatchParams};
use ozfleet_proto::oz::FailureReason;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::classify::{self, JobState, Where};
use super::client::{api_code, api_error_text};
use super::job_spec::LABEL_EXECUTION_HASH;
use crate::backend::TaskFailure;

/// The reference's safety-net poll interval.
pub const SAFETY_POLL: Duration = Duration::from_secs(30);
/// Per-container log cap.
const LOG_LIMIT_BYTES: i64 = 1024 * 1024;
/// Server-side watch timeout; the watch is re-opened after it.
const WATCH_TIMEOUT_SECS: u32 = 290;

/// How following a Job ended.
#[derive(Debug)]
pub enum Ending {
    Succeeded,
    Failed(TaskFailure),
    Cancelled,
}

/// The Job being followed and how to reach it.
pub struct Followed<'a> {
    pub jobs: &'a Api<Job>,
    pub pods: &'a Api<Pod>,
    pub events: &'a Api<Event>,
    pub namespace: &'a str,
    pub name: &'a str,
    pub execution_hash: &'a str,
    pub unschedulable_timeout: Duration,
}

type EventStream<K> = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<K>>> + Send>>;

impl Followed<'_> {
    fn at(&self) -> Where<'_> {
        Where {
            namespace: self.namespace,
            job: self.name,
        }
    }

    fn pod_selector(&self) -> String {
        format!("{LABEL_EXECUTION_HASH}={}", self.execution_hash)
    }

    async fn open_jobs(&self) -> Result<EventStream<Job>, TaskFailure> {
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(WATCH_TIMEOUT_SECS);
        match self.jobs.watch(&params, "0").await {
            Ok(stream) => Ok(stream.boxed()),
            Err(error) => Err(TaskFailure::new(
                FailureReason::JobWatch,
                format!(
                    "failed to watch Kubernetes Job {}: {}",
                    self.name,
                    api_error_text(&error)
                ),
            )),
        }
    }

    async fn open_pods(&self) -> Result<EventStream<Pod>, TaskFailure> {
        let params = WatchParams::default()
            .labels(&self.pod_selector())
            .timeout(WATCH_TIMEOUT_SECS);
        match self.pods.watch(&params, "0").await {
            Ok(stream) => Ok(stream.boxed()),
            Err(error) => Err(TaskFailure::new(
                FailureReason::PodWatch,
                format!(
                    "failed to watch pods of Kubernetes Job {}: {}",
                    self.name,
                    api_error_text(&error)
                ),
            )),
        }
    }

    /// Follows the Job until it completes, a failure shows, or `cancel` fires.
    pub async fn follow(&self, cancel: &CancellationToken) -> Ending {
        match self.follow_inner(cancel).await {
            Ok(ending) => ending,
            Err(failure) => Ending::Failed(failure),
        }
    }

    async fn follow_inner(&self, cancel: &CancellationToken) -> Result<Ending, TaskFailure> {
        let mut jobs = self.open_jobs().await?;
        let mut pods = self.open_pods().await?;
        let mut safety = tokio::time::interval_at(Instant::now() + SAFETY_POLL, SAFETY_POLL);
        let mut recheck: Option<Instant> = None;
        loop {
            let recheck_at = recheck.unwrap_or_else(|| Instant::now() + SAFETY_POLL * 4);
            let verdict = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(Ending::Cancelled),
                event = jobs.next() => match event {
                    Some(Ok(WatchEvent::Added(job) | WatchEvent::Modified(job))) => {
                        self.on_job(&job).await?
                    }
                    Some(Ok(WatchEvent::Deleted(_))) => Some(self.vanished(cancel)),
                    Some(Ok(WatchEvent::Bookmark(_))) => None,
                    Some(Ok(WatchEvent::Error(status))) => {
                        tracing::debug!(job = self.name, code = status.code, "job watch error; re-opening");
                        jobs = self.open_jobs().await?;
                        None
                    }
                    Some(Err(error)) => {
                        tracing::debug!(job = self.name, error = %api_error_text(&error), "job watch failed; re-opening");
                        jobs = self.open_jobs().await?;
                        None
                    }
                    None => {
                        jobs = self.open_jobs().await?;
                        None
                    }
                },
                event = pods.next() => match event {
                    Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                        self.on_pod(&pod, &mut recheck).await.map(Ending::Failed)
                    }
                    Some(Ok(WatchEvent::Deleted(_) | WatchEvent::Bookmark(_))) => None,
                    Some(Ok(WatchEvent::Error(status))) => {
                        tracing::debug!(job = self.name, code = status.code, "pod watch error; re-opening");
                        pods = self.open_pods().await?;
                        None
                    }
                    Some(Err(error)) => {
                        tracing::debug!(job = self.name, error = %api_error_text(&error), "pod watch failed; re-opening");
                        pods = self.open_pods().await?;
                        None
                    }
                    None => {
                        pods = self.open_pods().await?;
                        None
                    }
                },
                _ = safety.tick() => self.poll(cancel, &mut recheck).await?,
                () = tokio::time::sleep_until(recheck_at) => {
                    recheck = None;
                    self.poll(cancel, &mut recheck).await?
                }
            };
            if let Some(ending) = verdict {
                if let Ending::Failed(_) = ending {
                    self.log_pod_output(true).await;
                } else {
                    self.log_pod_output(false).await;
                }
                return Ok(ending);
            }
        }
    }

    /// The Job disappeared while being followed: cancelled when cancellation fired, else
    /// someone else deleted it.
    fn vanished(&self, cancel: &CancellationToken) -> Ending {
        if cancel.is_cancelled() {
            return Ending::Cancelled;
        }
        Ending::Failed(TaskFailure::new(
            FailureReason::JobWatch,
            format!(
                "kubernetes Job {} in namespace {} was deleted before it finished",
                self.name, self.namespace
            ),
        ))
    }

    /// The Job's state: success, failure (from its pods first, else the Job), or nothing.
    async fn on_job(&self, job: &Job) -> Result<Option<Ending>, TaskFailure> {
        match classify::job_state(job) {
            JobState::Running => Ok(None),
            JobState::Complete => Ok(Some(Ending::Succeeded)),
            JobState::Failed { reason, message } => {
                let mut ignored = None;
                for pod in self.list_pods().await? {
                    if let Some(failure) = self.on_pod(&pod, &mut ignored).await {
                        return Ok(Some(Ending::Failed(failure)));
                    }
                }
                Ok(Some(Ending::Failed(classify::classify_job_failure(
                    self.name,
                    self.namespace,
                    &reason,
                    &message,
                ))))
            }
        }
    }

    /// A pod failure per spec §5.6, if any. An unschedulable pod below the timeout
    /// schedules a re-check for when it reaches it.
    async fn on_pod(&self, pod: &Pod, recheck: &mut Option<Instant>) -> Option<TaskFailure> {
        let age = pod_age(pod);
        if let Some(failure) =
            classify::inspect_pod(pod, self.at(), age, self.unschedulable_timeout)
        {
            return Some(failure);
        }
        if classify::unschedulable_message(pod).is_some() && !self.unschedulable_timeout.is_zero() {
            let due = Instant::now()
                + self.unschedulable_timeout.saturating_sub(age)
                + Duration::from_millis(100);
            *recheck = Some(recheck.map_or(due, |current| current.min(due)));
        }
        if !classify::needs_events(pod) {
            return None;
        }
        let uid = pod.metadata.uid.as_deref()?;
        let params = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
        let events = match self.events.list(&params).await {
            Ok(events) => events.items,
            Err(error) => {
                tracing::debug!(job = self.name, error = %api_error_text(&error), "cannot list pod events");
                Vec::new()
            }
        };
        classify::inspect_pod_events(pod, &events, self.at())
    }

    async fn list_pods(&self) -> Result<Vec<Pod>, TaskFailure> {
        self.pods
            .list(&ListParams::default().labels(&self.pod_selector()))
            .await
            .map(|list| list.items)
            .map_err(|error| {
                TaskFailure::new(
                    FailureReason::PodWatch,
                    format!(
                        "failed to list pods of Kubernetes Job {}: {}",
                        self.name,
                        api_error_text(&error)
                    ),
                )
            })
    }

    /// The safety poll: the Job, then its pods.
    async fn poll(
        &self,
        cancel: &CancellationToken,
        recheck: &mut Option<Instant>,
    ) -> Result<Option<Ending>, TaskFailure> {
        match self.jobs.get(self.name).await {
            Ok(job) => {
                if let Some(ending) = self.on_job(&job).await? {
                    return Ok(Some(ending));
                }
            }
            Err(error) if api_code(&error) == Some(404) && cancel.is_cancelled() => {
                return Ok(Some(Ending::Cancelled));
            }
            Err(error) => {
                return Err(TaskFailure::new(
                    FailureReason::JobWatch,
                    format!(
                        "failed to get Kubernetes Job {}: {}",
                        self.name,
                        api_error_text(&error)
                    ),
                ));
            }
        }
        for pod in self.list_pods().await? {
            if let Some(failure) = self.on_pod(&pod, recheck).await {
                return Ok(Some(Ending::Failed(failure)));
            }
        }
        Ok(None)
    }

    /// Logs every container's output (up to 1 MiB each): at info after a failure, at
    /// debug (and only read when enabled) after a success.
    async fn log_pod_output(&self, failed: bool) {
        if !failed && !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let Ok(pods) = self.list_pods().await else {
            return;
        };
        for pod in pods {
            let Some(pod_name) = pod.metadata.name.as_deref() else {
                continue;
            };
            let spec = pod.spec.as_ref();
            let containers = spec
                .and_then(|spec| spec.init_containers.as_deref())
                .unwrap_or_default()
                .iter()
                .chain(
                    spec.map(|spec| spec.containers.as_slice())
                        .unwrap_or_default(),
                );
            for container in containers {
                let params = LogParams {
                    container: Some(container.name.clone()),
                    limit_bytes: Some(LOG_LIMIT_BYTES),
                    ..Default::default()
                };
                let output = match self.pods.logs(pod_name, &params).await {
                    Ok(output) => output,
                    Err(error) => format!("(logs unavailable: {})", api_error_text(&error)),
                };
                let section = format!("[{pod_name}/{}]\n{output}", container.name);
                if failed {
                    tracing::info!(job = self.name, "task pod output:\n{section}");
                } else {
                    tracing::debug!(job = self.name, "task pod output:\n{section}");
                }
            }
        }
    }
}

/// How long ago the pod was created (zero when unknown or in the future).
fn pod_age(pod: &Pod) -> Duration {
    let Some(created) = pod.metadata.creation_timestamp.as_ref() else {
        return Duration::ZERO;
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let seconds = now.as_second() - created.0.as_second();
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}
