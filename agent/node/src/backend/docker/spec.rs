//! What a task container is made of (spec §4.2 step 4): command, environment, binds,
//! labels, resources and network.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig};
use ozfleet_proto::oz::InstanceShape;
use secrecy::ExposeSecret as _;

use super::{DockerConfig, LABEL_EXECUTION_ID, LABEL_MANAGED, LABEL_NODE_ID, LABEL_TASK_ID};
use crate::backend::{TaskRun, merged_env};

/// The agent entrypoint inside the `/agent` sidecar; the base args follow it.
const ENTRYPOINT: &str = "/agent/entrypoint.sh";
const WORKING_DIR: &str = "/workspace";

/// The create request of `task`'s container with the prepared sidecar binds.
pub(super) fn container_body(
    config: &DockerConfig,
    task: &TaskRun,
    sidecar_binds: Vec<String>,
) -> ContainerCreateBody {
    // The one place the task's credentials leave their secret wrapper: the daemon needs
    // them as `NAME=value` text.
    let env = merged_env(&task.env, &config.environment)
        .into_iter()
        .map(|(name, value)| format!("{name}={}", value.expose_secret()))
        .collect();
    let cmd = std::iter::once(ENTRYPOINT.to_owned())
        .chain(task.base_args.iter().cloned())
        .collect();
    let binds = sidecar_binds
        .into_iter()
        .chain(config.settings.volumes.iter().cloned())
        .collect();
    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_NODE_ID.to_owned(), config.node_id.clone()),
        (LABEL_TASK_ID.to_owned(), task.task_id.clone()),
        (LABEL_EXECUTION_ID.to_owned(), task.execution_id.clone()),
    ]);
    let (nano_cpus, memory) = resources(task.instance_shape);
    ContainerCreateBody {
        image: Some(task.image.clone()),
        cmd: Some(cmd),
        working_dir: Some(WORKING_DIR.to_owned()),
        env: Some(env),
        labels: Some(labels),
        host_config: Some(HostConfig {
            binds: Some(binds),
            nano_cpus,
            memory,
            memory_swap: memory,
            network_mode: config.settings.network_mode.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// NanoCPUs and Memory (= MemorySwap, so no extra swap) of a shape; non-positive axes are
/// unset.
fn resources(shape: Option<InstanceShape>) -> (Option<i64>, Option<i64>) {
    let Some(shape) = shape else {
        return (None, None);
    };
    let nano_cpus = (shape.vcpus > 0).then(|| shape.vcpus.saturating_mul(1_000_000_000));
    let memory = (shape.memory_gb > 0).then(|| shape.memory_gb.saturating_mul(1 << 30));
    (nano_cpus, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_to_resources() {
        assert_eq!(resources(None), (None, None));
        assert_eq!(
            resources(Some(InstanceShape {
                vcpus: 2,
                memory_gb: 1
            })),
            (Some(2_000_000_000), Some(1 << 30))
        );
        assert_eq!(
            resources(Some(InstanceShape {
                vcpus: 0,
                memory_gb: -1
            })),
            (None, None)
        );
        assert_eq!(
            resources(Some(InstanceShape {
                vcpus: i64::MAX,
                memory_gb: 0
            })),
            (Some(i64::MAX), None)
        );
    }
}
