"""Helpers for tests/test_k8s*.py: render the kustomizations with the real kubectl, walk pod specs."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RENDERED = ("k8s/overlays/gpu", "k8s/overlays/cpu", "k8s/overlays/gpu-tls", "k8s/jobs", "k8s/jobs/cpu")
WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob", "Pod")


@functools.cache
def _kustomize_text(path: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render the manifests with `kubectl kustomize` "
                    "(kubectl >= 1.27, which bundles kustomize v5). Install kubectl; CI has it.", pytrace=False)
    proc = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{proc.stderr}", pytrace=False)
    return proc.stdout


def kustomize(path: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize <path>` prints (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize_text(path)) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_template(obj)["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def effective_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env (which wins).

    Literal values are strings; valueFrom entries are kept as their dict (they are set at run time).
    """
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(objects, "ConfigMap", ref)["data"])
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else var["valueFrom"]
    return env


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
