"""The deploy files are checked, offline: every Kubernetes manifest against the Kubernetes schemas
(kubernetes-validate carries them), the KEDA ScaledObjects against KEDA's documented fields, the
compose file and the manifests against the Dockerfile's targets and the parley CLI, and the
Grafana dashboard against the series the code defines."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import fields
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from core import metrics as M
from core.config import Config
from parley.cli import build_parser
from schemas.streams import STAGES, Keys
from workers.registry import specs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
METRICS_PORT = 9100

# ---------------------------------------------------------------- KEDA, from its documentation
# ScaledObject spec (keda.sh/v1alpha1, "ScaledObject specification") and the redis-streams /
# redis-cluster-streams trigger parameters.
SO_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
           "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
           "triggers"}
SO_TARGET = {"apiVersion", "kind", "name", "envSourceContainerName"}
SO_ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig",
               "scalingModifiers"}
SO_HPA = {"name", "behavior"}
SO_FALLBACK = {"failureThreshold", "replicas", "behavior"}
TRIGGER = {"type", "metadata", "name", "useCachedMetrics", "authenticationRef", "metricType"}
REDIS_STREAMS = {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
                 "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
                 "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
                 "enableTLS", "unsafeSsl", "databaseIndex"}
REDIS_CLUSTER_STREAMS = (REDIS_STREAMS - {"address", "host", "port", "addressFromEnv",
                                          "hostFromEnv", "portFromEnv", "databaseIndex"}) | {
    "addresses", "hosts", "ports", "addressesFromEnv", "hostsFromEnv", "portsFromEnv"}
COUNTS = ("pendingEntriesCount", "streamLength", "lagCount")


def keda_problems(obj: dict) -> list[str]:
    """What KEDA would reject or ignore in a ScaledObject ([] when none)."""
    bad = []
    if obj.get("apiVersion") != "keda.sh/v1alpha1" or obj.get("kind") != "ScaledObject":
        return [f"not a keda.sh/v1alpha1 ScaledObject: {obj.get('apiVersion')}/{obj.get('kind')}"]
    if not obj.get("metadata", {}).get("name"):
        bad.append("metadata.name missing")
    spec = obj.get("spec") or {}
    bad += [f"spec.{k}: unknown field" for k in set(spec) - SO_SPEC]
    target = spec.get("scaleTargetRef") or {}
    bad += [f"scaleTargetRef.{k}: unknown field" for k in set(target) - SO_TARGET]
    if not target.get("name"):
        bad.append("scaleTargetRef.name is mandatory")
    for k in ("pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
              "minReplicaCount", "maxReplicaCount"):
        if k in spec and (not isinstance(spec[k], int) or spec[k] < 0):
            bad.append(f"spec.{k} must be a non-negative integer")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        bad.append("minReplicaCount > maxReplicaCount")
    if "idleReplicaCount" in spec and spec["idleReplicaCount"] >= lo:
        bad.append("idleReplicaCount must be less than minReplicaCount")
    adv = spec.get("advanced") or {}
    bad += [f"advanced.{k}: unknown field" for k in set(adv) - SO_ADVANCED]
    bad += [f"advanced.horizontalPodAutoscalerConfig.{k}: unknown field"
            for k in set(adv.get("horizontalPodAutoscalerConfig") or {}) - SO_HPA]
    fb = spec.get("fallback")
    if fb is not None:
        bad += [f"fallback.{k}: unknown field" for k in set(fb) - SO_FALLBACK]
        bad += [f"fallback.{k} is mandatory" for k in ("failureThreshold", "replicas")
                if k not in fb]
    triggers = spec.get("triggers")
    if not triggers:
        bad.append("spec.triggers: at least one trigger")
    for i, t in enumerate(triggers or []):
        bad += [f"triggers[{i}]: {p}" for p in _trigger_problems(t)]
    return bad


def _trigger_problems(t: dict) -> list[str]:
    bad = [f"{k}: unknown field" for k in set(t) - TRIGGER]
    meta = t.get("metadata") or {}
    known = {"redis-streams": REDIS_STREAMS, "redis-cluster-streams": REDIS_CLUSTER_STREAMS}
    if t.get("type") not in known:
        return [*bad, f"type {t.get('type')!r}: only the redis stream scalers are checked"]
    bad += [f"metadata.{k}: not a {t['type']} parameter" for k in set(meta) - known[t["type"]]]
    bad += [f"metadata.{k}: values are strings" for k, v in meta.items() if not isinstance(v, str)]
    if not meta.get("stream"):
        bad.append("metadata.stream is required")
    if t["type"] == "redis-streams":
        if not (meta.get("address") or meta.get("addressFromEnv") or meta.get("host")
                or meta.get("hostFromEnv")):
            bad.append("metadata: address (or host and port) is required")
    elif not (meta.get("addresses") or meta.get("addressesFromEnv") or meta.get("hosts")):
        bad.append("metadata: addresses (or hosts and ports) is required")
    counts = [k for k in COUNTS if k in meta]
    if len(counts) != 1:
        bad.append(f"metadata: exactly one of {', '.join(COUNTS)} (found {counts})")
    for k in (*COUNTS, "activationLagCount", "databaseIndex"):
        if k in meta and not str(meta[k]).isdigit():
            bad.append(f"metadata.{k} must be a whole number")
    if ("lagCount" in meta or "pendingEntriesCount" in meta) and not meta.get("consumerGroup"):
        bad.append("metadata.consumerGroup is required with lagCount/pendingEntriesCount")
    if "activationLagCount" in meta and "lagCount" not in meta:
        bad.append("metadata.activationLagCount only applies with lagCount")
    return bad


# ---------------------------------------------------------------- helpers

def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def dockerfile_targets() -> dict[str, dict]:
    """target -> {"cmd": [...], "env": {...}} (env and CMD inherited from the stage it is FROM)."""
    targets: dict[str, dict] = {}
    current = None
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if m := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I):
            parent = targets.get(m[1], {"cmd": [], "env": {}, "copy": []})
            current = targets[m[2]] = {"cmd": list(parent["cmd"]), "env": dict(parent["env"]),
                                       "copy": list(parent["copy"])}
        elif current is None:
            continue
        elif line.startswith("CMD "):
            current["cmd"] = json.loads(line[4:])
        elif line.startswith("ENV "):
            current["env"].update(dict(kv.split("=", 1) for kv in shlex.split(line[4:])))
        elif line.startswith("COPY "):
            current["copy"].append(line.split()[1])
    return targets


def check_env_name(name: str) -> None:
    """PARLEY_<SECTION>_<FIELD> names a real setting (Config.load ignores unknown ones)."""
    if name in ("PARLEY_REDIS_URL", "PARLEY_CONFIG", "PARLEY_LOG_LEVEL"):
        return
    cfg = Config()
    names = {f"PARLEY_{s.name.upper()}_{f.name.upper()}"
             for s in fields(cfg) for f in fields(getattr(cfg, s.name))}
    assert name in names, f"{name} is not a setting (core/config.py)"


def check_command(args: list[str], target: str) -> None:
    """The args parse with the real CLI and run what the image is for."""
    parsed = build_parser().parse_args(args)
    stage = target.removesuffix("-gpu")
    if stage == "gateway":
        assert parsed.cmd == "gateway", args
    else:
        assert (parsed.cmd, parsed.stage) == ("worker", stage), args


# ---------------------------------------------------------------- Kubernetes

def test_every_manifest_is_valid_kubernetes():
    docs = k8s_docs()
    assert docs
    for name, doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against KEDA's fields below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises with the path
        assert doc["metadata"]["name"], name


def test_manifests_fail_validation_when_wrong():
    """The validator does catch mistakes (an unknown field, a wrong type)."""
    _, deploy = next(d for d in k8s_docs() if d[1]["kind"] == "Deployment")
    bad = json.loads(json.dumps(deploy))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(deploy))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_each_stage_has_probes_grace_budget_and_a_lag_scaler():
    docs = [d for _, d in k8s_docs()]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    drain_s = float(config["PARLEY_WORKER_DRAIN_TIMEOUT_S"])
    assert int(config["PARLEY_METRICS_PORT"]) == METRICS_PORT
    assert config["PARLEY_METRICS_HOST"] == "0.0.0.0"
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    scalers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    targets = dockerfile_targets()
    keys = Keys()
    for name in ["parley-gateway", *(f"parley-{s}" for s in STAGES)]:
        dep = deployments[name]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        target = c["image"].split(":")[0].removeprefix("parley-")
        assert target in targets, c["image"]
        check_command(c["args"], target)
        for e in c.get("env", []):
            check_env_name(e["name"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == METRICS_PORT
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] in ("metrics", METRICS_PORT)
        assert pod["terminationGracePeriodSeconds"] > drain_s, name
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items()
                   for p in pdbs), f"no PodDisruptionBudget covers {name}"
        if name == "parley-gateway":
            continue
        stage = name.removeprefix("parley-")
        so = scalers[name]
        assert keda_problems(so) == [], keda_problems(so)
        assert so["spec"]["scaleTargetRef"]["name"] == name
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert meta["stream"] == keys.jobs(stage) and meta["consumerGroup"] == keys.group(stage)
        assert "lagCount" in meta and "activationLagCount" in meta
        # one queued job must never wait for a pod: see the note on KEDA's activation
        assert so["spec"]["minReplicaCount"] >= 1
    for name in config:
        check_env_name(name)


# the backend each GPU image must run first, and the setting that points it at its model
GPU_BACKEND = {"stt": ("whisperx", "PARLEY_STT_MODEL"),
               "llm": ("vllm", "PARLEY_LLM_VLLM_MODEL"),
               "tts": ("coqui", "PARLEY_TTS_COQUI_MODEL"),
               "lipsync": ("transformer", "PARLEY_LIPSYNC_TRANSFORMER_CHECKPOINT")}


def test_each_heavy_stage_has_a_gpu_variant_on_gpu_nodes():
    """deploy/k8s/gpu/<stage>.yaml: the stage's GPU image (its Dockerfile target installs the
    backend's extra and puts that backend first), one nvidia.com/gpu, scheduled on GPU nodes
    (node selector and the GPU taint's toleration), its model on the read-only models volume,
    and the same probes, grace, disruption budget and lag scaler as the CPU stage."""
    docs = [d for name, d in k8s_docs()]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    drain_s = float(config["PARLEY_WORKER_DRAIN_TIMEOUT_S"])
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scalers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    targets = dockerfile_targets()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    keys = Keys()
    for stage, (backend, model_setting) in GPU_BACKEND.items():
        name = f"parley-{stage}-gpu"
        assert (DEPLOY / "k8s" / "gpu" / f"{stage}.yaml").exists()
        pod = deployments[name]["spec"]["template"]["spec"]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        (c,) = pod["containers"]
        target = c["image"].split(":")[0].removeprefix("parley-")
        assert target == f"{stage}-gpu" and target in targets, c["image"]
        check_command(c["args"], target)
        first = targets[target]["env"][f"PARLEY_{stage.upper()}_BACKENDS"].split(",")[0]
        assert first == backend, (target, first)
        extra = {"stt": "stt-whisperx", "llm": "llm-vllm", "tts": "tts-coqui",
                 "lipsync": "lipsync-transformer"}[stage]
        assert f'FROM base AS {target}\nRUN pip install --no-cache-dir -e ".[{extra}]"' \
            in dockerfile, target
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
            in pod["tolerations"]
        env = {e["name"]: e["value"] for e in c["env"]}
        for key in env:
            check_env_name(key)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert env[model_setting].startswith(mounts["models"] + "/")
        claim = volumes["models"]["persistentVolumeClaim"]
        assert claim["claimName"] in claims and claim["readOnly"]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["terminationGracePeriodSeconds"] > drain_s
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items()
                   for p in pdbs), f"no PodDisruptionBudget covers {name}"
        so = scalers[name]
        assert keda_problems(so) == [], keda_problems(so)
        assert so["spec"]["scaleTargetRef"]["name"] == name
        meta = so["spec"]["triggers"][0]["metadata"]
        assert meta["stream"] == keys.jobs(stage) and meta["consumerGroup"] == stage
        assert so["spec"]["minReplicaCount"] >= 1
        # a GPU worker batches across sessions: it takes more queued jobs than a CPU one
        cpu = scalers[f"parley-{stage}"]["spec"]["triggers"][0]["metadata"]
        assert int(meta["lagCount"]) > int(cpu["lagCount"])


def test_the_keda_check_catches_mistakes():
    so = next(d for _, d in k8s_docs() if d["kind"] == "ScaledObject")

    def broken(edit) -> list[str]:
        copy = json.loads(json.dumps(so))
        edit(copy)
        return keda_problems(copy)

    meta = lambda o: o["spec"]["triggers"][0]["metadata"]  # noqa: E731
    assert broken(lambda o: o["spec"].update(minReplicas=1))
    assert broken(lambda o: meta(o).pop("stream"))
    assert broken(lambda o: meta(o).update(lagCount=4))
    assert broken(lambda o: meta(o).update(pendingEntriesCount="3"))
    assert broken(lambda o: meta(o).pop("consumerGroup"))
    assert broken(lambda o: meta(o).update(lagThreshold="3"))
    assert broken(lambda o: (meta(o).pop("lagCount"), meta(o).update(streamLength="9")))
    assert broken(lambda o: o["spec"]["scaleTargetRef"].pop("name"))
    assert broken(lambda o: o["spec"].update(minReplicaCount=5, maxReplicaCount=2))


# ---------------------------------------------------------------- Dockerfile and compose

def test_dockerfile_targets_run_parley_commands_with_real_backends():
    targets = dockerfile_targets()
    assert {"gateway", *STAGES, *(f"{s}-gpu" for s in STAGES)} <= set(targets)
    packages = re.search(r'include = \[(.*?)\]', (ROOT / "pyproject.toml").read_text())[1]
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert pkg in targets["base"]["copy"], f"the image lacks the {pkg} package"
    for name, t in targets.items():
        if name == "base":
            continue
        check_command(t["cmd"], name)
        for key, value in t["env"].items():
            check_env_name(key)
            if key.endswith("_BACKENDS"):
                stage = key.split("_")[1].lower()
                known = {s.name for s in specs(stage)}
                assert set(value.split(",")) <= known, (name, value, known)


def test_compose_names_only_built_images_and_real_commands():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    targets = dockerfile_targets()
    services = compose["services"]
    assert {"redis", "gateway", *STAGES} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")  # consumer-group lag: Redis 7+
    for name, svc in services.items():
        if name == "redis":
            continue
        target = svc["build"]["target"]
        assert target in targets and target == name, (name, target)
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        assert svc["image"] == f"parley-{target}:latest"
        check_command(svc["command"], target)
        env = svc["environment"]
        for key in env:
            check_env_name(key)
        assert env["PARLEY_REDIS_URL"].startswith("redis://redis:")
        assert int(env["PARLEY_METRICS_PORT"]) == METRICS_PORT
        assert "9100/readyz" in " ".join(svc["healthcheck"]["test"])
        assert "redis" in svc["depends_on"]
        if target.endswith("-gpu"):
            assert "gpu" in svc["profiles"] and f"gpu-{name[:-4]}" in svc["profiles"]
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"]
        else:
            assert "profiles" not in svc, "CPU services run by default"
    for stage in STAGES:
        assert f"{stage}-gpu" in services, f"a GPU variant of {stage}"


# ---------------------------------------------------------------- Grafana

def test_dashboard_queries_only_series_the_code_defines():
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(parley_[a-z_]+)", e)}
    defined = M.series_names()
    assert used and used <= defined, used - defined
    # and every family appears somewhere on it
    for family in M.families():
        assert any(u.startswith(family) for u in used), f"{family} is on no panel"


def test_docs_list_every_series():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for family, kind in M.families().items():
        name = family + "_total" if kind == "counter" else family
        assert f"`{name}`" in text, f"docs/deploy.md does not list {name}"
