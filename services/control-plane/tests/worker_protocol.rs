//! Runs going through real worker WebSocket connections driven by a fake worker.

mod support;

use std::time::Duration;

use ozfleet_control_plane::run_api::{ListRuns, RunRequest, RunState, StatusMessage};
use ozfleet_proto::oz::{FailureReason, WorkerMessage};
use serde_json::json;
use support::{API_KEY, ControlPlane, FakeWorker, assert_refused, blocking, text};
use tokio::time::Instant;

const REOFFER_DELAY: Duration = Duration::from_millis(300);
const QUIET: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_goes_from_queued_through_claimed_and_in_progress_to_succeeded() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let body = json!({
        "prompt": "fix the bug", "title": "Fix", "team": true,
        "config": {"worker_host": "w1", "model_id": "m1"}
    });
    let created = control_plane
        .post("/api/v1/agent/runs", Some(API_KEY), &body.to_string())
        .await;
    let run_id = text(&created.body["run_id"]);
    assert_eq!(created.body["at_capacity"], true);

    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let assignment = worker.expect_assignment().await;
    assert_eq!(assignment["task_id"], run_id.as_str());
    assert_eq!(assignment["task"]["id"], run_id.as_str());
    assert_eq!(assignment["task"]["title"], "Fix");
    assert_eq!(
        assignment["task"]["task_definition"],
        json!({"prompt": "fix the bug"})
    );
    assert_eq!(
        assignment["task"]["owner"],
        json!({"Type": "TEAM", "Id": 1})
    );
    assert_eq!(
        assignment["task"]["agent_config_snapshot"],
        json!({"worker_host": "w1", "model_id": "m1"})
    );
    let execution_id = text(&assignment["execution_id"]);
    let run_token = text(&assignment["env_vars"]["WARP_API_KEY"]);
    assert_ne!(run_token, API_KEY);

    // Now that w1 is connected, new runs for it are not at capacity.
    let second = control_plane.create_run("later", "w1").await;
    assert!(!second.at_capacity);
    let second_id = second.run_id;
    assert_eq!(
        text(&worker.expect_assignment().await["task_id"]),
        second_id
    );

    worker.send(WorkerMessage::claimed(&run_id, "w1")).await;
    let claimed = control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;
    assert_eq!(claimed.claimed_by.as_deref(), Some("w1"));
    assert_eq!(claimed.execution_id, Some(execution_id));
    assert!(claimed.started_at.is_some(), "{claimed:?}");

    // The run token opens exactly its own run, and its first use means the agent runs.
    let agent = control_plane.client_with_key(&run_token);
    let (own, other) = (run_id.clone(), second_id.clone());
    let refusals = blocking(&agent, move |agent| {
        [
            agent.list(&ListRuns::default()).map(drop),
            agent.get(&other).map(drop),
            agent.cancel(&own).map(drop),
            agent.submit(&RunRequest::new("p", "w1")).map(drop),
        ]
    })
    .await;
    for refusal in refusals {
        assert_refused(refusal, 403, "forbidden");
    }
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Claimed
    );

    let own = run_id.clone();
    let by_agent = blocking(&agent, move |agent| agent.get(&own))
        .await
        .unwrap();
    assert_eq!(by_agent.state, RunState::InProgress);
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::InProgress
    );

    worker.send(WorkerMessage::completed(&run_id)).await;
    let done = control_plane
        .wait_for_state(&run_id, RunState::Succeeded)
        .await;
    assert_eq!(done.status_message, None);
    assert_eq!(done.failure_reason, None);
    assert_eq!(done.claimed_by.as_deref(), Some("w1"));

    // A repeated report is ignored and the connection keeps working.
    worker
        .send(WorkerMessage::failed(
            &run_id,
            FailureReason::Unknown,
            "late".into(),
            1,
        ))
        .await;
    worker.send(WorkerMessage::claimed(&second_id, "w1")).await;
    control_plane
        .wait_for_state(&second_id, RunState::Claimed)
        .await;
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Succeeded
    );

    let cancel = control_plane.cancel(&run_id).await;
    assert_refused(cancel, 400, "run_already_finished");
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_recorded_with_its_reason_and_exit_code() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let with_exit = control_plane.create_run_id("one", "w1").await;
    assert_eq!(worker.claim_next("w1").await, with_exit);
    let without_exit = control_plane.create_run_id("two", "w1").await;
    assert_eq!(worker.claim_next("w1").await, without_exit);
    control_plane
        .wait_for_state(&without_exit, RunState::Claimed)
        .await;

    let message = "Failed to execute task: container exited with non-zero status: 137";
    worker
        .send(WorkerMessage::failed(
            &with_exit,
            FailureReason::ContainerExit,
            message.into(),
            137,
        ))
        .await;
    worker
        .send(WorkerMessage::failed(
            &without_exit,
            FailureReason::ImagePull,
            "no image".into(),
            0,
        ))
        .await;

    let failed = control_plane
        .wait_for_state(&with_exit, RunState::Failed)
        .await;
    assert_eq!(
        failed.status_message,
        Some(StatusMessage {
            message: message.into(),
            error_code: Some("container_exit".into())
        })
    );
    assert_eq!(failed.failure_reason.as_deref(), Some("container_exit"));
    assert_eq!(failed.exit_code, Some(137));

    let failed = control_plane
        .wait_for_state(&without_exit, RunState::Failed)
        .await;
    assert_eq!(failed.failure_reason.as_deref(), Some("image_pull"));
    assert_eq!(failed.exit_code, None);
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_run_stays_queued_and_is_offered_again_after_the_delay() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    let first = worker.expect_assignment().await;
    let rejected_at = Instant::now();
    worker
        .send(WorkerMessage::rejected_at_capacity(&run_id))
        .await;

    let second = worker.expect_assignment().await;
    let waited = rejected_at.elapsed();
    assert!(
        waited >= REOFFER_DELAY,
        "offered again after only {waited:?}"
    );
    assert_eq!(second["task_id"], run_id.as_str());
    assert_ne!(
        second["execution_id"], first["execution_id"],
        "each offer is a new execution"
    );
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Queued
    );

    // Claiming with the first offer's connection still works: it is the same connection.
    worker.send(WorkerMessage::claimed(&run_id, "w1")).await;
    let claimed = control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;
    assert_eq!(claimed.execution_id, Some(text(&second["execution_id"])));
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_run_is_offered_again_as_soon_as_its_worker_finishes_a_run() {
    let long_delay = Duration::from_secs(60);
    let control_plane = ControlPlane::start(long_delay).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let running = control_plane.create_run_id("running", "w1").await;
    assert_eq!(worker.claim_next("w1").await, running);
    let waiting = control_plane.create_run_id("waiting", "w1").await;
    assert_eq!(text(&worker.expect_assignment().await["task_id"]), waiting);
    worker
        .send(WorkerMessage::rejected_at_capacity(&waiting))
        .await;
    worker.expect_silence(QUIET).await;

    worker.send(WorkerMessage::completed(&running)).await;
    assert_eq!(text(&worker.expect_assignment().await["task_id"]), waiting);
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_go_only_to_their_worker_and_spread_across_its_connections() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut other = FakeWorker::connect(&control_plane, "other").await;
    let mut first = FakeWorker::connect(&control_plane, "w1").await;
    let warm_up = control_plane.create_run_id("warm up", "w1").await;
    assert_eq!(first.claim_next("w1").await, warm_up);
    let mut second = FakeWorker::connect(&control_plane, "w1").await;
    // The second connection is registered once a run for it reaches it; the first holds
    // no offer now, so offers alternate from here.
    let mut offered_to = Vec::new();
    for index in 0..4 {
        let run_id = control_plane
            .create_run_id(&format!("run {index}"), "w1")
            .await;
        tokio::select! {
            data = first.expect_assignment() => offered_to.push(("first", text(&data["task_id"]), run_id)),
            data = second.expect_assignment() => offered_to.push(("second", text(&data["task_id"]), run_id)),
        }
    }
    for (_, offered, created) in &offered_to {
        assert_eq!(offered, created);
    }
    let to_second = offered_to
        .iter()
        .filter(|(connection, ..)| *connection == "second")
        .count();
    assert!(
        (1..4).contains(&to_second),
        "offers spread across connections: {offered_to:?}"
    );
    other.expect_silence(QUIET).await;
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclaimed_offer_returns_to_the_queue_when_its_connection_drops() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut dropping = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    let first = dropping.expect_assignment().await;
    let mut staying = FakeWorker::connect(&control_plane, "w1").await;
    dropping.close().await;

    let second = staying.expect_assignment().await;
    assert_eq!(second["task_id"], run_id.as_str());
    assert_ne!(second["execution_id"], first["execution_id"]);
    staying.send(WorkerMessage::claimed(&run_id, "w1")).await;
    let claimed = control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;
    assert_eq!(claimed.execution_id, Some(text(&second["execution_id"])));
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_from_a_connection_the_run_was_not_offered_to_is_ignored() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut offered = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    offered.expect_assignment().await;
    let mut intruder = FakeWorker::connect(&control_plane, "w1").await;
    intruder.send(WorkerMessage::claimed(&run_id, "w1")).await;
    intruder.send(WorkerMessage::completed(&run_id)).await;
    intruder.expect_silence(QUIET).await;
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Queued
    );

    offered.send(WorkerMessage::claimed(&run_id, "w1")).await;
    control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_claimed_run_asks_its_worker_and_waits_for_the_report() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    worker.claim_next("w1").await;
    control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;

    let reply = control_plane.cancel(&run_id).await.unwrap();
    assert_eq!(reply.run_id, run_id);
    worker.expect_cancellation_of(&run_id).await;
    let pending = control_plane.run_item(&run_id).await;
    assert_eq!(
        pending.state,
        RunState::Claimed,
        "the worker has not answered yet"
    );
    assert!(pending.cancel_requested);

    worker.send(WorkerMessage::cancelled(&run_id)).await;
    let cancelled = control_plane
        .wait_for_state(&run_id, RunState::Cancelled)
        .await;
    assert_eq!(cancelled.status_message, None);
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_waits_for_a_disconnected_worker_to_come_back() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    worker.claim_next("w1").await;
    control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;
    worker.close().await;

    control_plane.cancel(&run_id).await.unwrap();
    let mut bystander = FakeWorker::connect(&control_plane, "other").await;
    let mut reconnected = FakeWorker::connect(&control_plane, "w1").await;
    reconnected.expect_cancellation_of(&run_id).await;
    bystander.expect_silence(QUIET).await;
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Claimed
    );

    reconnected.send(WorkerMessage::cancelled(&run_id)).await;
    control_plane
        .wait_for_state(&run_id, RunState::Cancelled)
        .await;
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_claim_of_a_cancelled_run_is_answered_with_a_cancellation() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    worker.expect_assignment().await;
    control_plane.cancel(&run_id).await.unwrap();
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Cancelled
    );

    worker.send(WorkerMessage::claimed(&run_id, "w1")).await;
    worker.expect_cancellation_of(&run_id).await;
    worker.send(WorkerMessage::cancelled(&run_id)).await;
    worker.expect_silence(QUIET).await;
    let run = control_plane.run_item(&run_id).await;
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.claimed_by, None);
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_ignored_and_the_connection_keeps_working() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    worker.expect_assignment().await;

    for frame in [
        "not json",
        "[]",
        r#"{"type":"heartbeat"}"#,
        r#"{"type":"bogus","data":{}}"#,
        r#"{"type":"task_claimed"}"#,
        r#"{"type":"task_claimed","data":{"task_id":5}}"#,
        r#"{"type":"task_failed","data":{"task_id":"x","exit_code":"nine"}}"#,
    ] {
        worker.send_text(frame).await;
    }
    worker.send_binary(b"\x00\x01").await;
    worker
        .send(WorkerMessage::claimed("no-such-run", "w1"))
        .await;
    worker.send(WorkerMessage::completed("no-such-run")).await;
    worker
        .send(WorkerMessage::rejected_at_capacity("no-such-run"))
        .await;

    worker.send(WorkerMessage::claimed(&run_id, "w1")).await;
    control_plane
        .wait_for_state(&run_id, RunState::Claimed)
        .await;
    worker.send(WorkerMessage::completed(&run_id)).await;
    control_plane
        .wait_for_state(&run_id, RunState::Succeeded)
        .await;
    control_plane.stop().await;
}
