//! Kubernetes backend (spec §5): one Job per task through the Kubernetes API.
//!
//! Behaviour follows the reference worker: client selection and the startup preflight
//! Job ([`client`], [`preflight`]), Job naming, labels and spec ([`job_spec`]), the pod
//! and its merge with `pod_template` ([`pod_template`]), watching with re-opened watches
//! and a safety poll ([`watch`]) and failure classification ([`classify`]). Deliberate
//! improvements:
//! - cancellation deletes the Job with foreground propagation, so the pod really stops,
//!   and reports the task cancelled;
//! - Jobs carry the node's hash label and the exact ids as annotations: a restarted agent
//!   re-adopts its Jobs ([`adopt`]) and reports each outcome once, including Jobs that
//!   ended while it was down; a create that finds the same execution's Job adopts it;
//! - shutting the agent down leaves Jobs running (as the reference does) so the next
//!   agent run can re-adopt them.
//!
//! Task environment values are credentials: they reach the API server inside the Job
//! only, never a log.

mod adopt;
mod classify;
mod client;
pub mod job_spec;
pub mod pod_template;
mod preflight;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod, PodSpec, ResourceRequirements};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use ozfleet_proto::oz::FailureReason;
use ozfleet_proto::v1::BackendKind;
use ozfleet_worker_config::KubernetesSettings;
use tokio_util::sync::CancellationToken;

use self::client::{api_code, api_error_text};
use self::job_spec::JobSettings;
pub use self::job_spec::{JobIdentity, job_name};
use self::pod_template::PodInputs;
use self::watch::{Ending, Followed};
use super::{RecoveredTask, TaskBackend, TaskEnv, TaskFailure, TaskRun, cancelled};

/// Configuration of the Kubernetes backend.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// This node's stable id: its Jobs carry its hash so a restarted agent finds its own.
    pub node_id: String,
    /// The worker id the `oz-worker-*` labels name (the config's `worker_id`, else the
    /// node id).
    pub worker_id: String,
    pub settings: KubernetesSettings,
    /// Operator environment (`-e` only, as in the reference), resolved.
    pub environment: TaskEnv,
    pub cleanup: bool,
    /// Grace period of a cancelled task's pod.
    pub cancel_grace: Duration,
}

/// Runs tasks as Kubernetes Jobs.
pub struct KubernetesBackend {
    engine: Arc<Engine>,
}

struct Engine {
    config: KubernetesConfig,
    jobs: Api<Job>,
    pods: Api<Pod>,
    events: Api<Event>,
    template: Option<PodSpec>,
}

impl KubernetesBackend {
    /// Connects (explicit kubeconfig, in-cluster, default rules), checks the server and
    /// runs the startup preflight Job.
    pub async fn new(config: KubernetesConfig) -> anyhow::Result<Self> {
        let client = client::connect(config.settings.kubeconfig.as_deref())
            .await
            .map_err(anyhow::Error::msg)?;
        Self::with_client(client, config).await
    }

    /// [`KubernetesBackend::new`] with a given client.
    pub async fn with_client(client: Client, config: KubernetesConfig) -> anyhow::Result<Self> {
        let namespace = config.settings.namespace.clone();
        let template = config
            .settings
            .pod_template
            .clone()
            .map(serde_json::from_value::<PodSpec>)
            .transpose()
            .map_err(|error| anyhow::anyhow!("invalid backend.kubernetes.pod_template: {error}"))?;
        let resources = config
            .settings
            .preflight_resources
            .clone()
            .map(serde_json::from_value::<ResourceRequirements>)
            .transpose()
            .map_err(|error| {
                anyhow::anyhow!("invalid backend.kubernetes.preflight_resources: {error}")
            })?;
        let engine = Engine {
            jobs: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client.clone(), &namespace),
            events: Api::namespaced(client, &namespace),
            template,
            config,
        };
        let settings = &engine.config.settings;
        preflight::Preflight {
            jobs: engine.jobs.clone(),
            pods: engine.pods.clone(),
            events: engine.events.clone(),
            namespace: &namespace,
            worker_id: &engine.config.worker_id,
            template: engine.template.as_ref(),
            image: &settings.preflight_image,
            pull_policy: settings.image_pull_policy.as_str(),
            resources,
            use_image_volumes: settings.use_image_volumes,
        }
        .run()
        .await
        .map_err(anyhow::Error::msg)?;
        tracing::info!(namespace, "kubernetes startup preflight passed");
        Ok(Self {
            engine: Arc::new(engine),
        })
    }
}

impl Engine {
    fn identity(&self, task_id: &str, execution_id: &str) -> JobIdentity {
        JobIdentity {
            worker_id: self.config.worker_id.clone(),
            node_id: self.config.node_id.clone(),
            task_id: task_id.to_owned(),
            execution_id: execution_id.to_owned(),
        }
    }

    /// The task Job for `task`.
    fn task_job(&self, task: &TaskRun) -> Result<(JobIdentity, Job), TaskFailure> {
        let settings = &self.config.settings;
        let sidecars = pod_template::apply_sidecar_overrides(
            task.sidecars.clone(),
            settings.sidecar_image.as_deref(),
            task.harness.as_deref(),
            &settings.coding_cli_sidecars,
        );
        pod_template::validate_sidecars(&sidecars, settings.use_image_volumes)
            .map_err(|error| TaskFailure::new(FailureReason::SidecarPrep, error))?;
        // The node resolves a missing server image to the fallback; `default_image`
        // takes its place here (spec §3.3).
        let image = match &settings.default_image {
            Some(default) if task.image == crate::images::FALLBACK_IMAGE => default.as_str(),
            _ => task.image.as_str(),
        };
        let env = pod_template::task_env(&task.env, &self.config.environment, &task.task_id);
        let size_limit = settings
            .workspace_size_limit
            .as_ref()
            .map(|q| q.as_str().to_owned());
        let inputs = PodInputs {
            image,
            pull_policy: settings.image_pull_policy.as_str(),
            base_args: &task.base_args,
            env: &env,
            sidecars: &sidecars,
            use_image_volumes: settings.use_image_volumes,
            setup_command: settings.setup_command.as_deref(),
            teardown_command: settings.teardown_command.as_deref(),
            workspace_size_limit: size_limit.as_deref(),
            instance_shape: task.instance_shape,
        };
        let pod = pod_template::build_pod_spec(self.template.as_ref(), &inputs);
        let identity = self.identity(&task.task_id, &task.execution_id);
        let job = job_spec::task_job(
            &identity,
            &JobSettings {
                namespace: &settings.namespace,
                extra_labels: &settings.extra_labels,
                extra_annotations: &settings.extra_annotations,
                active_deadline_seconds: settings.active_deadline_seconds,
                ttl_seconds_after_finished: settings.ttl_seconds_after_finished,
            },
            pod,
        );
        Ok((identity, job))
    }

    async fn run(&self, task: TaskRun, cancel: CancellationToken) -> Result<(), TaskFailure> {
        let (identity, job) = self.task_job(&task)?;
        let name = identity.job_name();
        if cancel.is_cancelled() {
            return Err(cancelled(0));
        }
        tracing::info!(
            task_id = %task.task_id,
            execution_id = %task.execution_id,
            job = name,
            namespace = %self.config.settings.namespace,
            "creating task Job"
        );
        match self.jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(error) if api_code(&error) == Some(409) => {
                let existing = self.jobs.get(&name).await.map_err(|error| {
                    TaskFailure::new(
                        FailureReason::JobCreate,
                        format!(
                            "failed to get existing Kubernetes Job {name}: {}",
                            api_error_text(&error)
                        ),
                    )
                })?;
                if !identity.matches(&existing) {
                    return Err(TaskFailure::new(
                        FailureReason::JobCreate,
                        format!("kubernetes Job {name} already exists for another execution"),
                    ));
                }
                tracing::info!(
                    job = name,
                    "task Job already exists for this execution; adopting it"
                );
            }
            Err(error) => {
                return Err(TaskFailure::new(
                    FailureReason::JobCreate,
                    format!(
                        "failed to create Kubernetes Job {name}: {}",
                        api_error_text(&error)
                    ),
                ));
            }
        }
        self.follow_job(&identity, &cancel).await
    }

    /// Watches the Job to its end and applies the cleanup rules: delete on success (with
    /// cleanup on), keep on failure for the TTL, delete (foreground) on cancellation.
    async fn follow_job(
        &self,
        identity: &JobIdentity,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        let name = identity.job_name();
        let hash = identity.execution_hash();
        let followed = Followed {
            jobs: &self.jobs,
            pods: &self.pods,
            events: &self.events,
            namespace: &self.config.settings.namespace,
            name: &name,
            execution_hash: &hash,
            unschedulable_timeout: self.config.settings.unschedulable_timeout,
        };
        match followed.follow(cancel).await {
            Ending::Succeeded => {
                if self.config.cleanup {
                    self.delete(&name, DeleteParams::background()).await;
                }
                Ok(())
            }
            Ending::Failed(failure) => {
                tracing::info!(
                    job = name,
                    reason = failure.reason.as_str(),
                    "task Job failed; kept for its TTL"
                );
                Err(failure)
            }
            Ending::Cancelled => {
                let grace = u32::try_from(self.config.cancel_grace.as_secs()).unwrap_or(u32::MAX);
                let params = DeleteParams {
                    grace_period_seconds: Some(grace),
                    ..DeleteParams::foreground()
                };
                self.delete(&name, params).await;
                Err(cancelled(0))
            }
        }
    }

    async fn delete(&self, name: &str, params: DeleteParams) {
        match self.jobs.delete(name, &params).await {
            Ok(_) => tracing::debug!(job = name, "deleted task Job"),
            Err(error) if api_code(&error) == Some(404) => {}
            Err(error) => {
                tracing::warn!(job = name, error = %api_error_text(&error), "cannot delete task Job")
            }
        }
    }

    async fn resume(
        &self,
        task: RecoveredTask,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
        let identity = self.adopt(&task).await?;
        tracing::info!(task_id = %task.task_id, job = task.handle, "re-adopted task Job");
        self.follow_job(&identity, &cancel).await
    }
}

impl TaskBackend for KubernetesBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kubernetes
    }

    /// Creates the task Job (or adopts the same execution's existing one) and follows it
    /// to its end. When `cancel` fires the Job is deleted (foreground) and the task
    /// reported cancelled. Dropping the future leaves the Job running for re-adoption.
    fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        Box::pin(self.engine.run(task, cancel))
    }

    fn recover(&self) -> BoxFuture<'_, Vec<RecoveredTask>> {
        Box::pin(self.engine.find_jobs())
    }

    fn resume(
        &self,
        task: RecoveredTask,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        Box::pin(self.engine.resume(task, cancel))
    }

    /// Jobs keep running while the agent is down; the next run re-adopts them.
    fn preserves_tasks_on_shutdown(&self) -> bool {
        true
    }

    fn shutdown(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {
            tracing::info!("Preserving Kubernetes task Jobs during worker shutdown");
        })
    }
}
