"""The Kubernetes manifests: they render with the real `kubectl kustomize`, every object validates against
the Kubernetes OpenAPI schema (kubernetes-validate, offline, strict: unknown fields fail), and the rendered
objects have the properties that matter for running tokenmill -- not only a valid shape.

No API server runs here: nothing is applied. What a cluster would add (admission, scheduling) is out of
reach; the schema and the properties below are what can be checked offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from k8s_support import (
    RENDERED,
    ROOT,
    WORKLOADS,
    by_kind,
    containers,
    effective_env,
    kustomize,
    labels_match,
    one,
    pod_template,
)

OVERLAYS = ("k8s/overlays/gpu", "k8s/overlays/cpu")
JOBS = ("k8s/jobs", "k8s/jobs/cpu")
# The oldest Kubernetes these manifests target (native gRPC probes are GA since 1.27) and the newest schema.
SCHEMA_VERSIONS = ("1.29.0", "1.37.0")
NAMESPACE = "tokenmill"
SERVICES = {"worker": 50061, "gateway": 50051, "judge": 50071}  # the defaults in services/common/config.py


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", RENDERED)
def test_every_rendered_object_validates(path, version):
    objects = kustomize(path)
    assert objects, f"{path} rendered nothing"
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", OVERLAYS)
def test_overlay_holds_every_piece_the_issue_lists(path):
    objects = kustomize(path)
    kinds = {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"])
             for o in objects}
    for expected in [("Namespace", NAMESPACE), ("ServiceAccount", "tokenmill"),
                     ("ConfigMap", "tokenmill-worker-config"), ("ConfigMap", "tokenmill-gateway-config"),
                     ("ConfigMap", "tokenmill-judge-config"),
                     *[(k, f"tokenmill-{s}") for s in SERVICES for k in ("Deployment", "Service",
                                                                         "PodDisruptionBudget")],
                     ("HorizontalPodAutoscaler", "tokenmill-worker"),
                     ("NetworkPolicy", "tokenmill-default-deny-ingress")]:
        assert expected in kinds, f"{path} lacks {expected}"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    ns = one(objects, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("path", RENDERED)
def test_every_container_has_requests_limits_and_runs_non_root(path):
    workloads = [o for o in kustomize(path) if o["kind"] in WORKLOADS]
    assert workloads
    for obj in workloads:
        where = f"{path}: {obj['kind']}/{obj['metadata']['name']}"
        pod = pod_template(obj)["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser", 0) > 0 and pod_sc.get("runAsGroup", 0) > 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("serviceAccountName") == "tokenmill", where
        for c in containers(obj):
            cwhere = f"{where} container {c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{cwhere}: {kind} needs cpu and memory"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cwhere
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, cwhere
            assert sc.get("allowPrivilegeEscalation") is False, cwhere
            assert sc.get("readOnlyRootFilesystem") is True, cwhere
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cwhere
            assert "privileged" not in sc or sc["privileged"] is False, cwhere
            # A read-only root needs somewhere to write: /tmp is a volume in every writing container.
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["name"] != "results":
                assert "/tmp" in mounts, f"{cwhere}: /tmp must be a writable volume"


def _gpu(c):
    return {k: c.get("resources", {}).get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}


def test_gpu_workers_request_a_gpu_on_gpu_nodes():
    objects = kustomize("k8s/overlays/gpu")
    worker = one(objects, "Deployment", "tokenmill-worker")
    (c,) = pod_template(worker)["spec"]["containers"]
    assert _gpu(c) == {"requests": 1, "limits": 1}
    spec = pod_template(worker)["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # /dev/shm is a memory emptyDir; the model cache a PersistentVolumeClaim the overlay creates.
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    cache = vols[mounts["/var/cache/tokenmill"]]
    assert set(cache) == {"name", "persistentVolumeClaim"}
    one(objects, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    env = effective_env(objects, c)
    assert env["TOKENMILL_WORKER_MODEL"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert env["TOKENMILL_WORKER_QUANTIZATION"] == "int4"
    assert env["HF_HOME"].startswith("/var/cache/tokenmill")
    # Nothing else in the deployment asks for a GPU.
    for d in by_kind(objects, "Deployment"):
        if d["metadata"]["name"] != "tokenmill-worker":
            assert all(_gpu(x) == {"requests": None, "limits": None} for x in containers(d))


def test_cpu_overlay_asks_for_no_gpu():
    for path in ("k8s/overlays/cpu", "k8s/jobs/cpu"):
        for obj in kustomize(path):
            if obj["kind"] in WORKLOADS:
                assert all(_gpu(c) == {"requests": None, "limits": None} for c in containers(obj)), path
                assert "nodeSelector" not in pod_template(obj)["spec"], path
    env = effective_env(kustomize("k8s/overlays/cpu"),
                        pod_template(one(kustomize("k8s/overlays/cpu"), "Deployment", "tokenmill-worker"))["spec"][
                            "containers"][0])
    assert env["TOKENMILL_WORKER_MODEL"] == "smollm2-135m"


@pytest.mark.parametrize("path", OVERLAYS)
def test_probes_are_grpc_probes_on_the_service_port(path):
    objects = kustomize(path)
    for service, default_port in SERVICES.items():
        deployment = one(objects, "Deployment", f"tokenmill-{service}")
        (c,) = pod_template(deployment)["spec"]["containers"]
        env = effective_env(objects, c)
        port = int(env[f"TOKENMILL_{service.upper()}_PORT"])
        assert port == default_port
        assert env[f"TOKENMILL_{service.upper()}_HOST"] == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port
        assert ports["metrics"] == int(env[f"TOKENMILL_{service.upper()}_METRICS_PORT"]) == 9090
        if service == "gateway":
            assert ports["http"] == int(env["TOKENMILL_GATEWAY_HTTP_PORT"]) == 8000
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{service} {probe}"
            assert c[probe]["grpc"]["port"] == port, f"{service} {probe}"
        # The startup probe allows the model load; liveness only starts after it.
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, service
        # The Service exposes the gRPC port as h2c and selects exactly this deployment's pods.
        svc = one(objects, "Service", f"tokenmill-{service}")
        assert labels_match(svc["spec"]["selector"], pod_template(deployment)["metadata"]["labels"])
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == port and grpc_port["targetPort"] == "grpc"
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"


@pytest.mark.parametrize("path", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(path):
    objects = kustomize(path)
    for service in SERVICES:
        deployment = one(objects, "Deployment", f"tokenmill-{service}")
        spec = pod_template(deployment)["spec"]
        (c,) = spec["containers"]
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        drain = float(effective_env(objects, c)[f"TOKENMILL_{service.upper()}_GRACE_PERIOD_S"])
        assert spec["terminationGracePeriodSeconds"] >= int(command[1]) + drain + 1, service


@pytest.mark.parametrize("path", OVERLAYS)
def test_gateway_worker_address_resolves_to_the_worker_headless_service(path):
    objects = kustomize(path)
    gateway = one(objects, "Deployment", "tokenmill-gateway")
    env = effective_env(objects, pod_template(gateway)["spec"]["containers"][0])
    assert env["TOKENMILL_GATEWAY_WORKERS"] == "", "no static workers in a cluster: DNS only"
    host, port = env["TOKENMILL_GATEWAY_WORKERS_DNS"].rsplit(":", 1)
    match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
    assert match, f"{host} is not <service>.<namespace>.svc.cluster.local"
    svc = one(objects, "Service", match.group(1))
    assert match.group(2) == svc["metadata"]["namespace"] == gateway["metadata"]["namespace"]
    assert svc["spec"]["clusterIP"] == "None", "the worker Service must be headless (one A record per pod)"
    assert not svc["spec"].get("publishNotReadyAddresses", False), "only ready (SERVING) workers in DNS"
    worker = one(objects, "Deployment", "tokenmill-worker")
    assert labels_match(svc["spec"]["selector"], pod_template(worker)["metadata"]["labels"])
    assert not labels_match(svc["spec"]["selector"], pod_template(gateway)["metadata"]["labels"])
    svc_port = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    assert svc_port["appProtocol"] == "kubernetes.io/h2c"
    worker_env = effective_env(objects, pod_template(worker)["spec"]["containers"][0])
    assert int(port) == int(worker_env["TOKENMILL_WORKER_PORT"])


def _metric_names(module: str) -> set[str]:
    import importlib

    from prometheus_client.metrics import MetricWrapperBase

    mod = importlib.import_module(module)
    names = set()
    for value in vars(mod).values():
        if isinstance(value, MetricWrapperBase):
            names |= {m.name for m in value.describe()}
    return names


@pytest.mark.parametrize("path", OVERLAYS)
def test_hpa_scales_the_worker_deployment_on_queue_pressure(path):
    objects = kustomize(path)
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    worker = one(objects, "Deployment", ref["name"])
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    assert worker is one(objects, "Deployment", "tokenmill-worker")
    assert "replicas" not in worker["spec"], "the HPA owns the worker count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = {(m["type"], m[m["type"].lower()]["metric"]["name"]) for m in hpa["spec"]["metrics"]}
    assert metrics == {("Pods", "vllm_num_requests_waiting"), ("External", "tokenmill_gateway_queue_depth")}
    assert not any(m["type"] == "Resource" for m in hpa["spec"]["metrics"]), "queue pressure, not utilisation"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # The Prometheus adapter rules turn the services' own series into exactly these metric names.
    rules = yaml.safe_load((ROOT / "k8s/monitoring/prometheus-adapter-values.yaml").read_text())["rules"]
    renamed = {}
    for section in ("custom", "external"):
        for rule in rules[section]:
            source = re.fullmatch(r"\^?(.+?)\$?", rule["name"]["matches"]).group(1)
            renamed[rule["name"]["as"]] = (section, source)
    assert renamed["vllm_num_requests_waiting"] == ("custom", "vllm:num_requests_waiting")
    assert renamed["tokenmill_gateway_queue_depth"] == ("external", "tokenmill:gateway_queue_depth")
    # ... and those series exist in the code that serves /metrics.
    assert "vllm:num_requests_waiting" in _metric_names("services.worker.engine.metrics")
    assert "tokenmill:gateway_queue_depth" in _metric_names("services.gateway.metrics")


@pytest.mark.parametrize("path", OVERLAYS)
def test_disruption_budgets_cover_each_deployment(path):
    objects = kustomize(path)
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for service in SERVICES:
        labels = pod_template(one(objects, "Deployment", f"tokenmill-{service}"))["metadata"]["labels"]
        matching = [p for p in pdbs if labels_match(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, service
        assert matching[0]["spec"].get("maxUnavailable") == 1, service


def _ingress_sources(policies, pod_labels, port):
    """For the pods with these labels: the `from` peers admitted on this port (None = from anywhere)."""
    sources = []
    for pol in policies:
        if not labels_match(pol["spec"]["podSelector"].get("matchLabels", {}), pod_labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            sources.append(rule.get("from"))
    return sources


@pytest.mark.parametrize("path", OVERLAYS)
def test_network_policies_only_gateway_reaches_workers_and_only_eval_and_gateway_reach_judge(path):
    objects = kustomize(path)
    policies = by_kind(objects, "NetworkPolicy")
    deny = one(objects, "NetworkPolicy", "tokenmill-default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    labels = {s: pod_template(one(objects, "Deployment", f"tokenmill-{s}"))["metadata"]["labels"] for s in SERVICES}

    worker_sources = _ingress_sources(policies, labels["worker"], SERVICES["worker"])
    assert worker_sources, "the gateway must reach the workers"
    for peers in worker_sources:
        assert peers is not None, "worker gRPC must not be open to everyone"
        for peer in peers:
            assert set(peer) == {"podSelector"}
            assert labels_match(peer["podSelector"]["matchLabels"], labels["gateway"])

    judge_sources = _ingress_sources(policies, labels["judge"], SERVICES["judge"])
    assert judge_sources and all(peers is not None for peers in judge_sources)
    judge_selectors = [peer["podSelector"]["matchLabels"] for peers in judge_sources for peer in peers]
    # Exactly the eval Job's pods and the gateway's (live quality samples) carry the label that opens the judge.
    workloads = [o for p in (path, "k8s/jobs", "k8s/jobs/cpu") for o in kustomize(p) if o["kind"] in WORKLOADS]
    admitted = {o["metadata"]["name"] for o in workloads for sel in judge_selectors
                if labels_match(sel, pod_template(o)["metadata"]["labels"])}
    assert admitted == {"tokenmill-eval", "tokenmill-gateway"}

    assert _ingress_sources(policies, labels["gateway"], SERVICES["gateway"]) == [None], "the gateway is public"
    for service in SERVICES:  # Prometheus (and `tokenmill k8s status` via the API server) read metrics
        assert None in _ingress_sources(policies, labels[service], 9090), service


@pytest.mark.parametrize("path", RENDERED)
def test_references_resolve(path):
    """Every ConfigMap, Secret, claim and ServiceAccount a pod names exists, or is marked optional."""
    objects = kustomize(path)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    overlay = kustomize("k8s/overlays/gpu" if path == "k8s/jobs" else "k8s/overlays/cpu")
    deployed = names | {(o["kind"], o["metadata"]["name"]) for o in overlay}
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            continue
        spec = pod_template(obj)["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in deployed
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in deployed, vol
        mounted = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(obj):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= mounted
            for src in c.get("envFrom", []):
                assert ("ConfigMap", src["configMapRef"]["name"]) in names
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref.get("optional") is True, f"{var['name']}: a Secret the user may not create"


@pytest.mark.parametrize("path", JOBS)
def test_every_job_has_backoff_ttl_and_a_results_volume(path):
    jobs = by_kind(kustomize(path), "Job")
    assert {j["metadata"]["name"] for j in jobs} == {"tokenmill-bench", "tokenmill-loadtest", "tokenmill-eval"}
    for job in jobs:
        name = job["metadata"]["name"]
        spec = job["spec"]
        assert isinstance(spec.get("backoffLimit"), int), name
        assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] > 0, name
        assert spec.get("activeDeadlineSeconds", 0) > 0, name
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        vols = {v["name"]: v for v in pod["volumes"]}
        run = next(c for c in pod["initContainers"] if c["name"] == "run")
        results = next(c for c in pod["containers"] if c["name"] == "results")
        for c in (run, results):
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/results")
            assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == "tokenmill-results"
        env = {e["name"]: e for e in run["env"]}
        assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"
        assert env["RESULTS_DIR"]["value"] == "/results/$(JOB_NAME)"
        args = run["args"]
        assert args[args.index("--out") + 1] == "$(RESULTS_DIR)"
        assert args[0] == {"tokenmill-bench": "bench", "tokenmill-loadtest": "loadtest",
                           "tokenmill-eval": "eval"}[name]
        assert '"$JOB_NAME"' in results["command"][-1] and "base64" in results["command"][-1]
    bench = one(jobs, "Job", "tokenmill-bench")
    (run,) = bench["spec"]["template"]["spec"]["initContainers"]
    device = run["args"][run["args"].index("--device") + 1]
    assert device == ("cuda" if path == "k8s/jobs" else "cpu")
    if path == "k8s/jobs":
        assert _gpu(run) == {"requests": 1, "limits": 1}
    loadtest = one(jobs, "Job", "tokenmill-loadtest")
    args = loadtest["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert args[args.index("--host") + 1] == f"tokenmill-gateway:{SERVICES['gateway']}"
    ev = one(jobs, "Job", "tokenmill-eval")
    args = ev["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert args[args.index("--gateway") + 1] == f"tokenmill-gateway:{SERVICES['gateway']}"
    assert args[args.index("--judge") + 1] == f"tokenmill-judge:{SERVICES['judge']}"


def test_images_per_overlay():
    expected = {"k8s/overlays/gpu": "tokenmill:cuda", "k8s/jobs": "tokenmill:cuda",
                "k8s/overlays/cpu": "tokenmill:cpu", "k8s/jobs/cpu": "tokenmill:cpu"}
    for path, image in expected.items():
        for obj in kustomize(path):
            if obj["kind"] in WORKLOADS:
                assert {c["image"] for c in containers(obj)} == {image}, path


def test_dockerfile_builds_cpu_and_cuda_targets_non_root():
    text = (ROOT / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
    assert {"cpu", "cuda"} <= targets
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", text, re.M), "torch pin differs from pyproject"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    assert re.search(r'^ENTRYPOINT \["tokenmill"\]', text, re.M)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    assert Path(ROOT / "README.md").exists() and "README.md" not in ignore, "pyproject's readme is needed to build"


def test_tls_overlay_mounts_the_secret_and_probes_over_tls():
    objects = kustomize("k8s/overlays/gpu-tls")
    for service, port in (("worker", 50061), ("gateway", 50051)):
        deployment = one(objects, "Deployment", f"tokenmill-{service}")
        spec = pod_template(deployment)["spec"]
        (c,) = spec["containers"]
        volume = next(v for v in spec["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == "tokenmill-tls"
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        env = effective_env(objects, c)
        files = {env[f"TOKENMILL_{service.upper()}_TLS_{k}"] for k in ("CERT", "KEY", "CA")}
        assert files == {f"{mount['mountPath']}/{name}" for name in ("tls.crt", "tls.key", "ca.crt")}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = c[probe]["exec"]["command"]
            assert "grpc" not in c[probe] and command[:3] == ["tokenmill", "health", f"127.0.0.1:{port}"]
            assert {"--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name"} <= set(command)
    gateway = pod_template(one(objects, "Deployment", "tokenmill-gateway"))["spec"]["containers"][0]
    assert effective_env(objects, gateway)["TOKENMILL_GATEWAY_TLS_SERVER_NAME"].startswith("tokenmill-worker.")
