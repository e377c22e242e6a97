//! The run API over real HTTP: authentication, validation, listing, cancelling queued runs.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use ozfleet_control_plane::run_api::{
    ListRuns, RunCancelled, RunPage, RunRequest, RunState, SortField, SortOrder,
};
use serde_json::{Value, json};
use support::{API_KEY, ControlPlane, FakeWorker, assert_error, assert_refused, text};

const REOFFER_DELAY: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_requires_the_api_key() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    let body = json!({"prompt": "p", "config": {"worker_host": "w1"}}).to_string();
    for bearer in [
        None,
        Some("wrong-key"),
        Some(&format!("{run_id}.forged-secret")),
    ] {
        let replies = [
            control_plane.get("/api/v1/agent/runs", bearer).await,
            control_plane
                .get(&format!("/api/v1/agent/runs/{run_id}"), bearer)
                .await,
            control_plane
                .post("/api/v1/agent/runs", bearer, &body)
                .await,
            control_plane.post("/api/v1/agent/run", bearer, &body).await,
            control_plane
                .post(&format!("/api/v1/agent/runs/{run_id}/cancel"), bearer, "")
                .await,
            control_plane.get("/api/v1/no/such/route", bearer).await,
        ];
        for reply in replies {
            let message = assert_error(&reply, 401, "unauthenticated");
            assert!(message.contains("Authorization: Bearer"), "{message}");
        }
    }
    let rejected = FakeWorker::try_connect(&control_plane, "worker_id=w1", "wrong-key").await;
    match rejected {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401 handshake failure, got {:?}", other.err()),
    }
    assert_eq!(
        control_plane.run_item(&run_id).await.state,
        RunState::Queued
    );
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_socket_needs_a_worker_id() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    for query in ["", "worker_id=", "worker_id=%20"] {
        match FakeWorker::try_connect(&control_plane, query, API_KEY).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{query:?}")
            }
            other => panic!(
                "{query:?}: expected a 400 handshake failure, got {:?}",
                other.err()
            ),
        }
    }
    let reply = control_plane
        .get("/api/v1/selfhosted/worker/ws?worker_id=w1", Some(API_KEY))
        .await;
    let message = assert_error(&reply, 400, "bad_request");
    assert!(message.contains("WebSocket"), "{message}");
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_run_requests_are_refused_with_a_message_naming_the_problem() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let cases = [
        ("{not json", 400, "bad_request", "not valid JSON"),
        (
            r#"{"prompt": 7, "config": {"worker_host": "w1"}}"#,
            400,
            "bad_request",
            "`prompt`",
        ),
        (
            r#"{"prompt": "p", "config": []}"#,
            400,
            "bad_request",
            "`config`",
        ),
        (
            r#"{"config": {"worker_host": "w1"}}"#,
            422,
            "unprocessable_entity",
            "`prompt`",
        ),
        (
            r#"{"prompt": "p"}"#,
            422,
            "unprocessable_entity",
            "`config.worker_host`",
        ),
        (
            r#"{"prompt": "p", "config": {"worker_host": ""}}"#,
            422,
            "unprocessable_entity",
            "`config.worker_host`",
        ),
        (
            r#"{"prompt": "p", "config": {"worker_host": "warp"}}"#,
            422,
            "unprocessable_entity",
            "`config.worker_host`",
        ),
        // Copied into assignments as they are: a worker would drop what it cannot read.
        (
            r#"{"prompt": "p", "config": {"worker_host": "w1", "instance_shape": {"vcpus": "4"}}}"#,
            422,
            "unprocessable_entity",
            "`config.instance_shape.vcpus`",
        ),
        (
            r#"{"prompt": "p", "config": {"worker_host": "w1", "docker_image": {"name": "x"}}}"#,
            422,
            "unprocessable_entity",
            "`config.docker_image`",
        ),
        (
            r#"{"prompt": "p", "config": {"worker_host": "w1", "sidecar_image": ""}}"#,
            422,
            "unprocessable_entity",
            "`config.sidecar_image`",
        ),
    ];
    for (body, status, code, named) in cases {
        for path in ["/api/v1/agent/runs", "/api/v1/agent/run"] {
            let reply = control_plane.post(path, Some(API_KEY), body).await;
            let message = assert_error(&reply, status, code);
            assert!(message.contains(named), "{body}: {message}");
        }
    }
    let listed = control_plane.get("/api/v1/agent/runs", Some(API_KEY)).await;
    assert_eq!(listed.body["runs"], json!([]), "nothing was queued");
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_run_is_queued_with_its_config_kept_whole() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let config =
        json!({"worker_host": "w1", "name": "nightly", "model_id": "m", "custom": {"a": [1, 2]}});
    let body = json!({"prompt": "fix it", "title": "Fix", "config": config, "unknown_field": true});
    let reply = control_plane
        .post("/api/v1/agent/run", Some(API_KEY), &body.to_string())
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let run_id = text(&reply.body["run_id"]);
    assert_eq!(reply.body["task_id"], run_id.as_str());
    assert_eq!(reply.body["state"], "QUEUED");
    assert_eq!(reply.body["at_capacity"], true, "no worker w1 is connected");
    let uuid = uuid::Uuid::parse_str(&run_id).expect("run ids are UUIDs");
    assert_eq!(uuid.get_version_num(), 7);

    // The wire shape itself, field by field, as Oz clients read it.
    let run = control_plane
        .get(&format!("/api/v1/agent/runs/{run_id}"), Some(API_KEY))
        .await
        .body;
    assert_eq!(run["run_id"], run_id.as_str());
    assert_eq!(run["task_id"], run_id.as_str());
    assert_eq!(run["title"], "Fix");
    assert_eq!(run["prompt"], "fix it");
    assert_eq!(run["state"], "QUEUED");
    assert_eq!(run["agent_config"], config);
    assert_eq!(run["execution_location"], "REMOTE");
    assert_eq!(run["source"], "API");
    assert_eq!(run["cancel_requested"], false);
    for unset in [
        "started_at",
        "status_message",
        "claimed_by",
        "execution_id",
        "failure_reason",
        "exit_code",
    ] {
        assert_eq!(run[unset], Value::Null, "{unset}");
    }
    let created_at = text(&run["created_at"]);
    assert!(created_at.ends_with('Z'), "{created_at}");
    time::OffsetDateTime::parse(&created_at, &time::format_description::well_known::Rfc3339)
        .expect("timestamps are RFC 3339");

    let missing = control_plane
        .get("/api/v1/agent/runs/no-such-run", Some(API_KEY))
        .await;
    assert_error(&missing, 404, "not_found");
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_run_is_immediate_and_final() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let run_id = control_plane.create_run_id("p", "w1").await;
    let reply = control_plane.cancel(&run_id).await.unwrap();
    assert_eq!(
        reply,
        RunCancelled {
            run_id: run_id.clone()
        }
    );
    let run = control_plane.run_item(&run_id).await;
    assert_eq!(run.state, RunState::Cancelled);

    let again = control_plane.cancel(&run_id).await;
    let message = assert_refused(again, 400, "run_already_finished");
    assert!(message.contains("CANCELLED"), "{message}");
    assert_refused(control_plane.cancel("no-such-run").await, 404, "not_found");

    // A worker connecting later is not offered the cancelled run.
    let mut worker = FakeWorker::connect(&control_plane, "w1").await;
    worker.expect_silence(Duration::from_millis(300)).await;
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_every_run_once_with_filters() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut created = Vec::new();
    for index in 0..5 {
        created.push(
            control_plane
                .create_run_id(&format!("run {index}"), "w1")
                .await,
        );
    }
    for run_id in &created[1..3] {
        control_plane.cancel(run_id).await.unwrap();
    }

    let ids = |page: &RunPage| -> Vec<String> {
        page.runs.iter().map(|run| run.run_id.clone()).collect()
    };
    let with_states = |states: &[RunState]| ListRuns {
        states: states.to_vec(),
        ..ListRuns::default()
    };

    // Oldest first by creation, two at a time.
    let mut seen = Vec::new();
    let mut query = ListRuns {
        limit: Some(2),
        sort_by: Some(SortField::CreatedAt),
        sort_order: Some(SortOrder::Asc),
        ..ListRuns::default()
    };
    let mut pages = 0;
    loop {
        let page = control_plane.list(query.clone()).await;
        pages += 1;
        seen.extend(ids(&page));
        if !page.page_info.has_next_page {
            assert_eq!(page.page_info.next_cursor, None);
            break;
        }
        query.cursor = page.page_info.next_cursor;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "no duplicates, no gaps, creation order");

    // The default sort is most recently updated first: the cancelled runs lead.
    let everything = control_plane.list(ListRuns::default()).await;
    let expected_default = vec![
        created[2].clone(),
        created[1].clone(),
        created[4].clone(),
        created[3].clone(),
        created[0].clone(),
    ];
    assert_eq!(ids(&everything), expected_default);

    // A run created while paging in descending order does not disturb the pages.
    let first = control_plane
        .list(ListRuns {
            limit: Some(2),
            ..ListRuns::default()
        })
        .await;
    let late = control_plane.create_run_id("late", "w1").await;
    let rest = control_plane
        .list(ListRuns {
            limit: Some(10),
            cursor: first.page_info.next_cursor.clone(),
            ..ListRuns::default()
        })
        .await;
    let mut paged = ids(&first);
    paged.extend(ids(&rest));
    assert_eq!(paged, expected_default);
    assert!(!paged.contains(&late));

    let cancelled: HashSet<String> = ids(&control_plane
        .list(with_states(&[RunState::Cancelled]))
        .await)
    .into_iter()
    .collect();
    assert_eq!(cancelled, created[1..3].iter().cloned().collect());
    // The client sends `state=QUEUED,CANCELLED`; Oz clients may repeat the key instead.
    let repeated = control_plane
        .get(
            "/api/v1/agent/runs?state=QUEUED&state=CANCELLED",
            Some(API_KEY),
        )
        .await;
    assert_eq!(repeated.body["runs"].as_array().map(Vec::len), Some(6));
    let both = ListRuns {
        limit: Some(500),
        ..with_states(&[RunState::Queued, RunState::Cancelled])
    };
    assert_eq!(ids(&control_plane.list(both).await).len(), 6);
    assert_eq!(
        ids(&control_plane.list(with_states(&[RunState::Failed])).await),
        Vec::<String>::new()
    );

    for bad in [
        "?limit=0",
        "?limit=501",
        "?state=DONE",
        "?cursor=xyz",
        "?sort_by=title",
    ] {
        let reply = control_plane
            .get(&format!("/api/v1/agent/runs{bad}"), Some(API_KEY))
            .await;
        assert_error(&reply, 400, "bad_request");
    }
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_config_name() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let mut named = None;
    for name in ["nightly", "weekly"] {
        let request = RunRequest::new("p", "w1").with_config("name", json!(name));
        let created = control_plane.submit(request).await;
        if name == "nightly" {
            named = Some(created.run_id);
        }
    }
    let page = control_plane
        .list(ListRuns {
            name: Some("nightly".into()),
            ..ListRuns::default()
        })
        .await;
    assert_eq!(page.runs.len(), 1, "{page:?}");
    assert_eq!(Some(&page.runs[0].run_id), named.as_ref());
    control_plane.stop().await;
}
