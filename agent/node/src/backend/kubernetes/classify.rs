//! How a task pod or Job failed (spec §5.5, §5.6), in the reference's order and with its
//! failure reasons and texts. Pure functions over the API objects.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use ozfleet_proto::oz::FailureReason;

use crate::backend::TaskFailure;

/// Names a pod and its Job in diagnostics.
#[derive(Debug, Clone, Copy)]
pub struct Where<'a> {
    pub namespace: &'a str,
    pub job: &'a str,
}

/// What the Job says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Complete,
    /// `Failed=True`: reason and message of the condition.
    Failed {
        reason: String,
        message: String,
    },
}

pub fn job_state(job: &Job) -> JobState {
    let conditions = job
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_deref())
        .unwrap_or_default();
    for condition in conditions {
        if condition.status != "True" {
            continue;
        }
        match condition.type_.as_str() {
            "Complete" => return JobState::Complete,
            "Failed" => {
                return JobState::Failed {
                    reason: condition.reason.clone().unwrap_or_default(),
                    message: condition.message.clone().unwrap_or_default(),
                };
            }
            _ => {}
        }
    }
    JobState::Running
}

/// A failed Job whose pods showed nothing: `active_deadline` when the condition mentions
/// a deadline, else `job_failed`.
pub fn classify_job_failure(
    name: &str,
    namespace: &str,
    reason: &str,
    message: &str,
) -> TaskFailure {
    let kind = if format!("{reason} {message}")
        .to_lowercase()
        .contains("deadline")
    {
        FailureReason::ActiveDeadline
    } else {
        FailureReason::JobFailed
    };
    TaskFailure::new(
        kind,
        format!(
            "kubernetes Job {name} in namespace {namespace} failed. Job reason: {reason}. Job message: {message}"
        ),
    )
}

const IMMEDIATE_FAILURES: [&str; 5] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
];

const SIGTERM_GUIDANCE: &str = " The container received SIGTERM: check the pod's events and the node's activity for eviction, preemption, node drain, activeDeadlineSeconds, or manual deletion.";

fn signal_name(signal: i32) -> String {
    match signal {
        1 => "SIGHUP".into(),
        2 => "SIGINT".into(),
        3 => "SIGQUIT".into(),
        6 => "SIGABRT".into(),
        9 => "SIGKILL".into(),
        15 => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}

struct PodText<'a> {
    name: &'a str,
    phase: &'a str,
    reason: &'a str,
    message: &'a str,
}

impl<'a> PodText<'a> {
    fn of(pod: &'a Pod) -> Self {
        let status = pod.status.as_ref();
        Self {
            name: pod.metadata.name.as_deref().unwrap_or_default(),
            phase: status.and_then(|s| s.phase.as_deref()).unwrap_or_default(),
            reason: status.and_then(|s| s.reason.as_deref()).unwrap_or_default(),
            message: status
                .and_then(|s| s.message.as_deref())
                .unwrap_or_default(),
        }
    }

    fn place(&self, at: Where<'_>) -> String {
        format!(
            "pod {} (namespace {}, job {})",
            self.name, at.namespace, at.job
        )
    }

    fn details(&self) -> String {
        let mut text = String::new();
        for (label, value) in [
            ("Pod phase", self.phase),
            ("Pod reason", self.reason),
            ("Pod message", self.message),
        ] {
            if !value.is_empty() {
                text.push_str(&format!(". {label}: {value}"));
            }
        }
        text
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ContainerKind {
    Init,
    Main,
}

impl ContainerKind {
    fn word(self) -> &'static str {
        match self {
            Self::Init => "init container",
            Self::Main => "container",
        }
    }
}

fn inspect_container(
    kind: ContainerKind,
    status: &ContainerStatus,
    pod: &PodText<'_>,
    at: Where<'_>,
    skip_exit: bool,
) -> Option<TaskFailure> {
    let state = status.state.as_ref()?;
    let container = format!("{} {} in {}", kind.word(), status.name, pod.place(at));
    if let Some(terminated) = &state.terminated
        && terminated.exit_code != 0
        && !skip_exit
    {
        let signal = match terminated.signal {
            Some(signal) if signal > 0 => signal,
            _ if terminated.exit_code > 128 => terminated.exit_code - 128,
            _ => 0,
        };
        let exit_code = if terminated.exit_code == 0 && signal > 0 {
            128 + signal
        } else {
            terminated.exit_code
        };
        let mut text = format!("{container} exited with code {exit_code}");
        if signal > 0 {
            text.push_str(&format!(" ({})", signal_name(signal)));
        }
        text.push_str(&pod.details());
        if signal == 15 {
            text.push_str(SIGTERM_GUIDANCE);
        }
        let reason = match kind {
            ContainerKind::Init => FailureReason::InitContainer,
            ContainerKind::Main if terminated.reason.as_deref() == Some("OOMKilled") => {
                FailureReason::ContainerOom
            }
            ContainerKind::Main => FailureReason::ContainerExit,
        };
        return Some(TaskFailure::new(reason, text).with_exit_code(exit_code));
    }
    let waiting = state.waiting.as_ref()?;
    let reason = waiting.reason.as_deref().unwrap_or_default();
    if !IMMEDIATE_FAILURES.contains(&reason) {
        return None;
    }
    let kind_reason = match (reason, kind) {
        ("ErrImagePull" | "ImagePullBackOff", _) => FailureReason::ImagePull,
        ("InvalidImageName", _) => FailureReason::InvalidImage,
        (_, ContainerKind::Init) => FailureReason::InitContainer,
        ("CreateContainerConfigError" | "CreateContainerError", ContainerKind::Main) => {
            FailureReason::ContainerCreate
        }
        (_, ContainerKind::Main) => FailureReason::ContainerWait,
    };
    let message = waiting.message.as_deref().unwrap_or_default();
    Some(TaskFailure::new(
        kind_reason,
        format!("{container} is waiting: {reason}: {message}"),
    ))
}

/// Init containers declared with `restartPolicy: Always` (native sidecars, Kubernetes ≥
/// 1.28): their exit codes never fail the task.
fn restartable_init_containers(pod: &Pod) -> HashSet<&str> {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|container| container.restart_policy.as_deref() == Some("Always"))
        .map(|container| container.name.as_str())
        .collect()
}

/// Steps 1–4 of the reference's order: evicted, init containers, main containers,
/// unschedulable past `unschedulable_timeout` (pod age; zero disables). `age` is how long
/// ago the pod was created.
pub fn inspect_pod(
    pod: &Pod,
    at: Where<'_>,
    age: Duration,
    unschedulable_timeout: Duration,
) -> Option<TaskFailure> {
    let text = PodText::of(pod);
    let status = pod.status.as_ref()?;
    if text.reason.eq_ignore_ascii_case("Evicted") || text.message.to_lowercase().contains("evict")
    {
        return Some(TaskFailure::new(
            FailureReason::Evicted,
            format!("{} was evicted{}", text.place(at), text.details()),
        ));
    }
    let sidecars = restartable_init_containers(pod);
    for container in status
        .init_container_statuses
        .as_deref()
        .unwrap_or_default()
    {
        let skip_exit = sidecars.contains(container.name.as_str());
        if let Some(failure) =
            inspect_container(ContainerKind::Init, container, &text, at, skip_exit)
        {
            return Some(failure);
        }
    }
    for container in status.container_statuses.as_deref().unwrap_or_default() {
        if let Some(failure) = inspect_container(ContainerKind::Main, container, &text, at, false) {
            return Some(failure);
        }
    }
    if let Some(message) = unschedulable_message(pod)
        && !unschedulable_timeout.is_zero()
        && age >= unschedulable_timeout
    {
        return Some(TaskFailure::new(
            FailureReason::Unschedulable,
            format!(
                "{} is unschedulable. Pod reason: Unschedulable. Pod message: {message}",
                text.place(at)
            ),
        ));
    }
    None
}

/// The message of a `PodScheduled=False` condition with reason `Unschedulable`.
pub fn unschedulable_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|condition| {
            condition.type_ == "PodScheduled"
                && condition.status == "False"
                && condition.reason.as_deref() == Some("Unschedulable")
        })
        .map(|condition| condition.message.clone().unwrap_or_default())
}

/// Whether steps 5–6 apply (phase `Pending` or `Failed`).
pub fn needs_events(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending" | "Failed")
    )
}

/// Steps 5–6: a `FailedMount` event (or `MountVolume.SetUp failed`), then phase `Failed`.
pub fn inspect_pod_events(pod: &Pod, events: &[Event], at: Where<'_>) -> Option<TaskFailure> {
    let text = PodText::of(pod);
    if let Some(event) = events.iter().find(|event| {
        event.reason.as_deref() == Some("FailedMount")
            || event
                .message
                .as_deref()
                .is_some_and(|message| message.contains("MountVolume.SetUp failed"))
    }) {
        return Some(TaskFailure::new(
            FailureReason::VolumeMount,
            format!(
                "{} failed to mount a volume. Kubernetes event reason: {}. Kubernetes event message: {}",
                text.place(at),
                event.reason.as_deref().unwrap_or_default(),
                event.message.as_deref().unwrap_or_default()
            ),
        ));
    }
    if text.phase == "Failed" {
        let reason = if format!("{} {}", text.reason, text.message)
            .to_lowercase()
            .contains("deadline")
        {
            FailureReason::ActiveDeadline
        } else {
            FailureReason::JobFailed
        };
        return Some(TaskFailure::new(
            reason,
            format!("{} failed{}", text.place(at), text.details()),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Where<'static> = Where {
        namespace: "ns",
        job: "oz-task-x-exec-1",
    };

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn terminated(name: &str, code: i32) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code}}})
    }

    #[test]
    fn exit_143_names_everything_and_adds_guidance() {
        let pod = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Failed", "containerStatuses": [terminated("task", 143)]}
        }));
        let failure = inspect_pod(&pod, AT, Duration::ZERO, Duration::from_secs(30)).unwrap();
        assert_eq!(failure.reason, FailureReason::ContainerExit);
        assert_eq!(failure.exit_code, 143);
        assert!(failure.error.starts_with(
            "container task in pod p (namespace ns, job oz-task-x-exec-1) exited with code 143 (SIGTERM). Pod phase: Failed"
        ), "{}", failure.error);
        assert!(
            failure.error.contains("eviction, preemption, node drain"),
            "{}",
            failure.error
        );
    }

    #[test]
    fn native_sidecar_exit_is_ignored_but_not_its_waiting_failure() {
        let spec = serde_json::json!({"initContainers": [
            {"name": "proxy", "restartPolicy": "Always"}, {"name": "setup"}], "containers": []});
        let sidecar_143 = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": spec,
            "status": {"phase": "Running", "initContainerStatuses": [terminated("proxy", 143)],
                       "containerStatuses": [terminated("task", 0)]}}));
        assert!(inspect_pod(&sidecar_143, AT, Duration::ZERO, Duration::ZERO).is_none());
        let with_task_2 = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": spec,
            "status": {"phase": "Failed", "initContainerStatuses": [terminated("proxy", 143)],
                       "containerStatuses": [terminated("task", 2)]}}));
        assert_eq!(
            inspect_pod(&with_task_2, AT, Duration::ZERO, Duration::ZERO)
                .unwrap()
                .exit_code,
            2
        );
        let plain_init = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": spec,
            "status": {"phase": "Failed", "initContainerStatuses": [terminated("setup", 1)]}}));
        assert_eq!(
            inspect_pod(&plain_init, AT, Duration::ZERO, Duration::ZERO)
                .unwrap()
                .reason,
            FailureReason::InitContainer
        );
        let pull = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": spec,
            "status": {"phase": "Pending", "initContainerStatuses": [{"name": "proxy", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "nope"}}}]}}));
        let failure = inspect_pod(&pull, AT, Duration::ZERO, Duration::ZERO).unwrap();
        assert_eq!(failure.reason, FailureReason::ImagePull);
        assert!(
            failure
                .error
                .ends_with("is waiting: ImagePullBackOff: nope"),
            "{}",
            failure.error
        );
    }

    #[test]
    fn unschedulable_only_after_the_timeout_and_never_when_disabled() {
        let pod = pod(
            serde_json::json!({"metadata": {"name": "p"}, "status": {"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": "0/1 nodes are available"}]}}),
        );
        let timeout = Duration::from_secs(30);
        assert!(inspect_pod(&pod, AT, Duration::from_secs(10), timeout).is_none());
        let failure = inspect_pod(&pod, AT, Duration::from_secs(31), timeout).unwrap();
        assert_eq!(failure.reason, FailureReason::Unschedulable);
        assert_eq!(
            failure.error,
            "pod p (namespace ns, job oz-task-x-exec-1) is unschedulable. Pod reason: Unschedulable. Pod message: 0/1 nodes are available"
        );
        assert!(inspect_pod(&pod, AT, Duration::from_secs(3600), Duration::ZERO).is_none());
    }

    #[test]
    fn evictions_oom_mounts_and_phases() {
        let evicted = pod(serde_json::json!({"metadata": {"name": "p"},
            "status": {"phase": "Failed", "reason": "Evicted", "message": "low memory"}}));
        assert_eq!(
            inspect_pod(&evicted, AT, Duration::ZERO, Duration::ZERO)
                .unwrap()
                .reason,
            FailureReason::Evicted
        );
        let oom = pod(
            serde_json::json!({"metadata": {"name": "p"}, "status": {"phase": "Failed",
            "containerStatuses": [{"name": "task", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}),
        );
        let failure = inspect_pod(&oom, AT, Duration::ZERO, Duration::ZERO).unwrap();
        assert_eq!(
            (failure.reason, failure.exit_code),
            (FailureReason::ContainerOom, 137)
        );
        assert!(failure.error.contains("(SIGKILL)"), "{}", failure.error);

        let pending =
            pod(serde_json::json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}));
        assert!(needs_events(&pending));
        let event: Event = serde_json::from_value(serde_json::json!({"metadata": {},
            "involvedObject": {}, "reason": "FailedMount", "message": "secret \"x\" not found"}))
        .unwrap();
        let failure = inspect_pod_events(&pending, &[event], AT).unwrap();
        assert_eq!(failure.reason, FailureReason::VolumeMount);
        assert!(
            failure
                .error
                .contains("failed to mount a volume. Kubernetes event reason: FailedMount")
        );

        let deadline = pod(
            serde_json::json!({"metadata": {"name": "p"}, "status": {"phase": "Failed",
            "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline"}}),
        );
        assert_eq!(
            inspect_pod_events(&deadline, &[], AT).unwrap().reason,
            FailureReason::ActiveDeadline
        );
    }

    #[test]
    fn job_states_and_failures() {
        let job = |conditions: serde_json::Value| -> Job {
            serde_json::from_value(
                serde_json::json!({"metadata": {}, "status": {"conditions": conditions}}),
            )
            .unwrap()
        };
        assert_eq!(job_state(&job(serde_json::json!([]))), JobState::Running);
        assert_eq!(
            job_state(&job(
                serde_json::json!([{"type": "Complete", "status": "True"}])
            )),
            JobState::Complete
        );
        let failed = job_state(&job(
            serde_json::json!([{"type": "Failed", "status": "True",
            "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]),
        ));
        let JobState::Failed { reason, message } = failed else {
            panic!("{failed:?}")
        };
        let failure = classify_job_failure("j", "ns", &reason, &message);
        assert_eq!(failure.reason, FailureReason::ActiveDeadline);
        assert_eq!(
            failure.error,
            "kubernetes Job j in namespace ns failed. Job reason: DeadlineExceeded. Job message: Job was active longer than specified deadline"
        );
        assert_eq!(
            classify_job_failure(
                "j",
                "ns",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit"
            )
            .reason,
            FailureReason::JobFailed
        );
    }
}
