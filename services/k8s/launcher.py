"""Talk to the Kubernetes API: run a Job to the end (logs, results) and show the deployment's state.

Every call goes through the `kubernetes` client's typed APIs; the client is passed in, so tests point it
at a stand-in API server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import binascii
import io
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.k8s.jobs import RESULTS_CONTAINER, RUN_CONTAINER, claim_names

PART_OF = "app.kubernetes.io/part-of=tokenmill"
COMPONENT = "app.kubernetes.io/component"
METRICS_PORT = 9090
GATEWAY_QUEUE = "tokenmill:gateway_queue_depth"
WORKER_WAITING = "vllm:num_requests_waiting"
WORKER_RUNNING = "vllm:num_requests_running"
# Waiting reasons after which a pod will not start without a change from the user.
POLL_S = 2.0  # how often the Job and its pods are looked at
STUCK_REASONS = {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}


class LaunchError(RuntimeError):
    pass


def api_client(context: str | None = None) -> Any:
    """A client from ~/.kube/config ($KUBECONFIG), or the in-cluster service account."""
    import os

    from kubernetes import client, config

    try:
        # $KUBECONFIG is read now, not when the kubernetes package was imported (it caches it then).
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context)
    except config.ConfigException:
        try:
            config.load_incluster_config()
        except config.ConfigException as exc:
            raise LaunchError("no Kubernetes configuration: set KUBECONFIG or run inside a cluster") from exc
    return client.ApiClient()


@dataclass
class RunResult:
    name: str
    succeeded: bool
    results_dir: Path | None = None
    files: list[str] = field(default_factory=list)
    message: str = ""


class Launcher:
    def __init__(self, api: Any, namespace: str, echo: Callable[[str], None] = print,
                 poll_s: float | None = None) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.autoscaling = client.AutoscalingV2Api(api)
        self.echo = echo
        self.poll_s = POLL_S if poll_s is None else poll_s

    # ---- run-job -------------------------------------------------------------------------------
    def ensure_claims(self, job: dict[str, Any], pvcs: list[dict[str, Any]]) -> None:
        """Create the results claim if it is missing; fail early on a claim that only an overlay creates."""
        from kubernetes.client.exceptions import ApiException

        ours = {p["metadata"]["name"]: p for p in pvcs}
        for claim in claim_names(job):
            try:
                self.core.read_namespaced_persistent_volume_claim(claim, self.namespace)
                continue
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if claim not in ours:
                raise LaunchError(f"PersistentVolumeClaim {claim} is missing in namespace {self.namespace}: "
                                  "deploy the overlay first (kubectl apply -k k8s/overlays/gpu)")
            self.core.create_namespaced_persistent_volume_claim(self.namespace, ours[claim])
            self.echo(f"created PersistentVolumeClaim {claim}")

    def run(self, job: dict[str, Any], pvcs: list[dict[str, Any]], out_dir: Path,
            timeout_s: float = 6 * 3600) -> RunResult:
        job, pvcs = as_api_body(job), [as_api_body(p) for p in pvcs]
        name = job["metadata"]["name"]
        self.ensure_claims(job, pvcs)
        self.batch.create_namespaced_job(self.namespace, job)
        self.echo(f"created Job {self.namespace}/{name}")
        start = time.monotonic()
        followed: set[str] = set()
        last_note: dict[str, str] = {}
        while True:
            job_obj = self.batch.read_namespaced_job(name, self.namespace)
            done = _finished(job_obj)
            for pod in self._job_pods(name):
                pod_name = pod.metadata.name
                note = _pod_note(pod)
                if note != last_note.get(pod_name):
                    last_note[pod_name] = note
                    self.echo(f"[{pod_name}] {note}")
                    if any(reason in note for reason in STUCK_REASONS):
                        raise LaunchError(f"pod {pod_name} cannot start: {note} (the Job is left in place: "
                                          f"kubectl -n {self.namespace} delete job {name})")
                state = _container_state(pod, RUN_CONTAINER)
                if pod_name not in followed and state in ("running", "terminated"):
                    followed.add(pod_name)
                    self._stream_log(pod_name, follow=not done)
            if done is not None:
                break
            if time.monotonic() - start > timeout_s:
                raise LaunchError(f"Job {name} did not finish in {timeout_s:.0f}s (it keeps running; "
                                  f"kubectl -n {self.namespace} delete job {name} to stop it)")
            time.sleep(self.poll_s)
        elapsed = time.monotonic() - start
        if done != "Complete":
            message = _condition_message(job_obj, "Failed")
            self.echo(f"Job {name} failed after {elapsed:.0f}s: {message}")
            return RunResult(name, False, message=message)
        self.echo(f"Job {name} complete after {elapsed:.0f}s")
        result = RunResult(name, True)
        result.results_dir, result.files = self.copy_results(name, out_dir)
        return result

    def _job_pods(self, job_name: str) -> list[Any]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job_name}").items
        return sorted(pods, key=lambda p: (p.metadata.creation_timestamp is None, p.metadata.creation_timestamp,
                                           p.metadata.name))

    def _stream_log(self, pod: str, follow: bool) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=RUN_CONTAINER, follow=follow,
                                                     _preload_content=False)
        except ApiException as exc:
            self.echo(f"[{pod}] no log: {exc.reason}")
            return
        buffer = b""
        try:
            for chunk in resp.stream(4096):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.echo(f"[{pod}] {line.decode(errors='replace')}")
            if buffer:
                self.echo(f"[{pod}] {buffer.decode(errors='replace')}")
        finally:
            resp.release_conn()

    def copy_results(self, job_name: str, out_dir: Path) -> tuple[Path, list[str]]:
        """Unpack the base64 tar.gz that the Job's `results` container printed into out_dir/<job name>/."""
        pods = [p for p in self._job_pods(job_name) if p.status and p.status.phase == "Succeeded"]
        if not pods:
            raise LaunchError(f"Job {job_name} has no succeeded pod to copy results from")
        pod = pods[-1].metadata.name
        text = self.core.read_namespaced_pod_log(pod, self.namespace, container=RESULTS_CONTAINER)
        if not text.strip():
            self.echo(f"results: none (the command wrote nothing under /results/{job_name}/)")
            return out_dir / job_name, []
        try:
            archive = base64.b64decode("".join(text.split()), validate=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                names = [m.name for m in tar.getmembers() if m.isfile()]
                tar.extractall(out_dir, filter="data")
        except (binascii.Error, tarfile.TarError, ValueError) as exc:
            raise LaunchError(
                f"the results log of {pod} is not a base64 tar.gz ({exc}); the results are still on the "
                f"tokenmill-results volume under /results/{job_name}/") from exc
        target = out_dir / job_name
        self.echo(f"results: {len(names)} file(s) in {target}")
        return target, names

    # ---- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Pods (phase, readiness, restarts), deployments, the HPA, and the queues from /metrics."""
        from kubernetes.client.exceptions import ApiException

        pods = self.core.list_namespaced_pod(self.namespace, label_selector=PART_OF).items
        rows = []
        for p in sorted(pods, key=lambda p: ((p.metadata.labels or {}).get(COMPONENT, ""), p.metadata.name)):
            statuses = (p.status.container_statuses or []) if p.status else []
            rows.append({
                "name": p.metadata.name,
                "component": (p.metadata.labels or {}).get(COMPONENT, "?"),
                "phase": p.status.phase if p.status else "?",
                "ready": f"{sum(1 for s in statuses if s.ready)}/{len(p.spec.containers)}",
                "restarts": sum(s.restart_count for s in statuses),
                "node": p.spec.node_name or "",
            })
        deployments = [{
            "name": d.metadata.name,
            "ready": d.status.ready_replicas or 0,
            "desired": d.spec.replicas if d.spec.replicas is not None else 0,
        } for d in self.apps.list_namespaced_deployment(self.namespace, label_selector=PART_OF).items]
        hpa = None
        try:
            h = self.autoscaling.read_namespaced_horizontal_pod_autoscaler("tokenmill-worker", self.namespace)
            hpa = {"current": h.status.current_replicas, "desired": h.status.desired_replicas,
                   "min": h.spec.min_replicas, "max": h.spec.max_replicas}
        except ApiException as exc:
            if exc.status != 404:
                raise
        ready = [p for p in pods if _pod_ready(p)]
        queue = None
        workers = {}
        for p in ready:
            component = (p.metadata.labels or {}).get(COMPONENT)
            if component not in ("gateway", "worker"):
                continue
            metrics = self._metrics(p.metadata.name)
            if metrics is None:
                continue
            if component == "gateway" and GATEWAY_QUEUE in metrics:
                queue = (queue or 0) + metrics[GATEWAY_QUEUE]
            if component == "worker":
                workers[p.metadata.name] = {"waiting": metrics.get(WORKER_WAITING),
                                            "running": metrics.get(WORKER_RUNNING)}
        return {"namespace": self.namespace, "pods": rows, "deployments": deployments, "hpa": hpa,
                "gateway_queue_depth": queue, "workers": workers}

    def _metrics(self, pod: str) -> dict[str, float] | None:
        """A pod's gauges, read from its :9090/metrics through the API server's pod proxy."""
        from kubernetes.client.exceptions import ApiException
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self.core.connect_get_namespaced_pod_proxy_with_path(f"{pod}:{METRICS_PORT}", self.namespace,
                                                                         "metrics")
        except ApiException:
            return None
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels:
                    values[sample.name] = sample.value
        return values


def as_api_body(obj: Any) -> Any:
    """A manifest as the API server would send it back: resource quantities as strings.

    YAML lets `nvidia.com/gpu: 1` be an integer; the API accepts it, but the `kubernetes` client checks a
    request body against its models, where a quantity is a string.
    """
    if isinstance(obj, list):
        return [as_api_body(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    return {k: ({q: str(v) for q, v in value.items()} if k in ("requests", "limits") and isinstance(value, dict)
                else as_api_body(value)) for k, value in obj.items()}


def format_status(s: dict[str, Any]) -> str:
    lines = [f"namespace {s['namespace']}"]
    for d in s["deployments"]:
        lines.append(f"  {d['name']:<22} {d['ready']}/{d['desired']} ready")
    if s["hpa"]:
        h = s["hpa"]
        lines.append(f"  autoscaler: {h['current']} worker(s), wants {h['desired']} (min {h['min']}, max {h['max']})")
    q = s["gateway_queue_depth"]
    lines.append(f"  gateway queue depth: {'unknown (no ready gateway answered /metrics)' if q is None else f'{q:g}'}")
    lines.append("")
    lines.append(f"  {'POD':<44} {'COMPONENT':<10} {'PHASE':<10} {'READY':<6} {'RESTARTS':<8} WAITING/RUNNING")
    for p in s["pods"]:
        w = s["workers"].get(p["name"])
        load = "" if w is None else f"{_num(w['waiting'])}/{_num(w['running'])}"
        lines.append(f"  {p['name']:<44} {p['component']:<10} {p['phase']:<10} {p['ready']:<6} "
                     f"{p['restarts']:<8} {load}")
    if not s["pods"]:
        lines.append("  (no tokenmill pods: kubectl apply -k k8s/overlays/gpu or .../cpu)")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


def _finished(job: Any) -> str | None:
    for c in (job.status.conditions or []) if job.status else []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type
    return None


def _condition_message(job: Any, kind: str) -> str:
    for c in (job.status.conditions or []) if job.status else []:
        if c.type == kind:
            return ": ".join(x for x in (c.reason, c.message) if x) or kind
    return kind


def _container_state(pod: Any, name: str) -> str | None:
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])] \
        if pod.status else []
    for s in statuses:
        if s.name == name and s.state:
            if s.state.terminated:
                return "terminated"
            if s.state.running:
                return "running"
            return "waiting"
    return None


def _pod_note(pod: Any) -> str:
    """One line on where a pod stands: its phase, and why it waits if it does."""
    status = pod.status
    if status is None:
        return "Pending"
    parts = [status.phase or "Pending"]
    for c in status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason:
            parts.append(f"{c.reason}: {c.message or ''}".strip())
    for s in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
        st = s.state
        if st and st.waiting and st.waiting.reason not in (None, "PodInitializing", "ContainerCreating"):
            parts.append(f"{s.name} {st.waiting.reason}: {st.waiting.message or ''}".strip())
        elif st and st.terminated and st.terminated.exit_code != 0:
            parts.append(f"{s.name} exited {st.terminated.exit_code} ({st.terminated.reason or 'Error'})")
    return "; ".join(parts)


def _pod_ready(pod: Any) -> bool:
    return bool(pod.status and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []))
