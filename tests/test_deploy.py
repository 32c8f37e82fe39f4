"""Offline checks of deploy/: no cluster, no Docker daemon, no network.

- Every RayJob / RayCluster under deploy/ (plain files and kustomize renders) validates against the
  KubeRay ray.io/v1 CRD schema, made strict about unknown fields (the API server would silently prune them;
  here a typo in a pod spec is an error).
- Operator rules the schema does not encode (TTL needs shutdown, submission modes, ...), and this project's
  conventions: an idle head (num-cpus "0"), GPU worker groups that scale from zero, nothing exposed outside
  the cluster, no literal secrets, experiment configs that the pipeline accepts and that point at the
  in-cluster MLflow service.
- Deliberately broken manifests are rejected, each for the intended reason.
- The Dockerfile pins the same ray / mlflow / torch as pyproject.toml, uses pinned base images and a
  non-root user.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCKERFILE = DEPLOY / "Dockerfile"
CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}

SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
SECRET_LIKE_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
GPU_RESOURCE = "nvidia.com/gpu"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KNOWN_RESOURCES = {"cpu", "memory", "ephemeral-storage", "storage", GPU_RESOURCE}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 2 MB of YAML


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------

def load_docs(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def is_k8s_object(doc) -> bool:
    return (isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
            and not str(doc["apiVersion"]).startswith("kustomize.config.k8s.io"))


def deploy_manifests() -> list[tuple[str, dict]]:
    """(label, object) for every Kubernetes object in every YAML file under deploy/."""
    out = []
    for path in yaml_files():
        for i, doc in enumerate(load_docs(path)):
            if is_k8s_object(doc):
                out.append((f"{path.relative_to(REPO)}#{i}:{doc['kind']}/{doc.get('metadata', {}).get('name')}", doc))
    return out


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def pyproject_pins() -> dict[str, tuple[str, str]]:
    """{name: (extras, version)} for the `name[extras]==version` dependencies of pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*==\s*([^\s;,]+)", dep)
        if m:
            pins[m.group(1).lower()] = ((m.group(2) or "").replace(" ", ""), m.group(3))
    return pins


# ------------------------------------------------------------------------------------------------------------
# CRD schemas, made strict
# ------------------------------------------------------------------------------------------------------------

def strictify(schema):
    """Forbid unknown fields: `additionalProperties: false` on every object schema that lists `properties`,
    has no `additionalProperties` of its own and is not `x-kubernetes-preserve-unknown-fields`."""
    if isinstance(schema, dict):
        props = schema.get("properties")
        if isinstance(props, dict):
            if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
            for sub in props.values():
                strictify(sub)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(schema.get(key), dict):
                strictify(schema[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in schema.get(key) or []:
                strictify(sub)
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def validator(kind: str, strict: bool = True):
    schema = copy.deepcopy(crd_schema(kind))
    return jsonschema.Draft4Validator(strictify(schema) if strict else schema)


def crds_available() -> bool:
    return all((CRD_DIR / f).is_file() for f in CRD_FILES.values())


def schema_errors(doc: dict, strict: bool = True) -> list[str]:
    errors = validator(doc["kind"], strict).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def crds():
    if not crds_available():
        pytest.skip(f"KubeRay CRD schemas not found in {CRD_DIR} (the shared reference folder is absent); "
                    "schema validation skipped")
    return validator


# ------------------------------------------------------------------------------------------------------------
# Rules the schema does not encode
# ------------------------------------------------------------------------------------------------------------

def cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    return spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template of a RayJob / RayCluster / Deployment."""
    out = []
    cs = cluster_spec(doc) if doc["kind"] in CRD_FILES else None
    if cs:
        out.append(("head", (cs.get("headGroupSpec") or {}).get("template", {}).get("spec") or {}))
        for g in cs.get("workerGroupSpecs") or []:
            out.append((f"worker group {g.get('groupName')}", (g.get("template") or {}).get("spec") or {}))
    if doc["kind"] == "RayJob" and (doc.get("spec") or {}).get("submitterPodTemplate"):
        out.append(("submitter", doc["spec"]["submitterPodTemplate"].get("spec") or {}))
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        out.append((doc["kind"], doc["spec"]["template"]["spec"]))
    return out


def requests_gpus(group: dict) -> bool:
    for c in ((group.get("template") or {}).get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        for section in ("limits", "requests"):
            if str((res.get(section) or {}).get(GPU_RESOURCE, "0")) not in ("0", ""):
                return True
    return False


def ray_version_pin() -> str:
    return pyproject_pins()["ray"][1]


def rule_errors(doc: dict) -> list[str]:
    """KubeRay operator rules outside the CRD schema, plus this project's conventions for Ray clusters."""
    kind, spec, errors = doc["kind"], doc.get("spec") or {}, []
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"submissionMode {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if "ttlSecondsAfterFinished" in spec and spec.get("shutdownAfterJobFinishes") is not True:
            errors.append("ttlSecondsAfterFinished is set but shutdownAfterJobFinishes is not true")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("ttlSecondsAfterFinished must not be negative")
        if spec.get("deletionStrategy") and spec.get("shutdownAfterJobFinishes"):
            errors.append("deletionStrategy cannot be combined with shutdownAfterJobFinishes")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit must not be negative")
        if spec.get("clusterSelector") and spec.get("rayClusterSpec"):
            errors.append("clusterSelector and rayClusterSpec are mutually exclusive")
        if not spec.get("clusterSelector") and not spec.get("rayClusterSpec"):
            errors.append("one of clusterSelector or rayClusterSpec is required")
        if spec.get("clusterSelector") and spec.get("shutdownAfterJobFinishes"):
            errors.append("shutdownAfterJobFinishes cannot delete a cluster chosen by clusterSelector")
        submitter = spec.get("submitterPodTemplate") or spec.get("submitterConfig")
        if mode in SUBMISSION_MODES - {"K8sJobMode"} and submitter:
            errors.append(f"submitterPodTemplate / submitterConfig only apply to K8sJobMode, not {mode}")
        if mode in SUBMISSION_MODES - {"InteractiveMode"} and not spec.get("entrypoint"):
            errors.append(f"entrypoint is required in {mode}")
        if (spec.get("submitterPodTemplate") or {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
            errors.append("submitterPodTemplate restartPolicy must be Never")
        for key in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources"):
            if key in spec:  # would move the driver off the head, where /configs is mounted
                errors.append(f"{key} is set: the driver must run on the head, which mounts /configs")
    cs = cluster_spec(doc)
    if kind in CRD_FILES and cs:
        head = cs.get("headGroupSpec") or {}
        params = head.get("rayStartParams") or {}
        if params.get("num-cpus") != "0":
            errors.append('head rayStartParams num-cpus must be "0" (no work on the head), '
                          f'got {params.get("num-cpus")!r}')
        if str(params.get("dashboard-host", "0.0.0.0")) in LOOPBACK:
            errors.append("head dashboard-host is loopback: the submitter and autoscaler could not reach it")
        if not (head.get("template") or {}).get("spec", {}).get("containers"):
            errors.append("head template has no containers")
        if str(cs.get("rayVersion")) != ray_version_pin():
            errors.append(f"rayVersion {cs.get('rayVersion')!r} differs from pyproject's ray=={ray_version_pin()}")
        names = [g.get("groupName") for g in cs.get("workerGroupSpecs") or []]
        if len(names) != len(set(names)):
            errors.append(f"worker group names are not unique: {names}")
        for g in cs.get("workerGroupSpecs") or []:
            name, lo, hi = g.get("groupName"), g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            if lo > hi:
                errors.append(f"worker group {name}: minReplicas {lo} > maxReplicas {hi}")
            if "replicas" in g and not lo <= g["replicas"] <= hi:
                errors.append(f"worker group {name}: replicas {g['replicas']} outside [{lo}, {hi}]")
            if requests_gpus(g):
                if lo != 0:
                    errors.append(f"GPU worker group {name}: minReplicas must be 0, got {lo}")
                if cs.get("enableInTreeAutoscaling") is not True:
                    errors.append(f"GPU worker group {name} scales from 0 but enableInTreeAutoscaling is not true")
    return errors


def exposure_errors(doc: dict) -> list[str]:
    """Anything that would make a service reachable from outside the cluster."""
    errors = []
    if doc["kind"] == "Service" and (doc.get("spec") or {}).get("type", "ClusterIP") in EXPOSED_SERVICE_TYPES:
        errors.append(f"Service {doc['metadata'].get('name')} has type {doc['spec']['type']}")
    if doc["kind"] in ("Ingress", "Gateway", "HTTPRoute", "Route"):
        errors.append(f"{doc['kind']} {doc['metadata'].get('name')} exposes a service")

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{path}.{k}" if path else k
                if k == "serviceType" and v in EXPOSED_SERVICE_TYPES:
                    errors.append(f"{here} is {v}")
                if k == "headService" and ((v or {}).get("spec") or {}).get("type") in EXPOSED_SERVICE_TYPES:
                    errors.append(f"{here}.spec.type is {v['spec']['type']}")
                if k == "enableIngress" and v is True:
                    errors.append(f"{here} is true")
                if k in ("hostPort", "hostNetwork") and v:
                    errors.append(f"{here} is set")
                walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, "")
    return errors


def secret_errors(doc: dict) -> list[str]:
    """Credentials must come from Secrets: env vars named like *TOKEN*/*SECRET*/*KEY* use valueFrom.secretKeyRef;
    every secretKeyRef is optional (the job runs without them); no Secret objects with data in deploy/."""
    errors = []
    if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
        errors.append(f"Secret {doc['metadata'].get('name')} carries literal data")

    def check_env(env, path):
        for var in env:
            if not isinstance(var, dict):
                continue
            name, ref = str(var.get("name", "")), ((var.get("valueFrom") or {}).get("secretKeyRef"))
            if SECRET_LIKE_NAME.search(name) and ("value" in var or not ref):
                errors.append(f"{path}: {name} must come from valueFrom.secretKeyRef, not a literal")
            if ref is not None and ref.get("optional") is not True:
                errors.append(f"{path}: {name} secretKeyRef {ref.get('name')}/{ref.get('key')} is not optional")

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{path}.{k}" if path else k
                if k == "env" and isinstance(v, list):
                    check_env(v, here)
                if k == "runtimeEnvYAML" and isinstance(v, str):
                    env_vars = (yaml.safe_load(v) or {}).get("env_vars") or {}
                    errors.extend(f"{here}: env_vars.{n} is a literal credential"
                                  for n in env_vars if SECRET_LIKE_NAME.search(n))
                walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, "")
    return errors


def resource_name_errors(doc: dict) -> list[str]:
    """Container requests/limits are free-form maps in the schema; a misspelt resource name (`memori`,
    `nvidia.com/gpus`) would be accepted there and never scheduled as meant."""
    errors = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{path}.{k}" if path else k
                if k == "resources" and isinstance(v, dict):
                    for section in ("limits", "requests"):
                        for name in (v.get(section) or {}) if isinstance(v.get(section), dict) else ():
                            if name not in KNOWN_RESOURCES and not name.startswith("hugepages-"):
                                errors.append(f"{here}.{section}: unknown resource name {name!r}")
                walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, "")
    return errors


def all_problems(doc: dict, with_schema: bool) -> list[str]:
    problems = rule_errors(doc) + exposure_errors(doc) + secret_errors(doc) + resource_name_errors(doc)
    if with_schema and doc["kind"] in CRD_FILES:
        problems += schema_errors(doc)
    return problems


# ------------------------------------------------------------------------------------------------------------
# A small kustomize renderer for the features deploy/ uses (resources, namespace, configMapGenerator,
# JSON 6902 patches); `kubectl kustomize` is used as well where it is installed.
# ------------------------------------------------------------------------------------------------------------

KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator",
                  "configurations", "images", "patches"}


def _json_pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_json_patch(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = _json_pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
        elif op["op"] == "replace":
            if isinstance(node, dict):
                assert key in node, f"patch replaces missing {op['path']}"
            node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"unsupported JSON patch op {op['op']!r}")


def render(kdir: Path) -> list[dict]:
    """Render a kustomization as far as these tests need (no name hashes, no image rewrites)."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZE_KEYS
    assert not unknown, f"{kdir}: kustomization fields {unknown} are not understood by the test renderer"
    docs: list[dict] = []
    for res in k.get("resources") or []:
        path = (kdir / res).resolve()
        docs += render(path) if path.is_dir() else [d for d in load_docs(path) if is_k8s_object(d)]
    for gen in k.get("configMapGenerator") or []:
        data = {}
        for f in gen.get("files") or []:
            key, _, rel = f.rpartition("=")
            data[key or Path(rel).name] = (kdir / rel).read_text()
        existing = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == gen["name"]]
        behavior, metadata = gen.get("behavior", "create"), {"name": gen["name"]}
        if behavior in ("replace", "merge"):
            assert existing, f"{kdir}: configMapGenerator {behavior}s {gen['name']}, which the base lacks"
            metadata = copy.deepcopy(existing[0]["metadata"])
            data = (existing[0]["data"] | data) if behavior == "merge" else data
            docs.remove(existing[0])
        else:
            assert not existing, f"{kdir}: ConfigMap {gen['name']} generated twice"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for patch in k.get("patches") or []:
        ops = yaml.safe_load((kdir / patch["path"]).read_text() if "path" in patch else patch["patch"])
        assert isinstance(ops, list), f"{kdir}: only JSON 6902 patches are rendered here"
        target = patch["target"]
        hits = [d for d in docs if d["kind"] == target.get("kind")
                and d["metadata"].get("name") == target.get("name", d["metadata"].get("name"))]
        assert hits, f"{kdir}: patch target {target} matches nothing"
        for d in hits:
            apply_json_patch(d, ops)
    if k.get("namespace"):
        for d in docs:
            if d["kind"] == "Namespace":
                d["metadata"]["name"] = k["namespace"]
            else:
                d["metadata"]["namespace"] = k["namespace"]
    return docs


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def kustomize_build(kdir: Path) -> list[dict]:
    cmd = kustomize_command()
    proc = subprocess.run([*cmd, str(kdir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} {kdir} failed:\n{proc.stderr}"
    return [d for d in yaml.load_all(proc.stdout, Loader=_Loader) if d is not None]


def find(docs, kind, name=None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]


def base_rayjob() -> dict:
    (job,) = find(load_docs(KUBERAY / "base" / "rayjob.yaml"), "RayJob")
    return copy.deepcopy(job)


MANIFESTS = deploy_manifests()
RAY_MANIFESTS = [(label, doc) for label, doc in MANIFESTS if doc["kind"] in CRD_FILES]
KDIRS = kustomization_dirs()


def _ids(items):
    return [label for label, _ in items]


# ------------------------------------------------------------------------------------------------------------
# The manifests as written
# ------------------------------------------------------------------------------------------------------------

def test_deploy_tree_has_the_expected_manifests():
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {"RayJob", "RayCluster", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds, kinds
    assert KUBERAY / "overlays" / "gpu-example" in KDIRS and KUBERAY / "base" in KDIRS


@pytest.mark.parametrize(("label", "doc"), RAY_MANIFESTS, ids=_ids(RAY_MANIFESTS))
def test_ray_manifest_matches_strict_crd_schema(crds, label, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []


@pytest.mark.parametrize(("label", "doc"), MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_follows_operator_rules_and_conventions(label, doc):
    assert all_problems(doc, with_schema=False) == []


def test_rayjob_shape():
    spec = base_rayjob()["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] == 0
    assert re.fullmatch(r"sae-seeds run /configs/experiment\.yaml --output /data/outputs/[\w.-]+", spec["entrypoint"])
    cs = spec["rayClusterSpec"]
    assert cs["enableInTreeAutoscaling"] is True
    assert any(requests_gpus(g) for g in cs["workerGroupSpecs"]), "no GPU worker group"


def _mounts(pod_spec: dict) -> dict[str, dict]:
    """mountPath -> volume of the first container."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    return {m["mountPath"]: volumes[m["name"]] for m in pod_spec["containers"][0].get("volumeMounts") or []}


@pytest.mark.parametrize(("label", "doc"), RAY_MANIFESTS, ids=_ids(RAY_MANIFESTS))
def test_every_ray_node_mounts_the_shared_volume(label, doc):
    (pvc,) = find(load_docs(KUBERAY / "base" / "storage.yaml"), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "all nodes write the same tree"
    for where, pod in pod_specs(doc):
        if where == "submitter":
            continue
        data = _mounts(pod).get("/data")
        assert data and data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], where
        env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
        assert {"MLFLOW_TRACKING_URI", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), where
        assert (pod.get("securityContext") or {}).get("runAsNonRoot") is True, where


def test_rayjob_head_mounts_the_experiment_configmap():
    head = dict(pod_specs(base_rayjob()))["head"]
    configs = _mounts(head).get("/configs")
    assert configs and configs["configMap"]["name"] == "sae-seeds-experiment"


def test_mlflow_server_is_internal_and_lean():
    docs = load_docs(KUBERAY / "base" / "mlflow.yaml")
    (dep,) = find(docs, "Deployment", "mlflow")
    (svc,) = find(docs, "Service", "mlflow")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    for flag in ("mlflow server", "--host 0.0.0.0", "--port 5000", "--backend-store-uri", "--artifacts-destination"):
        assert flag in command, flag
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert svc["spec"]["ports"][0]["port"] == 5000


# ------------------------------------------------------------------------------------------------------------
# Kustomize renders: the base and every overlay
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kdir", KDIRS, ids=[str(p.relative_to(REPO)) for p in KDIRS])
def test_rendered_kustomization_is_valid(kdir):
    docs = render(kdir)
    (job,) = find(docs, "RayJob")
    assert any(requests_gpus(g) for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]), "no GPU worker group"
    with_schema = crds_available()
    for doc in docs:
        assert all_problems(doc, with_schema) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("kdir", KDIRS, ids=[str(p.relative_to(REPO)) for p in KDIRS])
def test_rendered_experiment_is_consistent_with_the_cluster(kdir):
    """The mounted experiment.yaml is accepted by the pipeline, logs to the in-cluster MLflow service, names
    the output folder, and asks for GPUs explicitly (an autoscaled cluster starts with none)."""
    from orchestrator.config import parse_config

    docs = render(kdir)
    (job,) = find(docs, "RayJob")
    head = dict(pod_specs(job))["head"]
    (cm,) = find(docs, "ConfigMap", _mounts(head)["/configs"]["configMap"]["name"])
    cfg = parse_config(yaml.safe_load(cm["data"]["experiment.yaml"]))

    assert job["spec"]["entrypoint"].endswith(f"--output /data/outputs/{cfg.name}"), "output folder != experiment name"

    (svc,) = find(docs, "Service", "mlflow")
    namespace = svc["metadata"]["namespace"]
    expected = f"http://{svc['metadata']['name']}.{namespace}.svc:{svc['spec']['ports'][0]['port']}"
    assert cfg.tracking.tracking_uri == expected
    for where, pod in pod_specs(job):
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env") or []}
        if where != "submitter":
            assert env["MLFLOW_TRACKING_URI"] == expected, where
    (dep,) = find(docs, "Deployment", "mlflow")
    allowed = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert urlparse(expected).netloc in allowed["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","), \
        "MLflow would reject the Host header the Ray pods send"

    gpu_groups = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if requests_gpus(g)]
    if gpu_groups:
        assert cfg.generate.gpus_per_actor and cfg.generate.gpus_per_actor > 0
        assert cfg.train.use_gpu is True


@pytest.mark.skipif(kustomize_command() is None, reason="neither kubectl nor kustomize is installed")
@pytest.mark.parametrize("kdir", KDIRS, ids=[str(p.relative_to(REPO)) for p in KDIRS])
def test_kustomize_build_is_valid_and_matches_the_test_renderer(kdir):
    built = kustomize_build(kdir)
    with_schema = crds_available()
    for doc in built:
        assert all_problems(doc, with_schema) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    ours = render(kdir)
    assert sorted((d["kind"], d["metadata"].get("namespace")) for d in built) == \
        sorted((d["kind"], d["metadata"].get("namespace")) for d in ours)
    (job,), (our_job,) = find(built, "RayJob"), find(ours, "RayJob")
    assert job["spec"]["entrypoint"] == our_job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] == \
        our_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    # The generated (hash-suffixed) ConfigMap name reaches the RayJob's volume.
    (cm,) = find(built, "ConfigMap")
    assert _mounts(dict(pod_specs(job))["head"])["/configs"]["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["data"] == find(ours, "ConfigMap")[0]["data"]


# ------------------------------------------------------------------------------------------------------------
# Broken manifests are rejected, each for the intended reason
# ------------------------------------------------------------------------------------------------------------

def test_the_base_rayjob_passes_everything_the_negative_tests_break():
    assert all_problems(base_rayjob(), with_schema=crds_available()) == []


@pytest.mark.parametrize(("where", "field"), [
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], "nodeSelectr"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0], "resource"),
    (lambda j: j["spec"]["submitterPodTemplate"]["spec"], "restartPolicyy"),
], ids=["pod-spec", "container", "submitter-pod-spec"])
def test_unknown_field_in_pod_spec_is_rejected(crds, where, field):
    job = base_rayjob()
    where(job)[field] = {"oops": "1"}
    errors = schema_errors(job)
    assert errors and all(f"'{field}' was unexpected" in e for e in errors), errors
    # Strictness is what catches it: the CRD schema as published accepts (and the API server would prune) it.
    assert schema_errors(job, strict=False) == []


def test_wrong_type_in_ray_start_params_is_rejected(crds):
    job = base_rayjob()
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be the string "0"
    errors = schema_errors(job)
    assert errors and all("rayStartParams.num-cpus" in e and "is not of type 'string'" in e for e in errors), errors


def _mutate(fn):
    job = base_rayjob()
    fn(job)
    return job


NEGATIVE_RULES = {
    "ttl-without-shutdown": (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished"),
    "ttl-shutdown-omitted": (lambda j: j["spec"].pop("shutdownAfterJobFinishes"), "ttlSecondsAfterFinished"),
    "bad-submission-mode": (lambda j: j["spec"].update(submissionMode="K8sJob"), "submissionMode"),
    "lowercase-submission-mode": (lambda j: j["spec"].update(submissionMode="httpmode"), "submissionMode"),
    "deletion-strategy-with-shutdown": (
        lambda j: j["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"},
                                                     "onFailure": {"policy": "DeleteNone"}}),
        "deletionStrategy"),
    "head-does-work": (
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "4"}),
        "num-cpus"),
    "head-num-cpus-missing": (
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    "gpu-group-never-scales-to-zero": (
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=1, replicas=1),
        "minReplicas must be 0"),
    "gpu-group-without-autoscaler": (
        lambda j: j["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    "loopback-dashboard": (
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"dashboard-host": "127.0.0.1"}), "dashboard-host"),
    "ray-version-drift": (lambda j: j["spec"]["rayClusterSpec"].update(rayVersion="2.9.0"), "rayVersion"),
    "driver-moved-off-head": (lambda j: j["spec"].update(entrypointNumCpus=1), "entrypointNumCpus"),
}


@pytest.mark.parametrize("case", list(NEGATIVE_RULES))
def test_operator_rule_violation_is_rejected(case):
    mutate, fragment = NEGATIVE_RULES[case]
    job = _mutate(mutate)
    errors = all_problems(job, with_schema=False)
    assert errors and all(fragment in e for e in errors), errors
    # The schema alone does not catch these: that is why the rules exist.
    if crds_available():
        assert schema_errors(job) == []


NEGATIVE_EXPOSURE = {
    "head-loadbalancer": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
    "head-nodeport": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="NodePort"),
    "head-ingress": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(enableIngress=True),
    "host-port": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "ports"][1].update(hostPort=8265),
}


@pytest.mark.parametrize("case", list(NEGATIVE_EXPOSURE))
def test_exposed_ray_head_is_rejected(case):
    job = _mutate(NEGATIVE_EXPOSURE[case])
    errors = exposure_errors(job)
    assert errors and rule_errors(job) == [] and secret_errors(job) == [], errors


@pytest.mark.parametrize("svc_type", sorted(EXPOSED_SERVICE_TYPES))
def test_exposed_service_is_rejected(svc_type):
    (svc,) = find(load_docs(KUBERAY / "base" / "mlflow.yaml"), "Service", "mlflow")
    svc = copy.deepcopy(svc)
    assert exposure_errors(svc) == []
    svc["spec"]["type"] = svc_type
    assert exposure_errors(svc) == [f"Service mlflow has type {svc_type}"]


NEGATIVE_SECRETS = {
    "literal-hf-token": lambda env: env.__setitem__(
        next(i for i, e in enumerate(env) if e["name"] == "HF_TOKEN"), {"name": "HF_TOKEN", "value": "hf_abc"}),
    "literal-aws-secret": lambda env: env.__setitem__(
        next(i for i, e in enumerate(env) if e["name"] == "AWS_SECRET_ACCESS_KEY"),
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}),
    "new-literal-api-key": lambda env: env.append({"name": "WANDB_API_KEY", "value": "abc"}),
}


@pytest.mark.parametrize("case", list(NEGATIVE_SECRETS))
def test_literal_secret_is_rejected(case):
    job = base_rayjob()
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    NEGATIVE_SECRETS[case](worker["env"])
    errors = secret_errors(job)
    assert errors and all("must come from valueFrom.secretKeyRef" in e for e in errors), errors
    assert rule_errors(job) == [] and exposure_errors(job) == []


@pytest.mark.parametrize("name", ["memori", "nvidia.com/gpus", "gpu"])
def test_misspelt_resource_name_is_rejected(name):
    job = base_rayjob()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"][name] = 1
    errors = all_problems(job, with_schema=False)
    assert errors and all(f"unknown resource name {name!r}" in e for e in errors), errors
    if crds_available():  # a free-form map in the schema: only the name check catches it
        assert schema_errors(job) == []


def test_literal_secret_object_is_rejected():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sae-seeds-hf"}, "stringData": {"token": "x"}}
    assert secret_errors(secret) == ["Secret sae-seeds-hf carries literal data"]


def test_overlay_patch_guard_rejects_a_reordered_base():
    """The overlay's JSON patch checks it edits the GPU group; a base whose first group is not `gpu` fails."""
    ops = yaml.safe_load((KUBERAY / "overlays" / "gpu-example" / "rayjob-patch.yaml").read_text())
    job = base_rayjob()
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    groups.reverse()
    with pytest.raises(AssertionError, match="patch test failed"):
        apply_json_patch(job, ops)


# ------------------------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerfile_args(instructions) -> dict[str, str]:
    args = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name.strip(), value.strip().strip('"'))
    return args


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def _is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.split(":", 1)[1] not in ("", "latest")


@pytest.fixture(scope="module")
def dockerfile():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    return instructions, dockerfile_args(instructions)


def test_dockerfile_from_images_are_pinned(dockerfile):
    instructions, args = dockerfile
    assert args.get("VARIANT") == "cuda", "VARIANT must default to cuda"
    stages, bases = set(), {}
    for variant in ("cpu", "cuda"):
        values = args | {"VARIANT": variant}
        stages.clear()
        for instr, rest in instructions:
            if instr == "FROM":
                tokens = [t for t in rest.split() if not t.startswith("--")]
                image = _expand(tokens[0], values)
                assert "$" not in image, f"unresolved FROM {tokens[0]}"
                assert image in stages or _is_pinned(image), f"FROM {image} is not pinned to a tag"
                if len(tokens) >= 3 and tokens[1].lower() == "as":
                    stages.add(tokens[2])
                    bases[tokens[2]] = image
            if instr in ("COPY", "ADD"):
                for flag in re.findall(r"--from=(\S+)", rest):
                    ref = _expand(flag, values)
                    assert ref in stages or _is_pinned(ref), f"{instr} --from={ref} is not pinned"
    assert bases["base-cpu"].startswith("python:3.11"), bases
    assert bases["base-cuda"].startswith("nvidia/cuda:") and "runtime" in bases["base-cuda"], bases
    assert any(i == "FROM" and "${VARIANT}" in r for i, r in instructions), "final stage must follow VARIANT"


def test_dockerfile_runs_as_non_root(dockerfile):
    instructions, _ = dockerfile
    users = [rest.split()[0] for instr, rest in instructions if instr == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), users[-1]
    assert any(i == "WORKDIR" for i, _ in instructions)


def test_dockerfile_pins_match_pyproject(dockerfile):
    instructions, args = dockerfile
    pins = pyproject_pins()
    constraints = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    run = " ".join(_expand(rest, args) for instr, rest in instructions if instr == "RUN")
    found = {m.group(1): ((m.group(2) or ""), m.group(3))
             for m in re.finditer(r"\b(ray|mlflow|torch)(\[[^\]]*\])?==([0-9][\w.+]*)", run)}
    for name in ("ray", "mlflow", "torch"):
        assert name in found, f"Dockerfile does not pin {name}"
        assert found[name][1] == pins[name][1] == constraints[name], (name, found[name], pins[name])
    assert found["ray"][0] == pins["ray"][0] == "[default,data,train]"
    assert "pip install -c constraints.txt ." in run
    assert "download.pytorch.org/whl/cpu" in run, "cpu variant must use the CPU torch wheels"


def test_dockerfile_bakes_in_no_secrets(dockerfile):
    instructions, _ = dockerfile
    for instr, rest in instructions:
        if instr in ("ENV", "ARG"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]:
                assert not SECRET_LIKE_NAME.search(name), f"{instr} {name}: credentials must not be baked in"
        if instr in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|credentials|\.netrc|id_rsa|\.aws|\.cache/huggingface", rest), rest
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore and ignore[[l.strip() for l in ignore].index("*")] == "*", "context should be an allow-list"
