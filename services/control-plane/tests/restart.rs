//! Shutdown closes worker connections cleanly, and a restart on the same database keeps
//! every run.

mod support;

use std::time::Duration;

use ozfleet_control_plane::run_api::RunState;
use ozfleet_proto::oz::WorkerMessage;
use support::{ControlPlane, FakeWorker, blocking, text};

const REOFFER_DELAY: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_a_restart_and_unanswered_offers_are_made_again() {
    let directory = tempfile::tempdir().unwrap();
    let database = directory.path().join("runs.db");

    let control_plane = ControlPlane::start_on(&database, REOFFER_DELAY).await;
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let claimed = control_plane
        .create_run_id("claimed before the restart", "w1")
        .await;
    assert_eq!(worker.claim_next("w1").await, claimed);
    let claimed_before = control_plane
        .wait_for_state(&claimed, RunState::Claimed)
        .await;
    let offered = control_plane
        .create_run_id("offered before the restart", "w1")
        .await;
    let first_offer = worker.expect_assignment().await;
    assert_eq!(first_offer["task_id"], offered.as_str());
    let queued = control_plane
        .create_run_id("for a worker that never came", "w2")
        .await;

    control_plane.stop().await;
    assert_eq!(worker.close_code().await, Some(1000));

    let control_plane = ControlPlane::start_on(&database, REOFFER_DELAY).await;
    assert_eq!(control_plane.run_item(&claimed).await, claimed_before);
    assert_eq!(
        control_plane.run_item(&offered).await.state,
        RunState::Queued
    );
    assert_eq!(
        control_plane.run_item(&queued).await.state,
        RunState::Queued
    );

    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    let second_offer = worker.expect_assignment().await;
    assert_eq!(second_offer["task_id"], offered.as_str());
    assert_ne!(second_offer["execution_id"], first_offer["execution_id"]);
    assert_eq!(
        second_offer["env_vars"]["WARP_API_KEY"], first_offer["env_vars"]["WARP_API_KEY"],
        "the run token is stored with the run"
    );

    // The run claimed before the restart can still be finished by its worker.
    worker.send(WorkerMessage::completed(&claimed)).await;
    control_plane
        .wait_for_state(&claimed, RunState::Succeeded)
        .await;
    let run_token = text(&second_offer["env_vars"]["WARP_API_KEY"]);
    let agent = control_plane.client_with_key(&run_token);
    let by_agent = blocking(&agent, move |agent| agent.get(&offered)).await;
    by_agent.expect("the run token still opens its run after the restart");
    control_plane.stop().await;
}
