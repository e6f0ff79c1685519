"""One source of defaults: the settings a pod of the CPU overlay runs with are the dataclass defaults in
services/common/config.py -- the ones `tokenmill up` uses on a laptop -- except a short, declared list of
deployment facts (bind address, the ports Kubernetes objects name, DNS discovery, per-pod values).

k8s/base/<service>.env are generated from config.py by `python -m services.k8s.settings --write`;
these tests fail when the files are stale, and check the rendered ConfigMaps end to end.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from k8s_support import effective_env, kustomize, one, pod_template

from services.common.config import SERVICE_CONFIGS, env_name, from_env
from services.k8s import settings

GPU_WORKER = {"model": "Qwen/Qwen2.5-1.5B-Instruct", "quantization": "int4", "device": "cuda", "max_num_seqs": 256,
              "max_num_batched_tokens": 8192}


def test_generated_env_files_are_up_to_date():
    stale = settings.stale_files()
    assert not stale, (f"stale: {[str(p) for p in stale]}: a default in services/common/config.py changed; "
                       "run `python -m services.k8s.settings --write` and commit k8s/base/*.env")


def test_every_override_is_a_real_setting_with_a_reason():
    for service, overrides in settings.K8S_OVERRIDES.items():
        names = {f.name for f in dataclasses.fields(SERVICE_CONFIGS[service])}
        for name, (_value, reason) in overrides.items():
            assert name in names, f"{service}.{name} is not a setting"
            assert len(reason) > 10


def _running_config(objects, service):
    """The config the service process would build inside its pod (ConfigMap + container env)."""
    deployment = one(objects, "Deployment", f"tokenmill-{service}")
    (c,) = pod_template(deployment)["spec"]["containers"]
    env = effective_env(objects, c)
    per_pod = {k for k, v in env.items() if not isinstance(v, str)}  # downward API / Secret: run-time values
    literal = {k: v for k, v in env.items() if isinstance(v, str)}
    return from_env(SERVICE_CONFIGS[service], service, env=literal), per_pod


@pytest.mark.parametrize("service", list(SERVICE_CONFIGS))
def test_cpu_overlay_runs_the_dataclass_defaults(service):
    objects = kustomize("k8s/overlays/cpu")
    config, per_pod = _running_config(objects, service)
    default = SERVICE_CONFIGS[service]()
    overrides = settings.K8S_OVERRIDES[service]
    skipped = settings.NOT_IN_CONFIGMAP[service]
    for f in dataclasses.fields(default):
        name = env_name(service, f.name)
        if name in per_pod:
            assert f.name in skipped, f"{name} is set per pod but not declared in NOT_IN_CONFIGMAP"
            continue
        want = overrides[f.name][0] if f.name in overrides else f.default
        assert getattr(config, f.name) == want, f"{name}: pod runs {getattr(config, f.name)!r}, expected {want!r}"
    # Every per-pod value is declared, and none of them hides an override.
    assert per_pod >= {env_name(service, n) for n in skipped if n in {f.name for f in dataclasses.fields(default)}}


def test_gpu_overlay_changes_only_the_model_settings():
    cpu, gpu = kustomize("k8s/overlays/cpu"), kustomize("k8s/overlays/gpu")
    for service in SERVICE_CONFIGS:
        cpu_config, _ = _running_config(cpu, service)
        gpu_config, _ = _running_config(gpu, service)
        changed = {f.name: getattr(gpu_config, f.name) for f in dataclasses.fields(cpu_config)
                   if getattr(gpu_config, f.name) != getattr(cpu_config, f.name)}
        assert changed == (GPU_WORKER if service == "worker" else {}), service


def test_tokenmill_up_uses_the_same_ports():
    """`tokenmill up` passes its own ports and HTTP port; they are the ones the manifests use."""
    from services.local import up

    params = inspect.signature(up).parameters

    def default(name):
        value = params[name].default
        return getattr(value, "default", value)

    cm = {s: settings.settings(s) for s in SERVICE_CONFIGS}
    assert default("gateway_port") == int(cm["gateway"]["TOKENMILL_GATEWAY_PORT"])
    assert default("worker_port") == int(cm["worker"]["TOKENMILL_WORKER_PORT"])
    assert default("judge_port") == int(cm["judge"]["TOKENMILL_JUDGE_PORT"])
    assert default("http_port") == int(cm["gateway"]["TOKENMILL_GATEWAY_HTTP_PORT"])


def test_settings_check_command(capsys):
    assert settings.main(["--check"]) == 0
    assert settings.main([]) == 0
    assert "TOKENMILL_WORKER_MODEL=smollm2-135m" in capsys.readouterr().out
