//! The run API over real HTTP: authentication, validation, listing, cancelling queued runs.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{API_KEY, ControlPlane, FakeWorker, assert_error, text};

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
    assert_eq!(control_plane.run_item(&run_id).await["state"], "QUEUED");
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

    let run = control_plane.run_item(&run_id).await;
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
    let reply = control_plane.cancel(&run_id).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, json!({"run_id": run_id}));
    let run = control_plane.run_item(&run_id).await;
    assert_eq!(run["state"], "CANCELLED");

    let again = control_plane.cancel(&run_id).await;
    let message = assert_error(&again, 400, "run_already_finished");
    assert!(message.contains("CANCELLED"), "{message}");
    assert_error(&control_plane.cancel("no-such-run").await, 404, "not_found");

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
        assert_eq!(control_plane.cancel(run_id).await.status, 200);
    }

    let list = |query: String| {
        let control_plane = &control_plane;
        async move {
            let reply = control_plane
                .get(&format!("/api/v1/agent/runs{query}"), Some(API_KEY))
                .await;
            assert_eq!(reply.status, 200, "{query}: {reply:?}");
            reply.body
        }
    };
    let ids = |page: &Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|run| text(&run["run_id"]))
            .collect()
    };

    // Oldest first by creation, two at a time.
    let mut seen = Vec::new();
    let mut query = "?limit=2&sort_by=created_at&sort_order=asc".to_string();
    let mut pages = 0;
    loop {
        let page = list(query.clone()).await;
        pages += 1;
        seen.extend(ids(&page));
        if page["page_info"]["has_next_page"] == false {
            assert_eq!(page["page_info"]["next_cursor"], Value::Null);
            break;
        }
        let cursor = text(&page["page_info"]["next_cursor"]);
        query = format!("?limit=2&sort_by=created_at&sort_order=asc&cursor={cursor}");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "no duplicates, no gaps, creation order");

    // The default sort is most recently updated first: the cancelled runs lead.
    let everything = list(String::new()).await;
    let expected_default = vec![
        created[2].clone(),
        created[1].clone(),
        created[4].clone(),
        created[3].clone(),
        created[0].clone(),
    ];
    assert_eq!(ids(&everything), expected_default);

    // A run created while paging in descending order does not disturb the pages.
    let first = list("?limit=2".into()).await;
    let late = control_plane.create_run_id("late", "w1").await;
    let cursor = text(&first["page_info"]["next_cursor"]);
    let rest = list(format!("?limit=10&cursor={cursor}")).await;
    let mut paged = ids(&first);
    paged.extend(ids(&rest));
    assert_eq!(paged, expected_default);
    assert!(!paged.contains(&late));

    let cancelled: HashSet<String> = ids(&list("?state=CANCELLED".into()).await)
        .into_iter()
        .collect();
    assert_eq!(cancelled, created[1..3].iter().cloned().collect());
    assert_eq!(
        ids(&list("?state=QUEUED&state=CANCELLED".into()).await).len(),
        6
    );
    assert_eq!(
        ids(&list("?state=QUEUED,CANCELLED&limit=500".into()).await).len(),
        6
    );
    assert_eq!(
        ids(&list("?state=FAILED".into()).await),
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
        let body = json!({"prompt": "p", "config": {"worker_host": "w1", "name": name}});
        let reply = control_plane
            .post("/api/v1/agent/runs", Some(API_KEY), &body.to_string())
            .await;
        if name == "nightly" {
            named = Some(text(&reply.body["run_id"]));
        }
    }
    let reply = control_plane
        .get("/api/v1/agent/runs?name=nightly", Some(API_KEY))
        .await;
    let runs = reply.body["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{reply:?}");
    assert_eq!(runs[0]["run_id"], named.unwrap().as_str());
    control_plane.stop().await;
}
