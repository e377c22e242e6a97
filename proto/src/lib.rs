//! ozfleet's two wire protocols.
//!
//! - [`v1`]: the internal gRPC API between the gateway and node agents (generated from
//!   `proto/ozfleet/v1/*.proto`).
//! - [`oz`]: the JSON messages of Oz's self-hosted worker WebSocket, exactly as
//!   `oz-agent-worker` speaks them.

pub mod codec;
pub mod node_id;
pub mod oz;
pub mod reconnect;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("ozfleet.v1");

    /// Encoded descriptors of every ozfleet proto file, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ozfleet_descriptor.bin"));
}

impl std::fmt::Debug for v1::TaskAssignment {
    // The relayed Oz assignment holds `env_vars` (credentials), so only its size is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskAssignment")
            .field("task_id", &self.task_id)
            .field("execution_id", &self.execution_id)
            .field(
                "oz_assignment_json",
                &format_args!("<{} bytes, redacted>", self.oz_assignment_json.len()),
            )
            .field("settings", &self.settings)
            .field("trace_context", &self.trace_context)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn assignment_debug_never_shows_the_relayed_json() {
        let assignment = v1::TaskAssignment {
            task_id: "run-1".into(),
            execution_id: "exec-1".into(),
            oz_assignment_json: br#"{"env_vars":{"WARP_API_KEY":"sk-live-secret"}}"#.to_vec(),
            settings: None,
            trace_context: Default::default(),
        };
        let shown = format!("{assignment:?}");
        assert!(shown.contains("run-1"), "{shown}");
        assert!(!shown.contains("sk-live-secret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
