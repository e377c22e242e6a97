//! What a task Job is called and carries (spec §5.2, §5.3): its name, the `oz-*` labels
//! and their hashes, ozfleet's own ownership labels and annotations, and the Job object
//! around the pod spec of [`super::pod_template`].

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest as _, Sha256};

/// Label: label-sanitised worker id.
pub const LABEL_WORKER_ID: &str = "oz-worker-id";
/// Label: hash of the worker id.
pub const LABEL_WORKER_HASH: &str = "oz-worker-hash";
/// Label: label-sanitised run (task) id.
pub const LABEL_TASK_ID: &str = "oz-task-id";
/// Label: hash of the run id.
pub const LABEL_TASK_HASH: &str = "oz-task-hash";
/// Label: label-sanitised execution key.
pub const LABEL_EXECUTION_ID: &str = "oz-execution-id";
/// Label: hash of the execution key; the pod watch selects on it.
pub const LABEL_EXECUTION_HASH: &str = "oz-execution-hash";
/// ozfleet label: hash of the node id, so a restarted agent finds its own Jobs only.
pub const LABEL_NODE_HASH: &str = "ozfleet.dev/node-hash";
/// ozfleet label present on every task Job it creates.
pub const LABEL_MANAGED: &str = "ozfleet.dev/managed";
/// ozfleet annotation: the exact run id (labels are lossy).
pub const ANNOTATION_TASK_ID: &str = "ozfleet.dev/task-id";
/// ozfleet annotation: the exact execution id as Oz sent it (possibly empty).
pub const ANNOTATION_EXECUTION_ID: &str = "ozfleet.dev/execution-id";
/// ozfleet annotation: the exact node id.
pub const ANNOTATION_NODE_ID: &str = "ozfleet.dev/node-id";

const NAME_PREFIX: &str = "oz-task-";
const EXEC_INFIX: &str = "-exec-";
const MAX_NAME: usize = 63;

/// The trimmed execution id, or the run id when it is empty (spec §5.2).
pub fn execution_key<'a>(task_id: &'a str, execution_id: &'a str) -> &'a str {
    let trimmed = execution_id.trim();
    if trimmed.is_empty() { task_id } else { trimmed }
}

/// Lower case, `[a-z0-9]` kept, everything else `-`, `-` trimmed at both ends.
fn name_fragment(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches('-')
        .to_owned()
}

/// `oz-task-<run>-exec-<last 8 of the execution key>`, at most 63 characters.
pub fn job_name(task_id: &str, execution_key: &str) -> String {
    let execution = name_fragment(execution_key);
    let tail_start = execution
        .char_indices()
        .rev()
        .nth(7)
        .map_or(0, |(index, _)| index);
    let exec8 = match execution[tail_start..].trim_matches('-') {
        "" => "exec".to_owned(),
        exec8 => exec8.to_owned(),
    };
    let room = MAX_NAME - NAME_PREFIX.len() - EXEC_INFIX.len() - exec8.len();
    let run: String = name_fragment(task_id).chars().take(room).collect();
    let run = match run.trim_matches('-') {
        "" => "run".to_owned(),
        run => run.to_owned(),
    };
    format!("{NAME_PREFIX}{run}{EXEC_INFIX}{exec8}")
}

/// A valid label value: lower case, `[a-z0-9-_.]` kept, others `-`, `-_.` trimmed,
/// at most 63 characters, `unknown` when nothing is left.
pub fn label_value(value: &str) -> String {
    let edge = |c: char| matches!(c, '-' | '_' | '.');
    let mapped: String = value
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || edge(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches(edge);
    if trimmed.is_empty() {
        return "unknown".to_owned();
    }
    let cut: String = trimmed.chars().take(MAX_NAME).collect();
    match cut.trim_end_matches(edge) {
        "" => "unknown".to_owned(),
        cut => cut.to_owned(),
    }
}

/// Lower-case hex of the first 8 bytes of SHA-256 (16 characters).
pub fn short_hash(value: &str) -> String {
    Sha256::digest(value.as_bytes())[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Who a task Job belongs to and which execution it runs.
#[derive(Debug, Clone)]
pub struct JobIdentity {
    /// The worker id the `oz-worker-*` labels name.
    pub worker_id: String,
    pub node_id: String,
    pub task_id: String,
    pub execution_id: String,
}

impl JobIdentity {
    pub fn execution_key(&self) -> &str {
        execution_key(&self.task_id, &self.execution_id)
    }

    pub fn job_name(&self) -> String {
        job_name(&self.task_id, self.execution_key())
    }

    pub fn execution_hash(&self) -> String {
        short_hash(self.execution_key())
    }

    /// `extra_labels`, overwritten by the six `oz-*` labels and ozfleet's own two.
    pub fn labels(&self, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut labels = extra.clone();
        let key = self.execution_key();
        for (name, value) in [
            (LABEL_WORKER_ID, label_value(&self.worker_id)),
            (LABEL_WORKER_HASH, short_hash(&self.worker_id)),
            (LABEL_TASK_ID, label_value(&self.task_id)),
            (LABEL_TASK_HASH, short_hash(&self.task_id)),
            (LABEL_EXECUTION_ID, label_value(key)),
            (LABEL_EXECUTION_HASH, short_hash(key)),
            (LABEL_NODE_HASH, short_hash(&self.node_id)),
            (LABEL_MANAGED, "true".to_owned()),
        ] {
            labels.insert(name.to_owned(), value);
        }
        labels
    }

    /// `extra_annotations` plus the exact ids (labels are lossy).
    pub fn annotations(&self, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut annotations = extra.clone();
        annotations.insert(ANNOTATION_TASK_ID.to_owned(), self.task_id.clone());
        annotations.insert(
            ANNOTATION_EXECUTION_ID.to_owned(),
            self.execution_id.clone(),
        );
        annotations.insert(ANNOTATION_NODE_ID.to_owned(), self.node_id.clone());
        annotations
    }

    /// Whether `job` runs this identity's execution (an adopted Job must).
    pub fn matches(&self, job: &Job) -> bool {
        let annotations = job.metadata.annotations.as_ref();
        let annotation = |name: &str| annotations.and_then(|a| a.get(name)).map(String::as_str);
        annotation(ANNOTATION_TASK_ID) == Some(self.task_id.as_str())
            && annotation(ANNOTATION_EXECUTION_ID) == Some(self.execution_id.as_str())
            && annotation(ANNOTATION_NODE_ID) == Some(self.node_id.as_str())
    }
}

/// Job-level settings (spec §5.3).
#[derive(Debug, Clone)]
pub struct JobSettings<'a> {
    pub namespace: &'a str,
    pub extra_labels: &'a BTreeMap<String, String>,
    pub extra_annotations: &'a BTreeMap<String, String>,
    pub active_deadline_seconds: Option<i64>,
    /// `None` when cleanup is disabled.
    pub ttl_seconds_after_finished: Option<i32>,
}

/// The task Job: `backoffLimit: 0`, the deadline and TTL, labels and annotations on the
/// Job and its pod template.
pub fn task_job(identity: &JobIdentity, settings: &JobSettings<'_>, pod: PodSpec) -> Job {
    let labels = identity.labels(settings.extra_labels);
    let annotations = identity.annotations(settings.extra_annotations);
    Job {
        metadata: ObjectMeta {
            name: Some(identity.job_name()),
            namespace: Some(settings.namespace.to_owned()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: settings.active_deadline_seconds,
            ttl_seconds_after_finished: settings.ttl_seconds_after_finished,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_follow_the_reference_examples() {
        assert_eq!(
            job_name(
                "019f5de4-bfd1-762e-92ed-199c971abcba",
                "019f5df0-aaaa-bbbb-cccc-abcdef012345"
            ),
            "oz-task-019f5de4-bfd1-762e-92ed-199c971abcba-exec-ef012345"
        );
        assert_eq!(job_name("", ""), "oz-task-run-exec-exec");
        assert_eq!(job_name("RUN_1", "exec.2"), "oz-task-run-1-exec-exec-2");
        let long = job_name(&"A".repeat(100), "0123456789");
        assert!(long.len() <= 63, "{long}");
        assert!(long.ends_with("-exec-23456789"), "{long}");
        assert!(!long.contains(['_', '.']), "{long}");
    }

    #[test]
    fn labels_are_sanitised_and_hashed() {
        assert_eq!(label_value("Worker A"), "worker-a");
        assert_eq!(label_value("__"), "unknown");
        assert_eq!(
            label_value(&format!("{}.x", "a".repeat(62))),
            "a".repeat(62)
        );
        assert_eq!(short_hash("abc"), "ba7816bf8f01cfea");
        let identity = JobIdentity {
            worker_id: "Worker A".into(),
            node_id: "node-1".into(),
            task_id: "run-1".into(),
            execution_id: "  ".into(),
        };
        assert_eq!(identity.execution_key(), "run-1");
        let extra = BTreeMap::from([
            ("team".to_owned(), "a".to_owned()),
            (LABEL_TASK_ID.to_owned(), "overwritten".to_owned()),
        ]);
        let labels = identity.labels(&extra);
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[LABEL_WORKER_ID], "worker-a");
        assert_eq!(labels[LABEL_WORKER_HASH], short_hash("Worker A"));
        assert_eq!(labels[LABEL_TASK_ID], "run-1");
        assert_eq!(labels[LABEL_EXECUTION_ID], "run-1");
        assert_eq!(labels[LABEL_EXECUTION_HASH], short_hash("run-1"));
        assert_eq!(labels[LABEL_NODE_HASH], short_hash("node-1"));
    }

    #[test]
    fn job_carries_backoff_deadline_ttl_and_metadata() {
        let identity = JobIdentity {
            worker_id: "w".into(),
            node_id: "n".into(),
            task_id: "RUN".into(),
            execution_id: "exec-12345678".into(),
        };
        let extra_annotations = BTreeMap::from([("a".to_owned(), "b".to_owned())]);
        let settings = JobSettings {
            namespace: "ns",
            extra_labels: &BTreeMap::new(),
            extra_annotations: &extra_annotations,
            active_deadline_seconds: Some(60),
            ttl_seconds_after_finished: Some(86_400),
        };
        let job = task_job(&identity, &settings, PodSpec::default());
        assert_eq!(
            job.metadata.name.as_deref(),
            Some("oz-task-run-exec-12345678")
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(60));
        assert_eq!(spec.ttl_seconds_after_finished, Some(86_400));
        let template = spec.template.metadata.as_ref().unwrap();
        assert_eq!(template.labels, job.metadata.labels);
        assert_eq!(template.annotations.as_ref().unwrap()["a"], "b");
        assert!(identity.matches(&job));
        let other = JobIdentity {
            execution_id: "exec-2".into(),
            ..identity
        };
        assert!(!other.matches(&job));
    }
}
