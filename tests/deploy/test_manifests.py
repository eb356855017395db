"""deploy/: the KubeRay manifests, the Dockerfile and the deploy README agree with each other, with
KubeRay's CRDs and with this project's pinned versions.

Static checks only: nothing is built or applied here. Each `check_*` function takes the parsed files
and raises AssertionError with a message that names the file and the field; `test_*` runs it on the
real files, and `test_check_fails_on_broken_copy` breaks a copy of them one way per check and expects
that check to fail, so none of them passes vacuously.

Required fields of ray.io/v1 (openAPIV3Schema `required` lists) as read in ray-project/kuberay,
ray-operator/config/crd/bases/ray.io_raycronjobs.yaml at 0074504f (controller-gen v0.16.5; it embeds
the RayJobSpec and RayClusterSpec that ray.io_rayjobs.yaml and ray.io_rayclusters.yaml are generated
from): RayClusterSpec [headGroupSpec]; HeadGroupSpec [template]; WorkerGroupSpec [groupName,
maxReplicas, minReplicas, template]; PodSpec [containers]; Container [name]; RayJobSpec: none.
KubeRay before 1.4.0 also required rayStartParams in both groups (kuberay#3202 made it optional),
so the manifests keep it and the checks require it.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

HEAD_REQUIRED = ["template", "rayStartParams"]
WORKER_REQUIRED = ["groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"]
CLUSTER_REQUIRED = ["headGroupSpec"]
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute"}
QUANTITY_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


@dataclass
class Deploy:
    """Everything under deploy/ that the checks read, parsed once."""

    docs: list[tuple[str, dict[str, Any]]]  # (file relative to the repo, YAML document)
    dockerfile: str
    dockerignore: str
    readme: str
    makefile: str


def load_deploy() -> Deploy:
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((str(path.relative_to(ROOT)), doc))
    read = lambda name: (ROOT / name).read_text(encoding="utf-8")  # noqa: E731
    return Deploy(
        docs,
        read("deploy/Dockerfile"),
        read("deploy/Dockerfile.dockerignore"),
        read("deploy/README.md"),
        read("Makefile"),
    )


@pytest.fixture(scope="module")
def deploy() -> Deploy:
    return load_deploy()


# ------------------------------------------------------------------ walking the manifests


def of_kind(d: Deploy, kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f, doc) for f, doc in d.docs if doc.get("kind") == kind]


def cluster_specs(d: Deploy) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) of every RayCluster and of every RayJob that brings its own cluster."""
    for f, doc in of_kind(d, "RayCluster"):
        yield f"{f}: RayCluster {doc['metadata']['name']}", doc.get("spec") or {}
    for f, doc in of_kind(d, "RayJob"):
        if "rayClusterSpec" in (doc.get("spec") or {}):
            yield f"{f}: RayJob {doc['metadata']['name']} rayClusterSpec", doc["spec"]["rayClusterSpec"]


def groups_of(where: str, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, group) of a cluster spec's head group and worker groups."""
    yield f"{where} headGroupSpec", spec.get("headGroupSpec") or {}
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        yield f"{where} workerGroupSpecs[{i}] ({group.get('groupName')})", group


def ray_groups(d: Deploy) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in cluster_specs(d):
        yield from groups_of(where, spec)


def ray_container(group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, Ray container) of a group: KubeRay runs Ray in the first container."""
    pod = (group.get("template") or {}).get("spec") or {}
    return pod, (pod.get("containers") or [{}])[0]


def ray_pods(d: Deploy) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(where, group, pod spec, Ray container) of every Ray pod template."""
    for where, group in ray_groups(d):
        yield where, group, *ray_container(group)


def all_pod_specs(d: Deploy) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, _, pod, _ in ray_pods(d):
        yield where, pod
    for f, doc in of_kind(d, "Deployment"):
        yield f"{f}: Deployment {doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def quantity(value: Any) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match[2] in QUANTITY_UNITS, f"{value!r} is not a Kubernetes quantity"
    return float(match[1]) * QUANTITY_UNITS[match[2]]


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))


def volume_of(pod: dict[str, Any], mount_path: str, container: dict[str, Any]) -> dict[str, Any] | None:
    names = [m["name"] for m in container.get("volumeMounts") or [] if m.get("mountPath") == mount_path]
    return next((v for v in pod.get("volumes") or [] if names and v.get("name") == names[0]), None)


def rayjob_args(d: Deploy) -> Iterator[tuple[str, list[str]]]:
    for f, doc in of_kind(d, "RayJob"):
        yield (
            f"{f}: RayJob {doc['metadata']['name']}",
            shlex.split((doc.get("spec") or {}).get("entrypoint", "")),
        )


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


# ------------------------------------------------------------------ the checks


def check_documents(d: Deploy) -> None:
    assert d.docs, "no YAML documents under deploy/"
    for f, doc in d.docs:
        for key in ("apiVersion", "kind"):
            assert doc.get(key), f"{f}: a document without {key}"
        assert (doc.get("metadata") or {}).get("name"), f"{f}: {doc['kind']} without metadata.name"
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", (
                f"{f}: {doc['kind']} is {doc['apiVersion']}, not ray.io/v1"
            )


def check_crd_required_fields(d: Deploy) -> None:
    assert list(cluster_specs(d)), "deploy/ has no RayCluster and no RayJob with a rayClusterSpec"
    for where, spec in cluster_specs(d):
        for key in CLUSTER_REQUIRED:
            assert key in spec, f"{where}: the CRD requires spec.{key}"
        for key in HEAD_REQUIRED:
            assert key in spec["headGroupSpec"], f"{where}: headGroupSpec.{key} is required"
        for i, group in enumerate(spec.get("workerGroupSpecs") or []):
            for key in WORKER_REQUIRED:
                assert key in group, f"{where}: workerGroupSpecs[{i}].{key} is required"
    for where, group in ray_groups(d):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (
            f"{where}: rayStartParams values must be strings (quote numbers)"
        )
    for where, pod in all_pod_specs(d):
        assert pod.get("containers"), f"{where}: the pod template needs spec.containers"
        for c in pod["containers"]:
            assert c.get("name") and c.get("image"), f"{where}: every container needs a name and an image"
    for f, doc in of_kind(d, "RayJob"):
        spec = doc.get("spec") or {}
        assert str(spec.get("entrypoint", "")).strip(), f"{f}: a RayJob needs spec.entrypoint"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
            f"{f}: give one of rayClusterSpec (a cluster per job) and clusterSelector (an existing one)"
        )


def check_replicas(d: Deploy) -> None:
    for where, group in ray_groups(d):
        if "groupName" not in group:
            continue
        lo, n, hi = (
            group.get("minReplicas"),
            group.get("replicas", group.get("minReplicas")),
            group.get("maxReplicas"),
        )
        assert all(isinstance(x, int) for x in (lo, n, hi)), f"{where}: replica counts must be integers"
        assert 0 <= lo <= n <= hi, f"{where}: want minReplicas <= replicas <= maxReplicas: {lo}, {n}, {hi}"


def check_resources(d: Deploy) -> None:
    for where, pod in all_pod_specs(d):
        for c in pod["containers"]:
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for name in ("cpu", "memory"):
                    assert name in (res.get(kind) or {}), (
                        f"{where}: {c['name']} needs resources.{kind}.{name}"
                    )
            for name, limit in res["limits"].items():
                request = res["requests"].get(name, limit)
                assert quantity(request) <= quantity(limit), f"{where}: {c['name']}: {name} request > limit"
    for where, group, _, ray in ray_pods(d):
        limit = quantity(ray["resources"]["limits"]["cpu"])
        assert "num-cpus" in group["rayStartParams"], f"{where}: set rayStartParams.num-cpus"
        num_cpus = group["rayStartParams"]["num-cpus"]
        assert float(num_cpus) == limit, f"{where}: num-cpus {num_cpus} != the CPU limit {limit:g}"


def check_versions_and_image(d: Deploy) -> None:
    ray_version = version("ray")
    args = dockerfile_args(d.dockerfile)
    assert args.get("RAY_VERSION") == ray_version, (
        f"deploy/Dockerfile: ARG RAY_VERSION={args.get('RAY_VERSION')}, but .venv runs Ray {ray_version}"
    )
    images = {c["image"] for _, pod in all_pod_specs(d) for c in pod["containers"]}
    pattern = rf"(.+/)?tda-pipelines:[0-9.]+-ray{re.escape(ray_version)}-(cpu|gpu)"
    for image in images:
        assert re.fullmatch(pattern, image), f"image {image!r} is not Ray {ray_version}'s (want {pattern})"
    bases = {re.sub(r"-(cpu|gpu)$", "", image) for image in images}
    assert len(bases) == 1, f"the pods run different builds: {sorted(images)}"
    for where, spec in cluster_specs(d):
        assert str(spec.get("rayVersion")) == ray_version, (
            f"{where}: rayVersion {spec.get('rayVersion')!r}, but the image carries Ray {ray_version}"
        )
    build = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", d.readme)
    pushed = {image.rsplit("/", 1)[-1] for image in images}  # the manifests may name a registry
    assert build and build[1] in pushed, "deploy/README.md: `docker build` tag != the image"


def check_dockerfile(d: Deploy) -> None:
    text, args = d.dockerfile, dockerfile_args(d.dockerfile)
    base = re.search(r"^FROM\s+(\S+)", text, flags=re.M)[1]
    for name, value in args.items():
        base = base.replace(f"${{{name}}}", value)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{version('ray')}-{py}-cpu", (
        f"deploy/Dockerfile: base image {base}, want Ray/Python of .venv"
    )
    make_torch = re.search(r"torch==([0-9][0-9.]*)", d.makefile)[1]
    assert args.get("TORCH_VERSION") == make_torch, (
        f"deploy/Dockerfile: torch {args.get('TORCH_VERSION')}, the Makefile installs torch {make_torch}"
    )
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu", (
        "deploy/Dockerfile: the default torch must be the CPU wheel"
    )
    torch_at = text.find('pip install --no-cache-dir "torch==${TORCH_VERSION}"')
    project_at = text.find("pip install --no-cache-dir -c /tmp/constraints.txt .")
    assert 0 <= torch_at < project_at, "deploy/Dockerfile: install the pinned torch before `pip install .`"
    user = (re.findall(r"^USER\s+(\S+)", text, flags=re.M) or [""])[-1]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), (
        f"deploy/Dockerfile: USER {user!r}, want a non-root uid"
    )
    assert re.search(r"^WORKDIR\s+/\S+", text, flags=re.M), "deploy/Dockerfile: set a WORKDIR"
    assert "/dev/shm" in text, "deploy/Dockerfile: say how /dev/shm is provided"
    assert not re.search(r"^(ENV|ARG)\s+\S*(TOKEN|PASSWORD|SECRET|KEY)\S*=", text, flags=re.M | re.I), (
        "deploy/Dockerfile: no credentials in ENV or ARG"
    )
    ignored = {line.strip() for line in d.dockerignore.splitlines()}
    for pattern in (".venv", "tda-store", ".git"):
        assert pattern in ignored, f"deploy/Dockerfile.dockerignore: add {pattern}"
    assert ignored & {"__pycache__", "**/__pycache__"}, "deploy/Dockerfile.dockerignore: add **/__pycache__"


def check_pods_match_image(d: Deploy) -> None:
    """Every pod runs as the image's user, and Ray runs in the image's WORKDIR, where specs/ is."""
    uid = int(re.findall(r"^USER\s+([0-9]+)", d.dockerfile, flags=re.M)[-1])
    workdir = re.findall(r"^WORKDIR\s+(\S+)", d.dockerfile, flags=re.M)[-1]
    for where, pod in all_pod_specs(d):
        sc = pod.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True, f"{where}: set securityContext.runAsNonRoot: true"
        assert sc.get("runAsUser") == uid, f"{where}: runAsUser {sc.get('runAsUser')} != the image's {uid}"
    for where, _, _, ray in ray_pods(d):
        assert ray.get("workingDir") == workdir, f"{where}: workingDir must be the image's WORKDIR {workdir}"
    assert re.search(r"^COPY .*\bspecs \./specs\b", d.dockerfile, flags=re.M), "deploy/Dockerfile: COPY specs"


def check_store(d: Deploy) -> None:
    claims = of_kind(d, "PersistentVolumeClaim")
    stores = [(f, c) for f, c in claims if "ReadWriteMany" in c["spec"].get("accessModes", [])]
    assert len(stores) == 1, (
        f"want one ReadWriteMany claim for the store, found {[c['metadata']['name'] for _, c in stores]}"
    )
    claim = stores[0][1]["metadata"]["name"]
    paths = set()
    for where, _, pod, ray in ray_pods(d):
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        mounts = [
            m
            for m in ray.get("volumeMounts") or []
            if (volumes.get(m["name"], {}).get("persistentVolumeClaim") or {}).get("claimName") == claim
        ]
        assert mounts, f"{where}: the store claim {claim!r} is not mounted in the Ray container"
        paths.add(mounts[0]["mountPath"])
        store_env = env_of(ray).get("TDA_STORE", {}).get("value")
        assert store_env == mounts[0]["mountPath"], (
            f"{where}: TDA_STORE={store_env} but the store is at {mounts[0]['mountPath']}"
        )
    assert len(paths) == 1, f"the store is mounted at different paths: {sorted(paths)}"
    for where, args in rayjob_args(d):
        assert flag(args, "--store") in paths, f"{where}: --store {flag(args, '--store')} is not in {paths}"


def check_ray_env(d: Deploy) -> None:
    for where, _, _, ray in ray_pods(d):
        value = env_of(ray).get("RAY_USAGE_STATS_ENABLED", {}).get("value")
        assert value == "0", f"{where}: set RAY_USAGE_STATS_ENABLED=0 (got {value!r})"


def check_shm(d: Deploy) -> None:
    for where, group, pod, ray in ray_pods(d):
        volume = volume_of(pod, "/dev/shm", ray)
        assert volume and (volume.get("emptyDir") or {}).get("medium") == "Memory", (
            f"{where}: mount an emptyDir with medium: Memory at /dev/shm (Ray's object store)"
        )
        limit, store = volume["emptyDir"].get("sizeLimit"), group["rayStartParams"].get("object-store-memory")
        if limit and store:
            assert int(store) < quantity(limit), f"{where}: object store {store} > /dev/shm {limit}"
            assert quantity(limit) < quantity(ray["resources"]["limits"]["memory"]), (
                f"{where}: /dev/shm exceeds the memory limit"
            )


def check_nothing_exposed(d: Deploy) -> None:
    for f, doc in d.docs:
        assert doc["kind"] not in EXPOSING_KINDS, f"{f}: {doc['kind']} exposes a Service outside the cluster"
        if doc["kind"] == "Service":
            kind = doc["spec"].get("type", "ClusterIP")
            assert kind == "ClusterIP", f"{f}: Service {doc['metadata']['name']} is {kind}; keep it ClusterIP"
    for where, group in ray_groups(d):
        if "groupName" not in group:
            kind = group.get("serviceType", "ClusterIP")
            assert kind == "ClusterIP", f"{where}: serviceType {kind}; keep ClusterIP"
            assert not group.get("enableIngress"), f"{where}: enableIngress would expose the dashboard"
    for where, pod in all_pod_specs(d):
        assert not pod.get("hostNetwork"), f"{where}: hostNetwork exposes the pod on the node"
        for c in pod["containers"]:
            host_ports = [p for p in c.get("ports") or [] if "hostPort" in p]
            assert not host_ports, f"{where}: {c['name']} opens a hostPort on the node"


def check_mlflow(d: Deploy) -> None:
    uris = {
        (where, env_of(ray).get("MLFLOW_TRACKING_URI", {}).get("value")) for where, _, _, ray in ray_pods(d)
    }
    uris |= {(where, flag(args, "--tracking-uri")) for where, args in rayjob_args(d)}
    services = {doc["metadata"]["name"]: doc for _, doc in of_kind(d, "Service")}
    deployments = {doc["metadata"]["name"]: doc for _, doc in of_kind(d, "Deployment")}
    for where, uri in uris:
        assert uri, f"{where}: no MLflow tracking URI (MLFLOW_TRACKING_URI / --tracking-uri)"
        url = urlparse(uri)
        svc = services.get(url.hostname)
        assert svc, f"{where}: {uri} names no Service under deploy/ (have {sorted(services)})"
        port = next((p for p in svc["spec"]["ports"] if p["port"] == url.port), None)
        assert port, f"{where}: Service {url.hostname} has no port {url.port}"
        pods = [
            dep["spec"]["template"]
            for dep in deployments.values()
            if svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"Service {url.hostname}'s selector matches {len(pods)} Deployments"
        server = pods[0]["spec"]["containers"][0]
        argv = [*server.get("command", []), *server.get("args", [])]
        listen = int(flag(argv, "--port") or 5000)
        target = port.get("targetPort", port["port"])
        named = {p.get("name"): p["containerPort"] for p in server.get("ports") or []}
        assert named.get(target, target) == listen, (
            f"Service {url.hostname}: targetPort {target} is not mlflow's --port {listen}"
        )
        assert flag(argv, "--host") == "0.0.0.0", "mlflow: --host 0.0.0.0 or the Service cannot reach it"
        hosts = (flag(argv, "--allowed-hosts") or "").split(",")
        for host in (url.netloc, "localhost:5000"):  # in-cluster clients, and `kubectl port-forward`
            assert any(fnmatch.fnmatch(host, h) if "*" in h else host == h for h in hosts), (
                f"mlflow --allowed-hosts refuses Host {host!r}, so MLflow 3 would reject these clients"
            )


def check_token_secret(d: Deploy) -> None:
    refs = set()
    for f, doc in d.docs:
        assert doc["kind"] != "Secret", f"{f}: a Secret in the repository; create it with kubectl instead"
    for where, spec in cluster_specs(d):
        auth = (spec.get("authOptions") or {}).get("mode")
        for pwhere, group in groups_of(where, spec):
            env = env_of(ray_container(group)[1])
            if auth == "token":  # KubeRay injects both; a hand-set RAY_AUTH_TOKEN would shadow its Secret
                assert "RAY_AUTH_TOKEN" not in env, f"{pwhere}: authOptions sets RAY_AUTH_TOKEN"
                continue
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{pwhere}: set RAY_AUTH_MODE=token"
            ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef")
            assert ref, f"{pwhere}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)"
            refs.add((ref["name"], ref["key"]))
    assert len(refs) <= 1, f"the Ray pods read the token from different Secrets: {sorted(refs)}"
    for name, key in refs:
        assert re.search(rf"kubectl create secret generic {name} --from-literal={key}=", d.readme), (
            f"deploy/README.md: the `kubectl create secret` command must create Secret {name} with key {key}"
        )
        assert f"secret {name} " in d.readme, f"deploy/README.md: read the token from {name}"


def check_rayjob(d: Deploy) -> None:
    jobs = of_kind(d, "RayJob")
    assert jobs, "deploy/ has no RayJob"
    for f, doc in jobs:
        spec = doc["spec"]
        args = shlex.split(spec["entrypoint"])
        assert args[:2] == ["tda", "run"], f"{f}: the entrypoint must be `tda run SPEC ...`, got {args[:2]}"
        assert (ROOT / args[2]).is_file(), f"{f}: the entrypoint's spec {args[2]} is not in the repository"
        assert flag(args, "--ray-address") == "auto", f"{f}: the driver needs --ray-address auto"
        if "rayClusterSpec" in spec:
            assert spec.get("shutdownAfterJobFinishes") is True, f"{f}: set shutdownAfterJobFinishes: true"
            ttl = spec.get("ttlSecondsAfterFinished")
            assert isinstance(ttl, int) and ttl > 0, f"{f}: set ttlSecondsAfterFinished"


def _without_auth(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    spec.pop("authOptions", None)
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        for c in group["template"]["spec"]["containers"]:
            c["env"] = [e for e in c.get("env", []) if not e["name"].startswith("RAY_AUTH_")]
    return spec


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The path of the first place where two parsed YAML trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(a.keys() | b.keys())
        return next((p for k in keys if (p := first_difference(a.get(k), b.get(k), f"{path}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(
            (
                p
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                if (p := first_difference(x, y, f"{path}[{i}]"))
            ),
            None,
        )
    return None if a == b else path or "."


def check_rayjob_cluster_matches_raycluster(d: Deploy) -> None:
    clusters = [doc["spec"] for _, doc in of_kind(d, "RayCluster")]
    for f, doc in of_kind(d, "RayJob"):
        if "rayClusterSpec" in doc["spec"] and clusters:
            diff = first_difference(_without_auth(doc["spec"]["rayClusterSpec"]), _without_auth(clusters[0]))
            assert diff is None, f"{f}: rayClusterSpec{diff} differs from the RayCluster's (beyond the token)"


def check_readme(d: Deploy) -> None:
    for needle in (
        "not built here",
        "kubectl port-forward svc/tda-head-svc 8265:8265",
        "kubectl port-forward svc/mlflow",
        "local-cluster.sh",
        "ray start --head",
        "nvidia.com/gpu",
        "/dev/shm",
        "ReadWriteMany",
    ):
        assert needle in d.readme, f"deploy/README.md: mention {needle!r}"


# every check_* above; test_every_check_has_a_breakage makes sure each can fail
CHECKS: list[Callable[[Deploy], None]] = [
    f for name, f in list(globals().items()) if name.startswith("check_")
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_deploy_files(deploy: Deploy, check: Callable[[Deploy], None]) -> None:
    check(deploy)


# ------------------------------------------------------------------ each check can fail

DROP = object()  # as a new value: remove the key
W = ("spec", "workerGroupSpecs", 0)  # the RayCluster's worker group
WPOD = (*W, "template", "spec")
WRAY = (*WPOD, "containers", 0)
HEAD = ("spec", "headGroupSpec")
ENTRY = ("spec", "entrypoint")
RUN = "tda run specs/quickstart.yaml --ray-address auto"
TOKEN = (*WRAY, "env", "RAY_AUTH_TOKEN")
DEPLOYMENT_SERVER = ("spec", "template", "spec", "containers", 0)
TEXTS = ("dockerfile", "dockerignore", "readme")

# (check, what breaks, target: a document kind, a text of Deploy, or "+" to add a document,
#  path into the document (a name picks the list item of that name), new value; for a text, (old, new))
BREAKAGES: list[tuple[Callable[[Deploy], None], str, str, tuple[Any, ...], Any]] = [
    (check_documents, "v1alpha1", "RayCluster", ("apiVersion",), "ray.io/v1alpha1"),
    (check_crd_required_fields, "no groupName", "RayCluster", (*W, "groupName"), DROP),
    (check_crd_required_fields, "no head template", "RayCluster", (*HEAD, "template"), DROP),
    (check_crd_required_fields, "int num-cpus", "RayCluster", (*W, "rayStartParams", "num-cpus"), 4),
    (check_crd_required_fields, "no entrypoint", "RayJob", ENTRY, DROP),
    (check_replicas, "replicas > max", "RayCluster", (*W, "replicas"), 99),
    (check_resources, "no memory limit", "RayCluster", (*WRAY, "resources", "limits", "memory"), DROP),
    (check_resources, "num-cpus > limit", "RayCluster", (*W, "rayStartParams", "num-cpus"), "64"),
    (check_versions_and_image, "old Ray", "RayCluster", (*WRAY, "image"), "tda-pipelines:0.1-ray2.9.0-cpu"),
    (check_versions_and_image, "rayVersion", "RayCluster", ("spec", "rayVersion"), "2.9.0"),
    (check_dockerfile, "torch drift", "dockerfile", (), ("TORCH_VERSION=2", "TORCH_VERSION=1")),
    (check_dockerfile, "root user", "dockerfile", (), ("USER 1000:100", "USER root")),
    (check_dockerfile, ".venv sent", "dockerignore", (), (".venv\n", "")),
    (check_pods_match_image, "root pod", "RayCluster", (*WPOD, "securityContext", "runAsUser"), 0),
    (check_pods_match_image, "workingDir", "RayCluster", (*WRAY, "workingDir"), "/"),
    (check_store, "store path", "RayCluster", (*WRAY, "volumeMounts", "tda-store", "mountPath"), "/data"),
    (check_store, "--store", "RayJob", ENTRY, f"{RUN} --store /tmp/s --tracking-uri http://mlflow:5000"),
    (check_ray_env, "usage stats on", "RayCluster", (*WRAY, "env", "RAY_USAGE_STATS_ENABLED", "value"), "1"),
    (check_shm, "disk /dev/shm", "RayCluster", (*WPOD, "volumes", "dshm", "emptyDir", "medium"), DROP),
    (check_shm, "store > shm", "RayCluster", (*W, "rayStartParams", "object-store-memory"), "9000000000"),
    (check_nothing_exposed, "LoadBalancer", "Service", ("spec", "type"), "LoadBalancer"),
    (check_nothing_exposed, "NodePort head", "RayCluster", (*HEAD, "serviceType"), "NodePort"),
    (check_nothing_exposed, "Ingress", "+", (), {"kind": "Ingress", "metadata": {"name": "x"}}),
    (check_mlflow, "port", "RayJob", ENTRY, f"{RUN} --store /store --tracking-uri http://mlflow:80"),
    (check_mlflow, "Host refused", "Deployment", (*DEPLOYMENT_SERVER, "args", -1), "localhost"),
    (check_token_secret, "other Secret", "RayCluster", (*TOKEN, "valueFrom", "secretKeyRef", "name"), "x"),
    (check_token_secret, "literal token", "RayCluster", TOKEN, {"name": "RAY_AUTH_TOKEN", "value": "x"}),
    (check_token_secret, "Secret file", "+", (), {"kind": "Secret", "metadata": {"name": "x"}}),
    (check_rayjob, "no shutdown", "RayJob", ("spec", "shutdownAfterJobFinishes"), False),
    (check_rayjob, "no such spec", "RayJob", ENTRY, "tda run specs/nope.yaml --ray-address auto"),
    (
        check_rayjob_cluster_matches_raycluster,
        "drift",
        "RayJob",
        ("spec", "rayClusterSpec", *W[1:], "replicas"),
        1,
    ),
    (check_readme, "no /dev/shm", "readme", (), ("/dev/shm", "shm")),
]


def break_copy(d: Deploy, target: str, path: tuple[Any, ...], value: Any) -> Deploy:
    broken = copy.deepcopy(d)
    if target in TEXTS:
        old, new = value
        assert old in getattr(broken, target), f"{old!r} is not in {target}: update the breakage"
        setattr(broken, target, getattr(broken, target).replace(old, new))
        return broken
    if target == "+":
        broken.docs.append(("added.yaml", value))
        return broken
    node: Any = next(doc for _, doc in broken.docs if doc["kind"] == target)
    keys = list(path)
    for i, key in enumerate(keys):
        if isinstance(node, list) and isinstance(key, str):  # a list item by its name
            keys[i] = next(n for n, item in enumerate(node) if item.get("name") == key)
        if i < len(keys) - 1:
            node = node[keys[i]]
    if value is DROP:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return broken


@pytest.mark.parametrize(
    ("check", "target", "path", "value"),
    [b[:1] + b[2:] for b in BREAKAGES],
    ids=[f"{b[0].__name__}-{b[1]}" for b in BREAKAGES],
)
def test_check_fails_on_broken_copy(
    deploy: Deploy, check: Callable[[Deploy], None], target: str, path: tuple[Any, ...], value: Any
) -> None:
    broken = break_copy(deploy, target, path, value)
    with pytest.raises(AssertionError):
        check(broken)


def test_every_check_has_a_breakage() -> None:
    assert {b[0] for b in BREAKAGES} == set(CHECKS), "a check without a broken copy might never fail"
