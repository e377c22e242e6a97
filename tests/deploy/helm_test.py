"""deploy/helm/ozfleet on the project's Kubernetes v1.20 cluster, with real Helm code
(PyPI helm-sdkpy: Helm's Go library behind cffi). Run by tests/deploy/helm-test.sh, which
prepares the environment (see there).

1. Lint (the chart with the test values), and values.schema.json / `required` refusals
   with clear messages (nothing is created).
2. Install (wait) with hostNetwork (the test cluster's pods have loopback only): the
   gateway against a local control plane on the host, the Kubernetes node agent, a Docker
   node agent DaemonSet, Prometheus metrics. Then: the gateway pod is Ready, both agents
   are attached (`ozfleet nodes`), /metrics answers, the ConfigMap holds no secret, the
   Role has the rules of deploy/kubernetes/rbac.yaml, a run completes as a Job (the
   Docker node drained first), and an upgrade rolls the pods on a config change (checksum
   annotation) and turns on mutual TLS on the node link (a run completes over it).
3. Uninstall (wait): nothing of the release is left, nor any task Job.
"""

import asyncio
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from helm_sdkpy import Configuration, Install, Lint, Status, Uninstall, Upgrade

REPO = os.environ["OZFLEET_REPO"]
CHART = os.path.join(REPO, "deploy/helm/ozfleet")
KUBECONFIG = os.environ["KUBECONFIG"]
NAMESPACE = os.environ.get("OZFLEET_HELM_NAMESPACE", "ozfleet-helm-test")
RELEASE = "ozfleet"
BINARY = os.environ["OZFLEET_BIN"]
IMAGE = os.environ["OZFLEET_IMAGE"]  # repository:tag, in the node's Docker
API_KEY = os.environ["OZFLEET_TEST_API_KEY"]
CP_URL = os.environ["OZFLEET_CP_URL"]
GATEWAY_PORT = int(os.environ["OZFLEET_GATEWAY_PORT"])
ADMIN_PORT = int(os.environ["OZFLEET_ADMIN_PORT"])
METRICS_PORT = int(os.environ["OZFLEET_METRICS_PORT"])
DOCKER_GID = int(os.environ["OZFLEET_DOCKER_GID"])
WORKER_ID = "helm-test-fleet"


def log(message):
    print(f"helm: {message}", file=sys.stderr, flush=True)


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def kubectl(*args, check=True):
    result = subprocess.run(
        ["kubectl", "-n", NAMESPACE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": KUBECONFIG},
    )
    if check and result.returncode != 0:
        fail(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def kubectl_json(*args):
    return json.loads(kubectl(*args, "-o", "json"))


def wait_until(seconds, what, predicate, interval=0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    fail(f"timed out after {seconds}s waiting for {what}")


def ozfleet(*args, check=True):
    result = subprocess.run([BINARY, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        fail(f"ozfleet {' '.join(args)}: {result.stderr.strip()}")
    return result


def http(method, path, body=None):
    request = urllib.request.Request(
        CP_URL + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def merge(base, override):
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


repository, tag = IMAGE.rsplit(":", 1)
VALUES = {
    "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
    "hostNetwork": True,
    "warp": {
        "apiKeySecret": {"create": True, "value": API_KEY},
        "webSocketURL": CP_URL.replace("http://", "ws://") + "/api/v1/selfhosted/worker/ws",
        "serverRootURL": CP_URL,
    },
    "worker": {"workerId": WORKER_ID, "logLevel": "debug"},
    "gateway": {
        "listenHost": "127.0.0.1",
        "port": GATEWAY_PORT,
        "admin": {"port": ADMIN_PORT},
    },
    "kubernetesAgent": {
        "gatewayAddress": f"http://127.0.0.1:{GATEWAY_PORT}",
        "name": "helm-kubernetes-agent",
        "labels": {"pool": "kubernetes"},
        # No kube-proxy here: in-cluster config reaches the API server on the host.
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
        ],
    },
    "kubernetesBackend": {
        "preflightImage": "localhost:5999/busybox:1",
        # The task pods' agent fetches its run from the control plane on the host.
        "podTemplate": {"hostNetwork": True},
        "extraLabels": {"ozfleet.dev/test": "helm"},
    },
    "dockerAgent": {
        "enabled": True,
        "gatewayAddress": f"http://127.0.0.1:{GATEWAY_PORT}",
        "dockerGroupId": DOCKER_GID,
        "networkMode": "host",
        "imagePullPolicy": "IfNotPresent",
    },
    "metrics": {"enabled": True, "listenHost": "127.0.0.1", "port": METRICS_PORT},
}


def finished_run(run):
    def finished():
        state = http("GET", f"/api/v1/agent/runs/{run}")["state"]
        return state if state in ("SUCCEEDED", "FAILED", "CANCELLED", "ERROR") else None

    return finished


async def expect_refused(config, values, needle):
    try:
        await Install(config).run("refused", CHART, values=values, wait=False, timeout=30)
    except Exception as error:  # noqa: BLE001 - any Helm error is the expected outcome
        if needle not in str(error):
            fail(f"install refused, but the message lacks {needle!r}: {error}")
        log(f"refused as expected: {needle}")
        return
    fail(f"install with bad values was accepted (expected: {needle})")


async def main():
    config = Configuration(namespace=NAMESPACE, kubeconfig=KUBECONFIG)

    # --- 1. lint and refusals ---------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "ozfleet")
        shutil.copytree(CHART, chart)
        # The chart as installed: Lint takes no values, so the test values go into the
        # copy's values.yaml, on top of the defaults.
        with open(os.path.join(chart, "values.yaml")) as values:
            defaults = yaml.safe_load(values)
        with open(os.path.join(chart, "values.yaml"), "w") as values:
            yaml.safe_dump(merge(defaults, VALUES), values)
        lint = await Lint(config).run(chart)
        bad = [m for m in lint.get("Messages") or [] if m.get("Severity", 0) >= 2]
        if lint.get("Errors"):
            fail(f"helm lint: {lint}")
        if bad:
            fail(f"helm lint: {bad}")
        log(f"lint: {lint.get('TotalChartsLinted')} chart, no warnings or errors")

    no_worker = merge(VALUES, {"worker": {"workerId": ""}})
    await expect_refused(config, no_worker, "workerId")
    await expect_refused(config, merge(VALUES, {"dockerAgent": {"dockerGroupId": None}}), "dockerGroupId")
    await expect_refused(config, merge(VALUES, {"kubernetesBackend": {"imagePullPolicy": "Sometimes"}}), "imagePullPolicy")
    await expect_refused(config, merge(VALUES, {"kubernetesBakend": {}}), "kubernetesBakend")
    await expect_refused(
        config,
        merge(VALUES, {"warp": {"apiKeySecret": {"create": False, "name": ""}}}),
        "warp.apiKeySecret.name is required",
    )
    await expect_refused(
        config, merge(VALUES, {"gateway": {"admin": {"listenHost": "0.0.0.0"}}}), "gateway.admin.token.enabled"
    )
    await expect_refused(config, merge(VALUES, {"gateway": {"listenHost": "0.0.0.0"}}), "gateway.insecureNodeLink=true")
    await expect_refused(
        config,
        merge(VALUES, {"gateway": {"tls": {"enabled": True, "secretName": "x"}}, "kubernetesAgent": {"tls": {"secretName": "y"}}}),
        "dockerAgent.enabled is not supported with gateway.tls.enabled",
    )

    # --- 2. install ------------------------------------------------------------------------
    started = time.monotonic()
    result = await Install(config).run(
        RELEASE, CHART, values=VALUES, create_namespace=True, wait=True, timeout=240
    )
    log(f"installed ({result.get('status', result.get('info', {}).get('status', '?'))}) in {time.monotonic() - started:.1f}s with wait")
    status = await Status(config).run(RELEASE)
    state = status.get("status") or status.get("info", {}).get("status")
    if state != "deployed":
        fail(f"release status {state!r}: {status}")

    pods = kubectl_json("get", "pods", "-l", "app.kubernetes.io/component=gateway")["items"]
    ready = [
        c["status"] == "True"
        for p in pods
        for c in p["status"].get("conditions", [])
        if c["type"] == "Ready"
    ]
    if not ready or not all(ready):
        fail(f"gateway pod not Ready: {[p['status'] for p in pods]}")
    log("gateway pod Ready (readiness = gRPC health \"\" via `ozfleet health`)")

    admin = f"127.0.0.1:{ADMIN_PORT}"

    def attached(expected=("helm-kubernetes-agent", "localhost")):
        out = ozfleet("nodes", "--admin", admin, "--output", "json", check=False)
        if out.returncode != 0:
            return None
        nodes = json.loads(out.stdout)
        names = {n["name"]: n for n in nodes if "ready" in str(n.get("state", "")).lower()}
        if all(name in names for name in expected):
            return names
        return None

    nodes = wait_until(90, "the Kubernetes and Docker node agents to attach", attached)
    backends = {name: str(node["backend"]).lower() for name, node in nodes.items()}
    if "kubernetes" not in backends["helm-kubernetes-agent"]:
        fail(f"the Kubernetes agent does not report the kubernetes backend: {backends}")
    if "docker" not in backends["localhost"]:
        fail(f"the Docker agent does not report the docker backend: {backends}")
    log(f"attached: {sorted(nodes)} (ozfleet nodes --admin {admin})")

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    if "oz_worker" not in metrics:
        fail(f"/metrics lacks oz_worker metrics: {metrics[:500]}")
    log("metrics: /metrics served from OTEL_METRICS_EXPORTER=prometheus")

    configmaps = kubectl_json("get", "configmaps", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    join_secret = kubectl_json("get", "secret", f"{RELEASE}-join-token")
    join_token = base64.b64decode(join_secret["data"]["join-token"]).decode()
    if len(join_token) < 32:
        fail("the generated join token is short")
    for cm in configmaps:
        text = json.dumps(cm.get("data", {}))
        if API_KEY in text or join_token in text:
            fail(f"ConfigMap {cm['metadata']['name']} holds a secret")
    log(f"ConfigMaps {[c['metadata']['name'] for c in configmaps]} hold no secret")

    role = kubectl_json("get", "role", f"{RELEASE}-kubernetes-agent")
    with open(os.path.join(REPO, "deploy/kubernetes/rbac.yaml")) as rbac:
        reference_rules = [d for d in yaml.safe_load_all(rbac) if d and d["kind"] == "Role"][0]["rules"]
    if role["rules"] != reference_rules:
        fail(f"Role rules differ from deploy/kubernetes/rbac.yaml: {role['rules']} vs {reference_rules}")
    log("Role rules = deploy/kubernetes/rbac.yaml")

    # A run on the Kubernetes node: the Docker node is drained first.
    docker_node = nodes["localhost"]
    docker_id = docker_node["node_id"]
    ozfleet("drain", "--admin", admin, docker_id)
    run = http("POST", "/api/v1/agent/runs", {"prompt": "sleep 3", "config": {"worker_host": WORKER_ID}})["run_id"]
    job = wait_until(
        90,
        "the run's Job",
        lambda: kubectl_json("get", "jobs", "-l", "ozfleet.dev/test=helm")["items"],
    )
    log(f"run {run} runs as Job {job[0]['metadata']['name']}")

    state = wait_until(180, f"run {run} to finish", finished_run(run))
    if state != "SUCCEEDED":
        fail(f"run {run} ended {state}: {http('GET', f'/api/v1/agent/runs/{run}')}")
    log(f"run {run}: SUCCEEDED on the Kubernetes node agent")
    ozfleet("undrain", "--admin", admin, docker_id)

    # A config change rolls the pods that read it. The same upgrade turns on mutual TLS on
    # the node link (certificates from `ozfleet certs`; the Docker DaemonSet is off, since
    # its nodes would each need a certificate): the Kubernetes agent attaches again over
    # TLS with the certificate's node id.
    def template_annotations(kind, name):
        return kubectl_json("get", kind, name)["spec"]["template"]["metadata"]["annotations"]

    with tempfile.TemporaryDirectory() as certs:
        ozfleet("certs", "ca", "--dir", certs)
        ozfleet("certs", "gateway", "--dir", certs, "--ip", "127.0.0.1")
        ozfleet("certs", "node", "--dir", certs, "--node-id", "helm-tls-node")
        kubectl("create", "secret", "generic", "gateway-tls",
                f"--from-file=gateway.pem={certs}/gateway.pem",
                f"--from-file=gateway-key.pem={certs}/gateway-key.pem",
                f"--from-file=ca.pem={certs}/ca.pem")
        kubectl("create", "secret", "generic", "node-tls",
                f"--from-file=ca.pem={certs}/ca.pem",
                f"--from-file=node.pem={certs}/node-helm-tls-node.pem",
                f"--from-file=node-key.pem={certs}/node-helm-tls-node-key.pem")

    before = template_annotations("deployment", f"{RELEASE}-kubernetes-agent")["checksum/config"]
    changed = merge(VALUES, {
        "kubernetesBackend": {"extraAnnotations": {"ozfleet.dev/rev": "2"}},
        "gateway": {"tls": {"enabled": True, "secretName": "gateway-tls"}},
        "kubernetesAgent": {
            "gatewayAddress": f"https://127.0.0.1:{GATEWAY_PORT}",
            "tls": {"secretName": "node-tls"},
        },
        "dockerAgent": {"enabled": False},
    })
    await Upgrade(config).run(RELEASE, CHART, values=changed, wait=True, timeout=240)
    after = template_annotations("deployment", f"{RELEASE}-kubernetes-agent")["checksum/config"]
    if before == after:
        fail("checksum/config did not change with the config")
    cm = kubectl_json("get", "configmap", f"{RELEASE}-config")["data"]["config.yaml"]
    if "ozfleet.dev/rev" not in cm:
        fail("the upgraded ConfigMap lacks the change")
    if kubectl_json("get", "secret", f"{RELEASE}-join-token")["data"]["join-token"] != join_secret["data"]["join-token"]:
        fail("the generated join token changed on upgrade")
    nodes = wait_until(120, "the Kubernetes agent to attach over TLS", lambda: attached(("helm-kubernetes-agent",)))
    if nodes["helm-kubernetes-agent"]["node_id"] != "helm-tls-node":
        fail(f"the agent did not adopt its certificate's node id: {nodes}")
    gateway_log = kubectl("logs", f"deployment/{RELEASE}-gateway")
    if "node_tls=true" not in gateway_log:
        fail("the gateway does not serve the node link over TLS")
    run = http("POST", "/api/v1/agent/runs", {"prompt": "sleep 1", "config": {"worker_host": WORKER_ID}})["run_id"]
    state = wait_until(180, f"run {run} to finish", finished_run(run))
    if state != "SUCCEEDED":
        fail(f"run {run} over the TLS node link ended {state}")
    log("upgrade: checksum/config changed, pods rolled, join token kept; mTLS node link: "
        f"the agent attached as helm-tls-node, run {run} SUCCEEDED")

    # --- 3. uninstall -------------------------------------------------------------------------
    await Uninstall(config).run(RELEASE, wait=True, timeout=180)

    def gone():
        out = kubectl(
            "get",
            "deployments,daemonsets,replicasets,services,configmaps,serviceaccounts,roles,rolebindings,secrets",
            "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
        ).strip()
        pods = kubectl("get", "pods", "-o", "name").strip()
        jobs = kubectl("get", "jobs", "-o", "name").strip()
        return not out and not pods and not jobs

    wait_until(180, "everything of the release to be gone", gone)
    log("uninstall: no resource, pod or Job left")
    log("PASS")


asyncio.run(main())
