//! What a task runs in: its image (spec §3.3) and its sidecars (spec §3.4).

use std::collections::HashSet;

use ozfleet_proto::oz::{SidecarMount, TaskAssignment};
use tracing::warn;

/// Used when Oz names no image.
pub const FALLBACK_IMAGE: &str = "ubuntu:22.04";
/// Where the warp-agent sidecar (holding `entrypoint.sh`) is mounted.
pub const AGENT_SIDECAR_MOUNT: &str = "/agent";

/// The assignment's `docker_image`, else [`FALLBACK_IMAGE`].
pub fn task_image(assignment: &TaskAssignment) -> String {
    if !assignment.docker_image.is_empty() {
        return assignment.docker_image.clone();
    }
    let environment_id = assignment
        .task
        .agent_config_snapshot
        .as_ref()
        .map_or("", |config| config.environment_id.as_str());
    if !environment_id.is_empty() {
        warn!(
            task_id = assignment.task_id,
            environment_id, "Oz sent no image for the task's environment; using {FALLBACK_IMAGE}"
        );
    }
    FALLBACK_IMAGE.to_owned()
}

/// The checks every backend makes of a task's sidecars, with the reference's texts; each
/// backend calls them in its own order among its own checks.
#[derive(Default)]
pub struct SidecarChecks<'a> {
    mount_paths: HashSet<&'a str>,
}

impl<'a> SidecarChecks<'a> {
    /// An image and a mount path are required.
    pub fn required_fields(sidecar: &SidecarMount) -> Result<(), String> {
        if sidecar.image.trim().is_empty() {
            return Err("additional sidecar has empty image".to_owned());
        }
        if sidecar.mount_path.trim().is_empty() {
            return Err(format!(
                "additional sidecar {} has empty mount path",
                sidecar.image
            ));
        }
        Ok(())
    }

    /// No two sidecars share a mount path.
    pub fn unique_mount_path(&mut self, sidecar: &'a SidecarMount) -> Result<(), String> {
        if !self.mount_paths.insert(sidecar.mount_path.as_str()) {
            return Err(format!(
                "duplicate mount path {} for additional sidecar {}",
                sidecar.mount_path, sidecar.image
            ));
        }
        Ok(())
    }
}

/// `sidecar_image` at `/agent` (read-only) when Oz sends one, then `additional_sidecars`.
pub fn sidecars(assignment: &TaskAssignment) -> Vec<SidecarMount> {
    let agent = (!assignment.sidecar_image.is_empty()).then(|| SidecarMount {
        image: assignment.sidecar_image.clone(),
        mount_path: AGENT_SIDECAR_MOUNT.to_owned(),
        read_write: false,
    });
    agent
        .into_iter()
        .chain(assignment.additional_sidecars.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ozfleet_proto::oz::AgentConfig;

    #[test]
    fn server_image_wins_else_the_fallback() {
        let mut assignment = TaskAssignment {
            docker_image: "my/img:1".into(),
            ..Default::default()
        };
        assert_eq!(task_image(&assignment), "my/img:1");
        assignment.docker_image.clear();
        assert_eq!(task_image(&assignment), FALLBACK_IMAGE);
        assignment.task.agent_config_snapshot = Some(AgentConfig {
            environment_id: "env-1".into(),
            ..Default::default()
        });
        assert_eq!(task_image(&assignment), FALLBACK_IMAGE);
    }

    #[test]
    fn agent_sidecar_comes_first_and_only_when_sent() {
        let extra = SidecarMount {
            image: "claude-cli:1".into(),
            mount_path: "/mnt/claude-cli-sidecar".into(),
            read_write: true,
        };
        let mut assignment = TaskAssignment {
            additional_sidecars: vec![extra.clone()],
            ..Default::default()
        };
        assert_eq!(sidecars(&assignment), vec![extra.clone()]);
        assignment.sidecar_image = "warp-agent:1".into();
        assert_eq!(
            sidecars(&assignment),
            vec![
                SidecarMount {
                    image: "warp-agent:1".into(),
                    mount_path: "/agent".into(),
                    read_write: false
                },
                extra
            ]
        );
    }
}
