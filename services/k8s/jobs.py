"""Build Job objects from the manifests in k8s/jobs (the YAML is loaded, never re-typed here).

`render(dir)` reads a kustomization the way `kubectl kustomize` does, for the part of kustomize that
k8s/jobs uses: `resources` (files and folders), `namespace`, `images` and `patches` with a target and
inline JSON6902 operations. Anything else in a kustomization is refused with an error rather than
half-understood; tests/test_k8s_launcher.py checks that the output equals kustomize's own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# The phases of `tokenmill bench <phase>` (bench/); `all` runs every phase.
BENCH_PHASES = ("kv-cache", "batching", "sliding-window", "attention", "paged-memory", "speculative",
                "quantization", "attention-variants", "engine", "compare")
JOB_NAMES = {"bench": "tokenmill-bench", "loadtest": "tokenmill-loadtest", "eval": "tokenmill-eval"}
TARGETS = (*BENCH_PHASES, "all", "loadtest", "eval")
OVERLAYS = {"gpu": ".", "cpu": "cpu"}  # overlay -> folder under k8s/jobs
RUN_CONTAINER = "run"  # the init container that does the work
RESULTS_CONTAINER = "results"  # prints /results/<job name> as a base64 tar.gz once `run` succeeded

_SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                   "CustomResourceDefinition", "PriorityClass"}


class KustomizeError(ValueError):
    pass


def default_jobs_dir() -> Path:
    """k8s/jobs of this checkout; else ./k8s/jobs (an installed package carries no manifests)."""
    repo = Path(__file__).resolve().parents[2] / "k8s" / "jobs"
    return repo if repo.is_dir() else Path.cwd() / "k8s" / "jobs"


# ---- a small kustomize -------------------------------------------------------------------------
def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize <directory>` prints, for the subset of kustomize described above."""
    path = Path(directory) / "kustomization.yaml"
    if not path.exists():
        raise KustomizeError(f"{path} does not exist")
    kust = yaml.safe_load(path.read_text()) or {}
    unknown = set(kust) - _SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: the launcher does not understand {sorted(unknown)}; "
                             f"keep to {sorted(_SUPPORTED)} or extend services/k8s/jobs.py")
    objects: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        target = Path(directory) / res
        if target.is_dir():
            objects += render(target)
        else:
            objects += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    for patch in kust.get("patches", []):
        _apply_patch(objects, patch, path)
    for image in kust.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    if "namespace" in kust:
        for obj in objects:
            if obj.get("kind") not in _CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return objects


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any], where: Path) -> None:
    if set(patch) != {"target", "patch"}:
        raise KustomizeError(f"{where}: only patches with `target` and an inline JSON6902 `patch` are supported")
    target = patch["target"]
    if set(target) - {"kind", "name"}:
        raise KustomizeError(f"{where}: patch targets may only name kind and name, not {sorted(target)}")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: a patch must be a list of JSON6902 operations")
    matched = [o for o in objects
               if ("kind" not in target or o.get("kind") == target["kind"])
               and ("name" not in target or o.get("metadata", {}).get("name") == target["name"])]
    if not matched:
        raise KustomizeError(f"{where}: patch target {target} matches no object")
    for obj in matched:
        for op in ops:
            json_patch(obj, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, remove, replace) in place."""
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    kind = op["op"]
    if isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind == "remove":
            del node[int(last)]
        elif kind == "replace":
            node[int(last)] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"unsupported JSON6902 op {kind!r}")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in node:
            raise KustomizeError(f"replace: {op['path']} does not exist")
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        if last not in node:
            raise KustomizeError(f"remove: {op['path']} does not exist")
        del node[last]
    else:
        raise KustomizeError(f"unsupported JSON6902 op {kind!r}")


def split_image(image: str) -> tuple[str, str, str]:
    """name, tag, digest of an image reference (a registry port is part of the name)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
    if obj.get("kind") == "CronJob":
        pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _set_image(obj: dict[str, Any], image: dict[str, Any]) -> None:
    for c in _containers(obj):
        if "image" not in c:
            continue
        name, tag, digest = split_image(c["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            c["image"] = f"{name}@{image['digest']}"
        elif "newTag" in image:
            c["image"] = f"{name}:{image['newTag']}"
        else:
            c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# ---- Jobs ----------------------------------------------------------------------------------------
def overlay_dir(overlay: str, jobs_dir: Path | None = None) -> Path:
    if overlay not in OVERLAYS:
        raise ValueError(f"unknown overlay {overlay!r}: use {' or '.join(OVERLAYS)}")
    return (jobs_dir or default_jobs_dir()) / OVERLAYS[overlay]


def job_kind(target: str) -> str:
    if target in BENCH_PHASES or target == "all":
        return "bench"
    if target in ("loadtest", "eval"):
        return target
    raise ValueError(f"unknown job {target!r}: use a bench phase ({', '.join(BENCH_PHASES)}), all, loadtest or eval")


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
            return obj
    raise KeyError(f"no {kind} {name} in the rendered manifests")


def container(job: dict[str, Any], name: str) -> dict[str, Any]:
    for c in _containers(job):
        if c["name"] == name:
            return c
    raise KeyError(f"Job {job['metadata']['name']} has no container {name!r}")


def build_job(target: str, *, overlay: str = "gpu", jobs_dir: Path | None = None, namespace: str | None = None,
              run_id: str | None = None, image: str | None = None,
              extra_args: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Job for `target` and the PersistentVolumeClaims of the same manifests.

    With no run_id/namespace/image/extra_args, `all`, `loadtest` and `eval` give exactly the Job that
    k8s/jobs renders; a single phase differs only in the word after `bench` and in the name.
    """
    kind = job_kind(target)
    objects = render(overlay_dir(overlay, jobs_dir))
    job = copy.deepcopy(find(objects, "Job", JOB_NAMES[kind]))
    pvcs = [copy.deepcopy(o) for o in objects if o.get("kind") == "PersistentVolumeClaim"]
    run = container(job, RUN_CONTAINER)
    name = JOB_NAMES[kind]
    if kind == "bench":
        args = run["args"]
        args[args.index("bench") + 1] = target
        if target != "all":
            name = f"{name}-{target}"
    if run_id:
        name = f"{name}-{run_id}"
    if len(name) > 63:
        raise ValueError(f"Job name {name!r} is longer than 63 characters")
    job["metadata"]["name"] = name
    if namespace:
        for obj in (job, *pvcs):
            obj["metadata"]["namespace"] = namespace
    if image:
        for c in _containers(job):
            c["image"] = image
    if extra_args:
        run["args"] = [*run["args"], *extra_args]
    return job, pvcs


def claim_names(job: dict[str, Any]) -> list[str]:
    volumes = job["spec"]["template"]["spec"].get("volumes", [])
    return [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
