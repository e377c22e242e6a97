//! The startup preflight Job (spec §5.1): proves RBAC, admission and (in image-volume
//! mode) image pulls before the node attaches to the gateway. Its failure is a startup
//! error naming the cause.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, Event, ImageVolumeSource, Pod, PodSpec, PodTemplateSpec, ResourceRequirements,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

use super::classify::{self, JobState, Where};
use super::client::api_error_text;
use super::job_spec::short_hash;

const POLL: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(15);
const IMAGE_VOLUME: &str = "preflight-image";

/// What the preflight needs.
pub struct Preflight<'a> {
    pub jobs: Api<Job>,
    pub pods: Api<Pod>,
    pub events: Api<Event>,
    pub namespace: &'a str,
    pub worker_id: &'a str,
    pub template: Option<&'a PodSpec>,
    pub image: &'a str,
    pub pull_policy: &'a str,
    pub resources: Option<ResourceRequirements>,
    pub use_image_volumes: bool,
}

/// `preflight_resources`, else 10m/16Mi requests and 100m/64Mi limits.
pub fn default_resources() -> ResourceRequirements {
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])
    };
    ResourceRequirements {
        requests: Some(quantities("10m", "16Mi")),
        limits: Some(quantities("100m", "64Mi")),
        ..Default::default()
    }
}

impl Preflight<'_> {
    /// The preflight pod: the template's settings (service account, pull secrets, node
    /// selectors…) with the preflight containers.
    pub fn pod_spec(&self) -> PodSpec {
        let mut spec = self.template.cloned().unwrap_or_default();
        spec.restart_policy = Some("Never".to_owned());
        let resources = self.resources.clone().unwrap_or_else(default_resources);
        let shell = |name: &str, script: &str| Container {
            name: name.to_owned(),
            image: Some(self.image.to_owned()),
            image_pull_policy: Some(self.pull_policy.to_owned()),
            command: Some(vec!["/bin/sh".into(), "-c".into(), script.to_owned()]),
            resources: Some(resources.clone()),
            ..Default::default()
        };
        if self.use_image_volumes {
            spec.init_containers = None;
            spec.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: IMAGE_VOLUME.to_owned(),
                image: Some(ImageVolumeSource {
                    reference: Some(self.image.to_owned()),
                    pull_policy: Some(self.pull_policy.to_owned()),
                }),
                ..Default::default()
            });
            let mut main = shell("main", "test -d /preflight-image");
            main.volume_mounts = Some(vec![VolumeMount {
                name: IMAGE_VOLUME.to_owned(),
                mount_path: "/preflight-image".to_owned(),
                read_only: Some(true),
                ..Default::default()
            }]);
            spec.containers = vec![main];
        } else {
            let mut root = shell("root-init-preflight", "true");
            root.security_context = Some(SecurityContext {
                run_as_user: Some(0),
                run_as_group: Some(0),
                ..Default::default()
            });
            spec.init_containers = Some(vec![root]);
            spec.containers = vec![shell("main", "true")];
        }
        spec
    }

    fn job(&self, name: &str) -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.to_owned()),
                ..Default::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(self.pod_spec()),
                },
                ..Default::default()
            }),
            status: None,
        }
    }

    /// Runs the preflight; the Job is deleted afterwards whatever happened.
    pub async fn run(&self) -> Result<(), String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let name = format!("oz-preflight-{}-{nanos}", short_hash(self.worker_id));
        let outcome = match self
            .jobs
            .create(&PostParams::default(), &self.job(&name))
            .await
        {
            Ok(job) => {
                let uid = job.metadata.uid.clone().unwrap_or_default();
                let outcome = tokio::time::timeout(TIMEOUT, self.wait(&name, &uid)).await;
                if let Err(error) = self.jobs.delete(&name, &DeleteParams::background()).await {
                    tracing::warn!(job = name, error = %api_error_text(&error), "cannot delete the preflight Job");
                }
                match outcome {
                    Ok(result) => result,
                    Err(_) if self.use_image_volumes => Err(format!(
                        "timed out waiting for startup preflight Job {name:?} to complete or surface a failure"
                    )),
                    Err(_) => Err(format!(
                        "timed out waiting for startup preflight Job {name:?} to create a Pod or surface a controller failure"
                    )),
                }
            }
            Err(error) => Err(format!(
                "failed to create preflight Job {name:?}: {}",
                api_error_text(&error)
            )),
        };
        outcome.map_err(|error| self.wrap(&error))
    }

    fn wrap(&self, error: &str) -> String {
        let namespace = self.namespace;
        if self.use_image_volumes {
            format!(
                "kubernetes startup preflight failed: the kubernetes backend requires creating task Jobs with image volumes for sidecar materialization; verify the cluster supports image volumes (Kubernetes >= 1.31 with the ImageVolume feature) and service account/RBAC and Pod Security or admission policy for namespace {namespace:?}: {error}"
            )
        } else {
            format!(
                "kubernetes startup preflight failed: the kubernetes backend requires creating task Jobs with a root init container for sidecar materialization; verify service account/RBAC and Pod Security or admission policy for namespace {namespace:?}: {error}"
            )
        }
    }

    async fn wait(&self, name: &str, uid: &str) -> Result<(), String> {
        let pods_of_job = ListParams::default().labels(&format!("job-name={name}"));
        let events_of_job = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
        let at = Where {
            namespace: self.namespace,
            job: name,
        };
        loop {
            let events =
                self.events.list(&events_of_job).await.map_err(|error| {
                    format!("failed to list events: {}", api_error_text(&error))
                })?;
            if let Some(event) = events.items.iter().find(|event| {
                event.type_.as_deref() == Some("Warning")
                    && event.reason.as_deref() == Some("FailedCreate")
            }) {
                return Err(format!(
                    "preflight Job {name:?} could not create a Pod: {}",
                    event.message.as_deref().unwrap_or_default()
                ));
            }
            let pods = self
                .pods
                .list(&pods_of_job)
                .await
                .map_err(|error| format!("failed to list pods: {}", api_error_text(&error)))?;
            if !self.use_image_volumes {
                if !pods.items.is_empty() {
                    return Ok(());
                }
            } else {
                let job = self.jobs.get(name).await.map_err(|error| {
                    format!("failed to get preflight Job: {}", api_error_text(&error))
                })?;
                match classify::job_state(&job) {
                    JobState::Complete => return Ok(()),
                    JobState::Failed { reason, message } => {
                        return Err(format!(
                            "preflight Job {name:?} failed. Job reason: {reason}. Job message: {message}"
                        ));
                    }
                    JobState::Running => {}
                }
                for pod in &pods.items {
                    if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded") {
                        return Ok(());
                    }
                    if let Some(failure) =
                        classify::inspect_pod(pod, at, Duration::ZERO, Duration::ZERO)
                    {
                        return Err(failure.error);
                    }
                    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                    let params = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
                    let events = self
                        .events
                        .list(&params)
                        .await
                        .map(|l| l.items)
                        .unwrap_or_default();
                    if let Some(failure) = classify::inspect_pod_events(pod, &events, at) {
                        return Err(failure.error);
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preflight(
        client: kube::Client,
        use_image_volumes: bool,
        template: Option<&PodSpec>,
    ) -> Preflight<'_> {
        Preflight {
            jobs: Api::namespaced(client.clone(), "ns"),
            pods: Api::namespaced(client.clone(), "ns"),
            events: Api::namespaced(client, "ns"),
            namespace: "ns",
            worker_id: "w",
            template,
            image: "busybox:1.36",
            pull_policy: "IfNotPresent",
            resources: None,
            use_image_volumes,
        }
    }

    fn offline_client() -> kube::Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    #[tokio::test]
    async fn legacy_preflight_is_a_root_init_container_and_main() {
        let template: PodSpec = serde_json::from_value(serde_json::json!({
            "serviceAccountName": "runner", "imagePullSecrets": [{"name": "regcred"}],
            "initContainers": [{"name": "x"}], "containers": [{"name": "y"}]
        }))
        .unwrap();
        let spec = preflight(offline_client(), false, Some(&template)).pod_spec();
        assert_eq!(spec.service_account_name.as_deref(), Some("runner"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].name, "root-init-preflight");
        assert_eq!(
            init[0].security_context.as_ref().unwrap().run_as_user,
            Some(0)
        );
        assert_eq!(init[0].resources, Some(default_resources()));
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(spec.containers[0].name, "main");
        assert!(spec.volumes.is_none());
    }

    #[tokio::test]
    async fn image_volume_preflight_mounts_the_image() {
        let spec = preflight(offline_client(), true, None).pod_spec();
        assert!(spec.init_containers.is_none());
        let volumes = spec.volumes.as_ref().unwrap();
        assert_eq!(volumes.len(), 1);
        assert_eq!(
            volumes[0].image.as_ref().unwrap().reference.as_deref(),
            Some("busybox:1.36")
        );
        let main = &spec.containers[0];
        assert_eq!(
            main.command.as_ref().unwrap()[2],
            "test -d /preflight-image"
        );
        assert_eq!(
            main.volume_mounts.as_ref().unwrap()[0].read_only,
            Some(true)
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_with_the_wrapped_text() {
        let error = preflight(offline_client(), false, None)
            .run()
            .await
            .unwrap_err();
        assert!(error.starts_with("kubernetes startup preflight failed: the kubernetes backend requires creating task Jobs with a root init container"), "{error}");
        assert!(error.contains("namespace \"ns\""), "{error}");
    }
}
