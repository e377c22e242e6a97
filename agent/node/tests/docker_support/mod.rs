//! Shared pieces of the Docker backend tests and benchmark: daemon access, fixtures that
//! clean up after themselves, task and config builders.
//!
//! Everything runs against the real Docker Engine started by `tests/docker/start-docker.sh`.

#![allow(dead_code)] // each test target uses a different subset

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{ContainerConfig, ContainerCreateBody, ContainerSummary, EventMessage};
use bollard::query_parameters::{
    CommitContainerOptions, CreateContainerOptions, EventsOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, RemoveImageOptions, RemoveVolumeOptions,
};
use futures::StreamExt as _;
use ozfleet_agent::backend::docker::{
    LABEL_EXECUTION_ID, LABEL_MANAGED, LABEL_NODE_ID, LABEL_SIDECAR_IMAGE,
};
use ozfleet_agent::backend::{DockerConfig, DockerSettings, TaskRun, secret_env};
use ozfleet_proto::oz::SidecarMount;
use ozfleet_worker_config::ImagePullPolicy;

pub const BUSYBOX: &str = "localhost:5999/busybox:1";
pub const SIDECAR: &str = "localhost:5999/oz-demo-sidecar:1";
const START_HINT: &str = "start it with `tests/docker/start-docker.sh` (as root)";

/// A connection to the daemon the backend uses (found the same way), after checking that
/// it answers and has the test images. Fails the test otherwise: these tests must not be
/// skipped silently.
pub async fn daemon() -> Docker {
    let docker = Docker::connect_with_defaults()
        .unwrap_or_else(|error| panic!("cannot create a Docker client ({error}); {START_HINT}"));
    match tokio::time::timeout(Duration::from_secs(5), docker.ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => panic!(
            "the Docker daemon at unix:///var/run/docker.sock (or $DOCKER_HOST) does not answer: {error}; {START_HINT}"
        ),
        Err(_) => panic!("the Docker daemon did not answer a ping within 5 s; {START_HINT}"),
    }
    let docker = docker
        .negotiate_version()
        .await
        .expect("negotiate the Docker API version");
    for image in [BUSYBOX, SIDECAR] {
        if docker.inspect_image(image).await.is_err() {
            panic!("test image {image} is missing; {START_HINT}");
        }
    }
    docker
}

/// A unique node id; its containers are removed when the fixture is dropped, even when
/// the test failed.
pub struct Node {
    pub docker: Docker,
    pub id: String,
}

impl Node {
    pub async fn new() -> Self {
        Self {
            docker: daemon().await,
            id: format!("test-node-{}", uuid::Uuid::new_v4()),
        }
    }

    /// A backend config for this node: cleanup on, pull policy IfNotPresent, 5 s grace,
    /// network mode `none`. (With `--bridge=none` the daemon's default network does not
    /// exist, and every removed container of that mode leaves a stale network sandbox that
    /// costs ~70 ms at the next dockerd start; `none` gives the same loopback-only
    /// container without that.)
    pub fn config(&self) -> DockerConfig {
        DockerConfig {
            node_id: self.id.clone(),
            settings: DockerSettings {
                volumes: Vec::new(),
                image_pull_policy: ImagePullPolicy::IfNotPresent,
                network_mode: Some("none".to_owned()),
            },
            environment: Vec::new(),
            cleanup: true,
            stop_grace: Duration::from_secs(5),
        }
    }

    /// This node's task containers, running or not.
    pub async fn containers(&self) -> Vec<ContainerSummary> {
        containers_labelled(&self.docker, &format!("{LABEL_NODE_ID}={}", self.id)).await
    }

    /// Waits until this node has a running container for `execution_id` and returns its id.
    pub async fn wait_running(&self, execution_id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running = self.containers().await.into_iter().find(|container| {
                container.state.map(|state| state.to_string()).as_deref() == Some("running")
                    && container
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(LABEL_EXECUTION_ID))
                        .map(String::as_str)
                        == Some(execution_id)
            });
            if let Some(container) = running {
                return container.id.expect("container id");
            }
            assert!(
                Instant::now() < deadline,
                "no running container for execution {execution_id} of node {}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let label = format!("{LABEL_NODE_ID}={}", self.id);
        // Drop cannot await; a scoped helper thread with its own runtime removes the
        // containers, and is joined before the drop returns.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cleanup runtime")
                    .block_on(remove_labelled(&docker, &label));
            });
        });
    }
}

/// A private copy of the demo sidecar image (same files, new id, so a sidecar volume of its
/// own). Dropping it removes the image and its volume.
pub struct SidecarCopy {
    docker: Docker,
    pub image: String,
    /// The volume the backend caches the copy in.
    pub volume: String,
}

impl SidecarCopy {
    pub async fn new() -> Self {
        let docker = daemon().await;
        let tag = uuid::Uuid::new_v4().to_string();
        let repository = "localhost:5999/oz-demo-sidecar-copy";
        let helper = docker
            .create_container(
                None::<CreateContainerOptions>,
                ContainerCreateBody {
                    image: Some(SIDECAR.into()),
                    cmd: Some(vec!["true".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("create a container to commit")
            .id;
        let committed = docker
            .commit_container(
                CommitContainerOptions {
                    container: Some(helper.clone()),
                    repo: Some(repository.into()),
                    tag: Some(tag.clone()),
                    changes: Some(format!("LABEL dev.ozfleet.test-copy={tag}")),
                    ..Default::default()
                },
                ContainerConfig::default(),
            )
            .await
            .expect("commit a copy of the sidecar image")
            .id;
        docker
            .remove_container(&helper, None::<RemoveContainerOptions>)
            .await
            .expect("remove the committed container");
        // The backend's naming: repository, sanitised, then 12 hex chars of the image id
        // (an imported image has no registry digest).
        let volume = format!(
            "localhost-5999-oz-demo-sidecar-copy-{}",
            &committed.trim_start_matches("sha256:")[..12]
        );
        Self {
            docker,
            image: format!("{repository}:{tag}"),
            volume,
        }
    }
}

impl Drop for SidecarCopy {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let image = self.image.clone();
        let volume = self.volume.clone();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cleanup runtime")
                    .block_on(async {
                        let helpers = format!("{LABEL_SIDECAR_IMAGE}={image}");
                        remove_labelled(&docker, &helpers).await;
                        let _ = docker
                            .remove_volume(&volume, None::<RemoveVolumeOptions>)
                            .await;
                        let _ = docker
                            .remove_image(&image, None::<RemoveImageOptions>, None)
                            .await;
                    });
            });
        });
    }
}

pub async fn containers_labelled(docker: &Docker, label: &str) -> Vec<ContainerSummary> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_MANAGED}=true"), label.to_owned()],
    )]);
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .expect("list containers")
}

pub async fn remove_labelled(docker: &Docker, label: &str) {
    for container in containers_labelled(docker, label).await {
        let Some(id) = container.id else { continue };
        let _ = docker
            .remove_container(
                &id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }
}

/// A task of the demo agent with `prompt` (via `OZ_DEMO_PROMPT`, so no server is needed):
/// busybox image, the demo sidecar read-only at `/agent`.
pub fn task(prompt: &str) -> TaskRun {
    let task_id = format!("task-{}", uuid::Uuid::new_v4());
    TaskRun {
        base_args: vec![
            "agent".into(),
            "run".into(),
            "--task-id".into(),
            task_id.clone(),
            "--sandboxed".into(),
            "--server-root-url".into(),
            String::new(),
        ],
        env: secret_env([
            ("TASK_ID", task_id.as_str()),
            ("GIT_TERMINAL_PROMPT", "0"),
            ("OZ_DEMO_PROMPT", prompt),
        ]),
        task_id,
        execution_id: "exec-1".into(),
        harness: None,
        image: BUSYBOX.into(),
        sidecars: vec![SidecarMount {
            image: SIDECAR.into(),
            mount_path: "/agent".into(),
            read_write: false,
        }],
        instance_shape: None,
    }
}

/// stdout and stderr of a container.
pub async fn logs(docker: &Docker, id: &str) -> String {
    let mut stream = docker.logs(
        id,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&chunk.expect("read logs").to_string());
    }
    text
}

/// Now, as the daemon's event filters take it (Unix seconds with nanoseconds).
pub fn event_time() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// Events from `since` until now matching `filters`.
pub async fn events_since(
    docker: &Docker,
    since: &str,
    filters: &[(&str, &str)],
) -> Vec<EventMessage> {
    let mut grouped: HashMap<String, Vec<String>> = HashMap::new();
    for (key, value) in filters {
        grouped
            .entry((*key).to_owned())
            .or_default()
            .push((*value).to_owned());
    }
    let options = EventsOptions {
        since: Some(since.to_owned()),
        until: Some(event_time()),
        filters: Some(grouped),
    };
    docker
        .events(Some(options))
        .map(|event| event.expect("read events"))
        .collect()
        .await
}
