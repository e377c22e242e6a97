//! mTLS on the node link, end to end: real control plane, gateway and node agent
//! processes on loopback, with certificates made by `ozfleet certs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{JOIN_TOKEN, Proc, Stack, accepted_task_ids, certs_command, wait_until};
use ozfleet_proto::v1::node_service_client::NodeServiceClient;
use ozfleet_proto::v1::{AttachRequest, NodeHello, attach_request};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_TIMEOUT: Duration = Duration::from_secs(20);

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A node agent's TLS flags: the gateway's CA, and the certificate `ozfleet certs node`
/// made for `node_id` in `certs`.
fn node_tls_args(ca: &Path, certs: &Path, node_id: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        path(ca).into(),
        "--tls-cert".into(),
        path(&certs.join(format!("node-{node_id}.pem"))).into(),
        "--tls-key".into(),
        path(&certs.join(format!("node-{node_id}-key.pem"))).into(),
    ]
}

/// What one attach attempt of a hand-made gRPC client got.
#[derive(Debug)]
enum Attempt {
    /// The TLS handshake or the connection failed.
    ConnectionFailed(#[expect(dead_code, reason = "shown by assertion messages")] String),
    /// The gateway answered the attach with this error.
    Refused(tonic::Status),
    Attached,
}

/// Attaches to the gateway on `port` as `node_id`, presenting `identity` (cert, key),
/// verifying the gateway against `ca` under `server_name`.
fn attach(
    port: u16,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    server_name: &str,
    node_id: &str,
) -> Attempt {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
            .domain_name(server_name);
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ));
        }
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .tls_config(tls)
            .unwrap();
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(error) => return Attempt::ConnectionFailed(format!("{error:?}")),
        };
        let hello = AttachRequest {
            kind: Some(attach_request::Kind::Hello(NodeHello {
                node_id: node_id.into(),
                instance_id: "test-instance".into(),
                max_concurrent_tasks: 1,
                ..Default::default()
            })),
        };
        // The stream stays open (pending) after the hello, like a node's.
        let outbound = futures::stream::iter([hello]).chain(futures::stream::pending());
        let mut request = tonic::Request::new(outbound);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {JOIN_TOKEN}").parse().unwrap(),
        );
        match NodeServiceClient::new(channel).attach(request).await {
            Ok(_) => Attempt::Attached,
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                Attempt::Refused(status)
            }
            Err(status) => Attempt::ConnectionFailed(format!("{status:?}")),
        }
    })
}

use futures::StreamExt as _;

/// The base64 lines of every private key in `dir` (and below), to look for in logs.
fn key_material(dirs: &[PathBuf]) -> Vec<String> {
    let mut lines = Vec::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir).unwrap() {
            let file = entry.unwrap().path();
            if file.to_string_lossy().ends_with("-key.pem") {
                let pem = std::fs::read_to_string(&file).unwrap();
                lines.extend(
                    pem.lines()
                        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
                        .map(str::to_owned),
                );
            }
        }
    }
    assert!(!lines.is_empty());
    lines
}

fn assert_no_secrets(logs: &[&Proc], secrets: &[String]) {
    for proc in logs {
        let log = proc.log();
        for secret in secrets {
            assert!(
                !log.contains(secret.as_str()),
                "a secret appears in the log of {}",
                proc.name
            );
        }
    }
}

fn attached(stack: &Stack) -> usize {
    stack.gateway.log().matches("Node attached").count()
}

/// Test 5 of the fault-injection list: a node with no certificate, with a certificate
/// from another CA, with a certificate for another node id, or with the wrong join token
/// is refused and never gets (or settles) a task; the node with the right certificate
/// and token attaches and runs the task end to end.
#[test]
fn only_a_node_with_its_own_certificate_from_the_fleet_ca_gets_tasks() {
    let stack = Stack::start_tls("gateway.test", &["node-good", "node-other"]);
    let certs = stack.certs_dir();
    let ca = certs.join("ca.pem");
    let gateway_url = format!("https://127.0.0.1:{}", stack.gateway_port);
    let token = [("OZFLEET_JOIN_TOKEN", JOIN_TOKEN)];
    // Another CA, with a certificate for the good node's id.
    let rogue_certs = stack.dir.path().join("rogue-certs");
    certs_command(&["ca", "--dir", path(&rogue_certs), "--name", "rogue CA"]);
    certs_command(&[
        "node",
        "--dir",
        path(&rogue_certs),
        "--node-id",
        "node-good",
    ]);
    let handshake_failures = || stack.gateway.log().matches("TLS handshake failed").count();

    // No client certificate.
    let no_cert = stack.tls_agent("no-cert", &gateway_url, &["--tls-ca", path(&ca)], &token);
    wait_until(
        LOG_TIMEOUT,
        "the gateway to refuse a node without a certificate",
        || handshake_failures() >= 1,
    );

    // A certificate from another CA.
    let failures = handshake_failures();
    let other_ca = stack.tls_agent(
        "other-ca",
        &gateway_url,
        &node_tls_args(&ca, &rogue_certs, "node-good")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &token,
    );
    wait_until(
        LOG_TIMEOUT,
        "the gateway to refuse a certificate of another CA",
        || handshake_failures() > failures,
    );

    // A certificate for another node id: the agent itself stops at start-up...
    let impostor_state = stack.dir.path().join("impostor-state");
    std::fs::create_dir_all(&impostor_state).unwrap();
    std::fs::write(impostor_state.join("node-id"), "node-good\n").unwrap();
    let impostor = stack.tls_agent(
        "impostor",
        &gateway_url,
        &node_tls_args(&ca, &certs, "node-other")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &token,
    );
    impostor.wait_for_log("but --tls-cert", LOG_TIMEOUT);
    assert!(
        impostor.log().contains("is for node-other")
            && impostor
                .log()
                .contains("ozfleet certs node --node-id node-good"),
        "{}",
        impostor.log()
    );
    // ...and a client that skips that check is refused by the gateway, naming the mismatch.
    let attempt = attach(
        stack.gateway_port,
        &ca,
        Some((
            &certs.join("node-node-other.pem"),
            &certs.join("node-node-other-key.pem"),
        )),
        "gateway.test",
        "node-good",
    );
    let Attempt::Refused(status) = attempt else {
        panic!("expected a refusal, got {attempt:?}");
    };
    assert!(
        status.message().contains("node id mismatch")
            && status.message().contains("node-good")
            && status.message().contains("node-other"),
        "{status:?}"
    );
    stack
        .gateway
        .wait_for_log("Refused an attach: node id mismatch", LOG_TIMEOUT);

    // The right certificate with the wrong join token.
    let wrong_token = stack.tls_agent(
        "wrong-token",
        &gateway_url,
        &node_tls_args(&ca, &certs, "node-good")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[("OZFLEET_JOIN_TOKEN", "not-the-join-token")],
    );
    wrong_token.wait_for_log("invalid join token", LOG_TIMEOUT);

    // Nobody is attached: a run finds no node.
    assert_eq!(attached(&stack), 0, "{}", stack.gateway.log());
    let run = stack.api.create("Say hello");
    stack
        .gateway
        .wait_for_log("No node can take the task; rejecting it", RUN_TIMEOUT);
    assert_eq!(attached(&stack), 0, "{}", stack.gateway.log());

    // The node with its own certificate (its id adopted from it) and the token.
    let good = stack.tls_agent(
        "good",
        &gateway_url,
        &node_tls_args(&ca, &certs, "node-good")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &token,
    );
    wait_until(LOG_TIMEOUT, "the good node to attach", || {
        attached(&stack) == 1
    });
    assert_eq!(stack.node_id("good"), "node-good");
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);

    assert_eq!(
        accepted_task_ids(&good.log()),
        [run.clone()].into_iter().collect()
    );
    for rogue in [&no_cert, &other_ca, &impostor, &wrong_token] {
        assert!(accepted_task_ids(&rogue.log()).is_empty(), "{}", rogue.name);
    }
    assert_eq!(attached(&stack), 1, "{}", stack.gateway.log());

    let mut secrets = key_material(&[certs.clone(), rogue_certs]);
    secrets.push(JOIN_TOKEN.to_owned());
    secrets.push("not-the-join-token".to_owned());
    assert_no_secrets(
        &[
            &stack.gateway,
            &no_cert,
            &other_ca,
            &impostor,
            &wrong_token,
            &good,
        ],
        &secrets,
    );
}

/// Certificates rotate without a restart: `ozfleet certs gateway --force` replaces the
/// gateway's files with a new pair from the same CA (for another name), and new
/// connections get the new certificate from the same gateway process.
#[test]
fn the_gateway_certificate_is_rotated_without_a_restart() {
    let stack = Stack::start_tls("gateway-v1.test", &["node-a", "node-b", "probe"]);
    let certs = stack.certs_dir();
    let ca = certs.join("ca.pem");
    let gateway_url = format!("https://127.0.0.1:{}", stack.gateway_port);
    let token = [("OZFLEET_JOIN_TOKEN", JOIN_TOKEN)];
    let node_args = |node_id: &str, server_name: &'static str| {
        vec![
            "--tls-ca".to_owned(),
            path(&ca).to_owned(),
            "--tls-cert".to_owned(),
            path(&certs.join(format!("node-{node_id}.pem"))).to_owned(),
            "--tls-key".to_owned(),
            path(&certs.join(format!("node-{node_id}-key.pem"))).to_owned(),
            "--gateway-server-name".to_owned(),
            server_name.to_owned(),
        ]
    };
    // A handshake probe: a refusal for the node id proves the TLS handshake succeeded.
    let probe = |server_name: &str| {
        attach(
            stack.gateway_port,
            &ca,
            Some((
                &certs.join("node-probe.pem"),
                &certs.join("node-probe-key.pem"),
            )),
            server_name,
            "not-the-probe",
        )
    };
    let attempt = probe("gateway-v1.test");
    assert!(matches!(attempt, Attempt::Refused(_)), "{attempt:?}");
    let attempt = probe("gateway-v2.test");
    assert!(
        matches!(attempt, Attempt::ConnectionFailed(_)),
        "{attempt:?}"
    );

    let args_a = node_args("node-a", "gateway-v1.test");
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let _agent_a = stack.tls_agent("agent-a", &gateway_url, &args_a, &token);
    wait_until(LOG_TIMEOUT, "node-a to attach", || attached(&stack) == 1);

    certs_command(&[
        "gateway",
        "--dir",
        path(&certs),
        "--dns",
        "gateway-v2.test",
        "--force",
    ]);
    wait_until(
        LOG_TIMEOUT,
        "the gateway to serve its new certificate",
        || matches!(probe("gateway-v2.test"), Attempt::Refused(_)),
    );
    let attempt = probe("gateway-v1.test");
    assert!(
        matches!(attempt, Attempt::ConnectionFailed(_)),
        "{attempt:?}"
    );
    stack
        .gateway
        .wait_for_log("Reloaded the node link's certificate", LOG_TIMEOUT);

    let args_b = node_args("node-b", "gateway-v2.test");
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let agent_b = stack.tls_agent("agent-b", &gateway_url, &args_b, &token);
    wait_until(LOG_TIMEOUT, "node-b to attach", || attached(&stack) == 2);
    // Same gateway process throughout.
    assert_eq!(stack.gateway.log().matches("Gateway listening").count(), 1);
    let run = stack.api.create("Say hello");
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
    let _ = agent_b;
}

fn ozfleet_fails(args: &[&str]) -> String {
    let output = Command::new(common::ozfleet())
        .args(args)
        .env_remove("WARP_API_KEY")
        .env_remove("OZFLEET_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A plain node link is refused off loopback unless `--insecure-node-link`, checked
/// before anything binds (192.0.2.1 is a documentation address: never bound here), and
/// incomplete TLS flags fail at start-up with what is missing.
#[test]
fn a_plain_node_link_off_loopback_is_refused_before_binding() {
    let gateway = |extra: &[&str]| {
        let mut args = vec![
            "gateway",
            "--worker-id",
            "edge",
            "--api-key",
            "k",
            "--join-token",
            "t",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        ozfleet_fails(&args)
    };
    let stderr = gateway(&["--listen", "192.0.2.1:7070"]);
    assert!(
        stderr.contains("no TLS") && stderr.contains("--insecure-node-link"),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot listen"), "{stderr}");
    // With consent, validation passes and only the bind fails (no such local address).
    let stderr = gateway(&["--listen", "192.0.2.1:7070", "--insecure-node-link"]);
    assert!(
        stderr.contains("cannot listen on 192.0.2.1:7070"),
        "{stderr}"
    );
    let stderr = gateway(&["--tls-cert", "gateway.pem"]);
    assert!(stderr.contains("needs all of --tls-cert"), "{stderr}");

    let agent = |extra: &[&str]| {
        let mut args = vec!["agent", "--join-token", "t"];
        args.extend_from_slice(extra);
        ozfleet_fails(&args)
    };
    let stderr = agent(&["--gateway", "https://127.0.0.1:1"]);
    assert!(stderr.contains("needs --tls-ca"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    certs_command(&["ca", "--dir", path(certs)]);
    let stderr = agent(&[
        "--gateway",
        "http://127.0.0.1:1",
        "--tls-ca",
        path(&certs.join("ca.pem")),
    ]);
    assert!(stderr.contains("need an https:// gateway URL"), "{stderr}");
    // A key that is not a key: the error names the file, never its contents.
    std::fs::write(certs.join("bad-key.pem"), "SECRET-KEY-MATERIAL\n").unwrap();
    certs_command(&["node", "--dir", path(certs), "--node-id", "n1"]);
    let stderr = agent(&[
        "--gateway",
        "https://127.0.0.1:1",
        "--state-dir",
        path(&certs.join("state")),
        "--tls-ca",
        path(&certs.join("ca.pem")),
        "--tls-cert",
        path(&certs.join("node-n1.pem")),
        "--tls-key",
        path(&certs.join("bad-key.pem")),
    ]);
    assert!(stderr.contains("holds no PEM private key"), "{stderr}");
    assert!(!stderr.contains("SECRET-KEY-MATERIAL"), "{stderr}");
}
