"""The launcher (`tokenmill k8s run-job` / `status`).

1. It builds the very Job objects k8s/jobs holds: its small kustomize reader is compared with the real
   `kubectl kustomize` output.
2. Its Kubernetes API calls run against FakeKube, a stand-in for the Kubernetes API server on
   127.0.0.1 written for these tests. It is a fake: no real API server (nor kind, k3s or Docker) can run on
   this machine or in CI. It answers only the endpoints the launcher uses, with JSON shaped like the real
   API's (the `kubernetes` client deserialises it into its typed models, so a wrong shape fails), and plays
   a Job's life: pod Pending -> `run` container running (its log) -> Complete or Failed -> the `results`
   container's log (a base64 tar.gz). The requests the launcher made are recorded and checked.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from k8s_support import ROOT, kustomize, one
from typer.testing import CliRunner

from services.k8s import jobs
from services.k8s.cli import app
from services.k8s.launcher import as_api_body

NS = "tokenmill"


# ---- 1. the Job objects ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay,path", [("gpu", "k8s/jobs"), ("cpu", "k8s/jobs/cpu")])
def test_render_equals_kubectl_kustomize(overlay, path):
    def key(o):
        return o["kind"], o["metadata"]["name"]

    assert sorted(jobs.render(jobs.overlay_dir(overlay)), key=key) == sorted(kustomize(path), key=key)


@pytest.mark.parametrize("overlay,path", [("gpu", "k8s/jobs"), ("cpu", "k8s/jobs/cpu")])
def test_launcher_builds_the_jobs_k8s_jobs_holds(overlay, path):
    rendered = kustomize(path)
    for target, name in [("all", "tokenmill-bench"), ("loadtest", "tokenmill-loadtest"), ("eval", "tokenmill-eval")]:
        job, pvcs = jobs.build_job(target, overlay=overlay)
        assert job == one(rendered, "Job", name), target
        assert pvcs == [one(rendered, "PersistentVolumeClaim", "tokenmill-results")]
    expected = one(rendered, "Job", "tokenmill-bench")
    for phase in jobs.BENCH_PHASES:
        job, _ = jobs.build_job(phase, overlay=overlay)
        want = copy.deepcopy(expected)
        want["metadata"]["name"] = f"tokenmill-bench-{phase}"
        want["spec"]["template"]["spec"]["initContainers"][0]["args"][1] = phase
        assert job == want, phase
        assert len(job["metadata"]["name"]) + len("-mmddHHMM-abcd") <= 63


def test_build_job_options():
    job, pvcs = jobs.build_job("loadtest", overlay="cpu", namespace="other", run_id="r1", image="reg/tm:1",
                               extra_args=["--users", "3"])
    assert job["metadata"]["name"] == "tokenmill-loadtest-r1"
    assert job["metadata"]["namespace"] == "other" and pvcs[0]["metadata"]["namespace"] == "other"
    assert {c["image"] for c in jobs._containers(job)} == {"reg/tm:1"}
    assert jobs.container(job, "run")["args"][-2:] == ["--users", "3"]
    with pytest.raises(ValueError, match="unknown job"):
        jobs.build_job("nonsense")
    with pytest.raises(ValueError, match="overlay"):
        jobs.build_job("all", overlay="tpu")


def test_json_patch_and_images():
    doc = {"a": {"b/c": [1, 2, 3]}, "x": 1}
    jobs.json_patch(doc, {"op": "remove", "path": "/a/b~1c/0"})
    jobs.json_patch(doc, {"op": "add", "path": "/a/b~1c/-", "value": 9})
    jobs.json_patch(doc, {"op": "replace", "path": "/x", "value": {"y": 2}})
    assert doc == {"a": {"b/c": [2, 3, 9]}, "x": {"y": 2}}
    with pytest.raises(jobs.KustomizeError):
        jobs.json_patch(doc, {"op": "remove", "path": "/nope"})
    assert jobs.split_image("reg:5000/team/tokenmill:cuda") == ("reg:5000/team/tokenmill", "cuda", "")
    assert jobs.split_image("tokenmill@sha256:ab") == ("tokenmill", "", "sha256:ab")


def test_unknown_kustomize_features_are_refused(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(jobs.KustomizeError, match="namePrefix"):
        jobs.render(tmp_path)


def test_dry_run_prints_the_job():
    result = CliRunner().invoke(app, ["run-job", "kv-cache", "--overlay", "cpu", "--dry-run", "-n", "lab"])
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    assert re.fullmatch(r"tokenmill-bench-kv-cache-\d{8}-[0-9a-f]{4}", job["metadata"]["name"])
    assert job["metadata"]["namespace"] == "lab"
    assert job["spec"]["template"]["spec"]["initContainers"][0]["args"][:2] == ["bench", "kv-cache"]


def test_tokenmill_cli_has_the_k8s_commands():
    from services.cli import app as root

    result = CliRunner().invoke(root, ["k8s", "--help"])
    assert result.exit_code == 0, result.output
    assert "run-job" in result.output and "status" in result.output


# ---- 2. the API calls, against a stand-in API server ----------------------------------------------------
TS = "2026-11-26T18:00:00Z"


def _status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _container_status(name, state, ready=False, restarts=0):
    return {"name": name, "image": "tokenmill:cpu", "imageID": "", "ready": ready, "restartCount": restarts,
            "state": state}


class FakeKube:
    """A stand-in for the Kubernetes API server: the endpoints the launcher calls, nothing more."""

    def __init__(self, *, exit_code=0, log_lines=("loading model", "phase kv-cache: 812 tok/s", "done"),
                 results=None, existing_claims=(), status_objects=None, stuck_reason=None):
        self.exit_code = exit_code
        self.stuck_reason = stuck_reason
        self.log_lines = log_lines
        self.results = results or {"summary.json": b'{"tokens_per_s": 812}'}
        self.claims: dict[str, dict] = {name: {"metadata": {"name": name}} for name in existing_claims}
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}  # job name -> pod
        self.polls: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: dict[str, list] = {}
        self.status_objects = status_objects or {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.dispatch(self, "GET")

            def do_POST(self):
                fake.dispatch(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- plumbing
    def dispatch(self, h, method):
        url = urlsplit(h.path)
        path, query = unquote(url.path), {k: v[0] for k, v in parse_qs(url.query).items()}
        body = None
        if method == "POST":
            body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.requests.append((method, path))
            code, payload = self.route(method, path, query, body)
        data = payload if isinstance(payload, bytes) else json.dumps(as_api_body(payload)).encode()
        h.send_response(code)
        h.send_header("Content-Type", "text/plain" if isinstance(payload, bytes) else "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def route(self, method, path, query, body):
        m = re.fullmatch(rf"/api/v1/namespaces/{NS}/persistentvolumeclaims(?:/([^/]+))?", path)
        if m:
            if method == "POST":
                self.bodies.setdefault("pvc", []).append(body)
                self.claims[body["metadata"]["name"]] = body
                return 201, body
            if m.group(1) in self.claims:
                return 200, self.claims[m.group(1)]
            return 404, _status(404, "NotFound", f'persistentvolumeclaims "{m.group(1)}" not found')
        if method == "POST" and path == f"/apis/batch/v1/namespaces/{NS}/jobs":
            self.bodies.setdefault("job", []).append(body)
            name = body["metadata"]["name"]
            self.jobs[name] = {**body, "status": {"active": 1, "startTime": TS}}
            self.pods[name] = self._pod(name)
            return 201, body
        m = re.fullmatch(rf"/apis/batch/v1/namespaces/{NS}/jobs/([^/]+)", path)
        if m:
            return (200, self.jobs[m.group(1)]) if m.group(1) in self.jobs else (404, _status(404, "NotFound", ""))
        if path == f"/api/v1/namespaces/{NS}/pods":
            selector = query.get("labelSelector", "")
            if selector.startswith("job-name="):
                job = selector.removeprefix("job-name=")
                self._advance(job)
                return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                             "items": [self.pods[job]] if job in self.pods else []}
            assert selector == "app.kubernetes.io/part-of=tokenmill", selector
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                         "items": self.status_objects.get("pods", [])}
        m = re.fullmatch(rf"/api/v1/namespaces/{NS}/pods/([^/]+)/log", path)
        if m:
            return self._log(m.group(1), query)
        m = re.fullmatch(rf"/api/v1/namespaces/{NS}/pods/([^/:]+):9090/proxy/metrics", path)
        if m:
            text = self.status_objects.get("metrics", {}).get(m.group(1))
            return (200, text.encode()) if text else (503, _status(503, "ServiceUnavailable", "no endpoint"))
        if path == f"/apis/apps/v1/namespaces/{NS}/deployments":
            return 200, {"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {},
                         "items": self.status_objects.get("deployments", [])}
        if path == f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/tokenmill-worker":
            hpa = self.status_objects.get("hpa")
            return (200, hpa) if hpa else (404, _status(404, "NotFound", ""))
        return 404, _status(404, "NotFound", f"the fake API server has no {method} {path}")

    # -- a Job's life
    def _pod(self, job):
        spec = self.jobs[job]["spec"]["template"]
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-x7k2p", "namespace": NS, "creationTimestamp": TS,
                         "labels": {**spec["metadata"]["labels"], "job-name": job}},
            "spec": copy.deepcopy(spec["spec"]),
            "status": {"phase": "Pending",
                       "conditions": [{"type": "PodScheduled", "status": "True"}],
                       "initContainerStatuses": [_container_status("run", {"waiting": {"reason": "PodInitializing"}})],
                       "containerStatuses": [_container_status("results",
                                                               {"waiting": {"reason": "PodInitializing"}})]},
        }

    def _advance(self, job):
        """Pending on the first look, the `run` container running from the second on."""
        self.polls[job] = self.polls.get(job, 0) + 1
        pod = self.pods.get(job)
        if pod and self.stuck_reason:
            pod["status"]["initContainerStatuses"][0]["state"] = {
                "waiting": {"reason": self.stuck_reason, "message": 'Back-off pulling image "tokenmill:cpu"'}}
        elif pod and self.polls[job] == 2:
            pod["status"]["phase"] = "Pending"
            pod["status"]["initContainerStatuses"][0]["state"] = {"running": {"startedAt": TS}}

    def _finish(self, pod_name):
        job = pod_name.rsplit("-", 1)[0]
        pod, status = self.pods[job], self.jobs[job]["status"]
        pod["status"]["initContainerStatuses"][0]["state"] = {
            "terminated": {"exitCode": self.exit_code, "reason": "Completed" if self.exit_code == 0 else "Error"}}
        status.pop("active", None)
        if self.exit_code == 0:
            pod["status"]["phase"] = "Succeeded"
            pod["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 0, "reason": "Completed"}}
            status.update(succeeded=1, completionTime=TS,
                          conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": TS}])
        else:
            pod["status"]["phase"] = "Failed"
            status.update(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                 "message": "Job has reached the specified backoff limit"}])

    def _log(self, pod_name, query):
        job = pod_name.rsplit("-", 1)[0]
        state = self.pods[job]["status"]["initContainerStatuses"][0]["state"]
        if query.get("container") == "run":
            if "waiting" in state:
                return 400, _status(400, "BadRequest", f'container "run" in pod "{pod_name}" is waiting to start')
            if "running" in state:
                assert query.get("follow") == "true", "a running container's log is followed"
                self._finish(pod_name)  # the stream ends when the container exits
            return 200, "".join(f"{line}\n" for line in self.log_lines).encode()
        assert query.get("container") == "results", query
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in self.results.items():
                info = tarfile.TarInfo(f"{job}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        text = base64.encodebytes(buf.getvalue())  # wrapped at 76 columns, like coreutils base64
        return 200, text


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    def write(url):
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": url}}],
               "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NS}}]}
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.setattr("services.k8s.launcher.POLL_S", 0.01)
        return path
    return write


def test_run_job_creates_follows_waits_and_copies_results(kubeconfig, tmp_path):
    with FakeKube() as kube:
        kubeconfig(kube.url)
        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["run-job", "kv-cache", "--overlay", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # The results claim was missing: created from k8s/jobs (namespaced), then the Job, built from k8s/jobs.
    (pvc,) = kube.bodies["pvc"]
    assert pvc == as_api_body(jobs.build_job("kv-cache", overlay="cpu", namespace=NS)[1][0])
    (job,) = kube.bodies["job"]
    name = job["metadata"]["name"]
    run_id = name.removeprefix("tokenmill-bench-kv-cache-")
    assert job == as_api_body(jobs.build_job("kv-cache", overlay="cpu", namespace=NS, run_id=run_id)[0])
    # The log was followed, with progress; the results were unpacked.
    assert f"created Job {NS}/{name}" in result.output
    assert f"[{name}-x7k2p] phase kv-cache: 812 tok/s" in result.output
    assert f"Job {name} complete" in result.output
    assert (out / name / "summary.json").read_bytes() == b'{"tokens_per_s": 812}'
    assert f"results: 1 file(s) in {out / name}" in result.output
    log_calls = [p for m, p in kube.requests if p.endswith("/log")]
    assert len(log_calls) == 2  # `run` (followed) once, `results` once


def test_run_job_reports_a_failed_job(kubeconfig, tmp_path):
    with FakeKube(exit_code=3, log_lines=("Traceback ...", "RuntimeError: CUDA out of memory")) as kube:
        kubeconfig(kube.url)
        result = CliRunner().invoke(app, ["run-job", "eval", "--overlay", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "RuntimeError: CUDA out of memory" in result.output
    assert "run exited 3 (Error)" in result.output
    assert "failed after" in result.output and "BackoffLimitExceeded" in result.output
    assert not (tmp_path / "out").exists()


def test_run_job_on_the_gpu_cluster(kubeconfig, tmp_path):
    """All phases in one GPU Job; both claims exist (the overlay made the model cache)."""
    with FakeKube(existing_claims=("tokenmill-results", "tokenmill-model-cache")) as kube:
        kubeconfig(kube.url)
        result = CliRunner().invoke(app, ["run-job", "all", "--out", str(tmp_path / "out"),
                                          "--image", "registry.example/tokenmill:cuda-1"])
    assert result.exit_code == 0, result.output
    assert "pvc" not in kube.bodies
    (job,) = kube.bodies["job"]
    run_id = job["metadata"]["name"].removeprefix("tokenmill-bench-")
    built = jobs.build_job("all", namespace=NS, run_id=run_id, image="registry.example/tokenmill:cuda-1")[0]
    assert job == as_api_body(built)
    run = jobs.container(job, "run")
    assert run["args"][:4] == ["bench", "all", "--device", "cuda"]
    assert run["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_run_job_stops_on_a_pod_that_cannot_start(kubeconfig, tmp_path):
    with FakeKube(stuck_reason="ImagePullBackOff") as kube:
        kubeconfig(kube.url)
        result = CliRunner().invoke(app, ["run-job", "loadtest", "--overlay", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "cannot start" in result.output and "ImagePullBackOff" in result.output
    assert "Back-off pulling image" in result.output and "kubectl -n tokenmill delete job" in result.output


def test_run_job_needs_the_overlay_claims(kubeconfig, tmp_path):
    """On the GPU cluster the bench Job mounts the model cache that k8s/overlays/gpu creates."""
    with FakeKube(existing_claims=("tokenmill-results",)) as kube:
        kubeconfig(kube.url)
        result = CliRunner().invoke(app, ["run-job", "all", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "PersistentVolumeClaim tokenmill-model-cache is missing" in result.output
    assert "job" not in kube.bodies and "pvc" not in kube.bodies


def _status_pod(name, component, ready=True, restarts=0):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "creationTimestamp": TS,
                         "labels": {"app.kubernetes.io/component": component,
                                    "app.kubernetes.io/part-of": "tokenmill"}},
            "spec": {"containers": [{"name": component, "image": "tokenmill:cuda"}], "nodeName": "gpu-node-1"},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": [_container_status(component, {"running": {"startedAt": TS}},
                                                               ready=ready, restarts=restarts)]}}


def test_status_shows_pods_readiness_and_queue_depth(kubeconfig):
    overlay = kustomize("k8s/overlays/gpu")
    deployments = []
    for service, ready in (("gateway", 2), ("worker", 1), ("judge", 1)):
        d = one(overlay, "Deployment", f"tokenmill-{service}")
        d["spec"].setdefault("replicas", 2)
        d["status"] = {"readyReplicas": ready}
        deployments.append(d)
    hpa = one(overlay, "HorizontalPodAutoscaler", "tokenmill-worker")
    hpa["status"] = {"currentReplicas": 2, "desiredReplicas": 3}
    objects = {
        "pods": [_status_pod("tokenmill-gateway-a", "gateway"), _status_pod("tokenmill-gateway-b", "gateway"),
                 _status_pod("tokenmill-worker-a", "worker", restarts=1),
                 _status_pod("tokenmill-worker-b", "worker", ready=False),
                 _status_pod("tokenmill-judge-a", "judge")],
        "metrics": {
            "tokenmill-gateway-a": "# TYPE tokenmill:gateway_queue_depth gauge\ntokenmill:gateway_queue_depth 5.0\n",
            "tokenmill-gateway-b": "# TYPE tokenmill:gateway_queue_depth gauge\ntokenmill:gateway_queue_depth 2.0\n",
            "tokenmill-worker-a": ("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 4.0\n"
                                   "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 32.0\n"),
        },
        "deployments": deployments, "hpa": hpa,
    }
    with FakeKube(status_objects=objects) as kube:
        kubeconfig(kube.url)
        result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "gateway queue depth: 7" in out
    assert re.search(r"tokenmill-worker\s+1/2 ready", out)
    assert "autoscaler: 2 worker(s), wants 3 (min 2, max 8)" in out
    assert re.search(r"tokenmill-worker-a\s+worker\s+Running\s+1/1\s+1\s+4/32", out)
    assert re.search(r"tokenmill-worker-b\s+worker\s+Running\s+0/1\s+0", out)
    # Metrics are read only from ready gateway/worker pods, through the API server's pod proxy.
    proxied = sorted(p for _, p in kube.requests if "/proxy/" in p)
    assert proxied == [f"/api/v1/namespaces/{NS}/pods/{p}:9090/proxy/metrics"
                       for p in ("tokenmill-gateway-a", "tokenmill-gateway-b", "tokenmill-worker-a")]


def test_status_without_a_deployment(kubeconfig):
    with FakeKube() as kube:
        kubeconfig(kube.url)
        result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "gateway queue depth: unknown" in result.output
    assert "no tokenmill pods" in result.output


def test_repo_layout_the_launcher_expects():
    assert jobs.default_jobs_dir() == ROOT / "k8s" / "jobs"
