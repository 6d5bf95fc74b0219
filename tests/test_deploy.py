"""Every manifest under deploy/ validated offline: the Kubernetes and KubeRay fields it uses, typed
(a typo or a misplaced field fails), plus the rules the deployment relies on: credentials only from
Secrets, pinned images, entry points and configs that exist, selectors that match."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy").rglob("*.yaml"))
DOCUMENTS = [(path, i, doc) for path in MANIFESTS for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


class K8s(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Quantity = str | int


class SecretKeyRef(K8s):
    name: str
    key: str


class ConfigMapKeyRef(K8s):
    name: str
    key: str


class EnvSource(K8s):
    secretKeyRef: SecretKeyRef | None = None
    configMapKeyRef: ConfigMapKeyRef | None = None

    @model_validator(mode="after")
    def _one_ref(self) -> EnvSource:
        if (self.secretKeyRef is None) == (self.configMapKeyRef is None):
            raise ValueError("valueFrom: exactly one of secretKeyRef / configMapKeyRef")
        return self


class EnvVar(K8s):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    value: str | None = None
    valueFrom: EnvSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.valueFrom is None):
            raise ValueError(f"env {self.name}: exactly one of value / valueFrom")
        return self


class Resources(K8s):
    requests: dict[Literal["cpu", "memory", "nvidia.com/gpu"], Quantity]
    limits: dict[Literal["cpu", "memory", "nvidia.com/gpu"], Quantity]


class Port(K8s):
    containerPort: int = Field(gt=0, lt=65536)
    name: str


class ExecAction(K8s):
    command: list[str]


class HttpGet(K8s):
    path: str
    port: int


class Probe(K8s):
    exec: ExecAction | None = None
    httpGet: HttpGet | None = None
    periodSeconds: int = Field(gt=0)


class VolumeMount(K8s):
    name: str
    mountPath: str


class Container(K8s):
    name: str
    image: str = Field(pattern=r"^[\w./-]+:[\w.-]+$")  # a tag is required
    command: list[str] | None = None
    args: list[str] | None = None
    ports: list[Port] | None = None
    env: list[EnvVar] | None = None
    resources: Resources | None = None
    readinessProbe: Probe | None = None
    volumeMounts: list[VolumeMount] | None = None


class ClaimRef(K8s):
    claimName: str


class Volume(K8s):
    name: str
    persistentVolumeClaim: ClaimRef


class Toleration(K8s):
    key: str
    operator: Literal["Exists", "Equal"]
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class PodSpec(K8s):
    containers: list[Container] = Field(min_length=1)
    volumes: list[Volume] | None = None
    tolerations: list[Toleration] | None = None
    restartPolicy: Literal["Always", "OnFailure", "Never"] | None = None


class Meta(K8s):
    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] | None = None


class PodTemplate(K8s):
    metadata: Meta | None = None
    spec: PodSpec


class Selector(K8s):
    matchLabels: dict[str, str]


class StorageRequest(K8s):
    requests: dict[Literal["storage"], str]


class PVCSpec(K8s):
    accessModes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"]]
    resources: StorageRequest


class ClaimTemplate(K8s):
    metadata: Meta
    spec: PVCSpec


class DeploymentSpec(K8s):
    replicas: int = Field(ge=0)
    selector: Selector
    template: PodTemplate
    serviceName: str | None = None  # StatefulSet
    volumeClaimTemplates: list[ClaimTemplate] | None = None  # StatefulSet


class ServicePort(K8s):
    name: str
    port: int
    targetPort: int


class ServiceSpec(K8s):
    selector: dict[str, str]
    ports: list[ServicePort]


class JobSpec(K8s):
    backoffLimit: int = Field(ge=0)
    template: PodTemplate


class AuthOptions(K8s):
    mode: Literal["token", "disabled"]


class HeadGroup(K8s):
    rayStartParams: dict[str, str]
    template: PodTemplate


class WorkerGroup(K8s):
    groupName: str
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    rayStartParams: dict[str, str]
    template: PodTemplate


class RayClusterSpec(K8s):
    rayVersion: str
    authOptions: AuthOptions
    enableInTreeAutoscaling: bool | None = None
    headGroupSpec: HeadGroup
    workerGroupSpecs: list[WorkerGroup]


class RayJobSpec(K8s):
    entrypoint: str
    submissionMode: Literal["K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"]
    shutdownAfterJobFinishes: bool
    ttlSecondsAfterFinished: int = Field(ge=0)
    activeDeadlineSeconds: int = Field(gt=0)
    backoffLimit: int = Field(ge=0)
    runtimeEnvYAML: str
    rayClusterSpec: RayClusterSpec


class Resource(K8s):
    apiVersion: str
    kind: str
    metadata: Meta
    spec: Any = None


SPECS = {("apps/v1", "Deployment"): DeploymentSpec, ("apps/v1", "StatefulSet"): DeploymentSpec,
         ("v1", "Service"): ServiceSpec, ("v1", "PersistentVolumeClaim"): PVCSpec, ("v1", "Namespace"): None,
         ("batch/v1", "Job"): JobSpec, ("ray.io/v1", "RayCluster"): RayClusterSpec, ("ray.io/v1", "RayJob"): RayJobSpec}


def _pod_templates(kind: str, spec: BaseModel) -> list[PodTemplate]:
    if isinstance(spec, (DeploymentSpec, JobSpec)):
        return [spec.template]
    if isinstance(spec, RayJobSpec):
        spec = spec.rayClusterSpec
    if isinstance(spec, RayClusterSpec):
        return [spec.headGroupSpec.template, *(g.template for g in spec.workerGroupSpecs)]
    return []


def _validated():
    out = []
    for path, index, doc in DOCUMENTS:
        resource = Resource.model_validate(doc)
        key = (resource.apiVersion, resource.kind)
        assert key in SPECS, f"{path.name}#{index}: unexpected {key}"
        spec = SPECS[key].model_validate(doc["spec"]) if SPECS[key] else None
        out.append((path, resource, spec))
    return out


def test_there_are_manifests_for_every_part():
    names = {p.relative_to(ROOT / "deploy").as_posix() for p in MANIFESTS}
    assert {"kuberay/raycluster.yaml", "mlflow/mlflow.yaml", "mlflow/postgres.yaml", "mlflow/minio.yaml"} <= names
    assert {f"kuberay/rayjob-{n}.yaml" for n in ("run", "generate", "screen", "train", "redteam")} <= names
    assert (ROOT / "deploy" / "docker" / "Dockerfile").is_file()


@pytest.mark.parametrize("path, index, doc", DOCUMENTS, ids=[f"{p.parent.name}/{p.name}#{i}" for p, i, _ in DOCUMENTS])
def test_manifest_matches_the_schema(path, index, doc):
    resource = Resource.model_validate(doc)
    spec_model = SPECS.get((resource.apiVersion, resource.kind))
    assert (resource.apiVersion, resource.kind) in SPECS, f"unexpected {resource.apiVersion}/{resource.kind}"
    if spec_model is not None:
        spec_model.model_validate(doc["spec"])
    assert resource.kind != "Secret", "Secrets are created by the operator of the cluster, not kept in the repo"


def test_credentials_come_only_from_secrets_and_images_are_pinned():
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_USER$|ROOT_USER", re.IGNORECASE)
    for path, resource, spec in _validated():
        for template in _pod_templates(resource.kind, spec):
            for container in template.spec.containers:
                assert not container.image.endswith(":latest"), f"{path.name}: pin {container.image}"
                for env in container.env or []:
                    if secretish.search(env.name):
                        assert env.valueFrom is not None and env.valueFrom.secretKeyRef is not None, \
                            f"{path.name}: {env.name} must come from a Secret"
                text = " ".join(container.args or [])
                assert not re.search(r"://[^$:/\s]+:[^$@\s]+@", text), f"{path.name}: literal credentials in args"


def test_selectors_match_and_claims_exist():
    resources = _validated()
    workloads = {(r.metadata.namespace, r.metadata.name): s for _, r, s in resources if isinstance(s, DeploymentSpec)}
    claims = {(r.metadata.namespace, r.metadata.name) for _, r, _ in resources if r.kind == "PersistentVolumeClaim"}
    for path, resource, spec in resources:
        if isinstance(spec, DeploymentSpec):
            assert spec.selector.matchLabels.items() <= (spec.template.metadata.labels or {}).items(), path.name
            claims |= {(resource.metadata.namespace, t.metadata.name) for t in spec.volumeClaimTemplates or []}
        if isinstance(spec, ServiceSpec):
            assert any(spec.selector.items() <= (w.template.metadata.labels or {}).items()
                       for (ns, _), w in workloads.items() if ns == resource.metadata.namespace), \
                f"{path.name}: service {resource.metadata.name} selects no workload"
    for path, resource, spec in resources:
        for template in _pod_templates(resource.kind, spec):
            for volume in template.spec.volumes or []:
                assert (resource.metadata.namespace, volume.persistentVolumeClaim.claimName) in claims, \
                    f"{path.name}: claim {volume.persistentVolumeClaim.claimName} is defined nowhere"


def test_signing_keys_come_from_secrets_and_trusted_keys_from_config_maps():
    """Private keys (generator, trainer) only from Secrets; the public keys verifiers trust from a
    ConfigMap (public, so no Secret needed, and rotating it does not touch the private keys); every job
    that reads data trusts keys on every pod, and every job that trains can sign its student."""
    sources: dict[str, dict[str, set]] = {}
    for path, resource, spec in _validated():
        if not isinstance(spec, RayJobSpec):
            continue
        for template in _pod_templates(resource.kind, spec):
            for container in template.spec.containers:
                env = {e.name: e.valueFrom for e in container.env or []}
                for name in ("TRAIT_GUARD_SIGNING_KEY", "TRAIT_GUARD_TRUSTED_KEYS"):
                    sources.setdefault(path.name, {}).setdefault(name, set()).add(
                        None if env.get(name) is None else
                        "secret" if env[name].secretKeyRef is not None else "configmap")
    for job, names in sources.items():
        assert names["TRAIT_GUARD_SIGNING_KEY"] <= {"secret", None}, job
        if job != "rayjob-generate.yaml":  # generation writes data; every other job reads it
            assert names["TRAIT_GUARD_TRUSTED_KEYS"] == {"configmap"}, f"{job}: trusted keys on every pod"
    for job in ("rayjob-run.yaml", "rayjob-train.yaml"):
        assert "secret" in sources[job]["TRAIT_GUARD_SIGNING_KEY"], f"{job}: the trainer signs its student"


def test_ray_manifests_use_this_ray_with_token_auth_and_real_entry_points():
    import ray

    from trait_guard.config import GenerateJobConfig, RedteamConfig, RunJobConfig, TrainJobConfig, load_config

    kinds = {"teacher_data": GenerateJobConfig, "train": TrainJobConfig, "run": RunJobConfig, "redteam": RedteamConfig}
    jobs = 0
    for path, _resource, spec in _validated():
        cluster = spec.rayClusterSpec if isinstance(spec, RayJobSpec) else spec
        if not isinstance(cluster, RayClusterSpec):
            continue
        assert cluster.rayVersion == ray.__version__ and cluster.authOptions.mode == "token", path.name
        assert any("nvidia.com/gpu" in (c.resources.limits if c.resources else {})
                   for g in cluster.workerGroupSpecs for c in g.template.spec.containers), f"{path.name}: no GPU group"
        if isinstance(spec, RayJobSpec):
            jobs += 1
            argv = shlex.split(spec.entrypoint)
            assert argv[0] == "python"
            script = ROOT / (argv[2].replace(".", "/") + ".py") if argv[1] == "-m" else ROOT / argv[1]
            assert script.is_file(), f"{path.name}: {script} does not exist"
            if "--config" in argv:
                config = ROOT / argv[argv.index("--config") + 1]
                kind = next(cls for prefix, cls in kinds.items() if config.name.startswith(prefix))
                load_config(config, kind)  # the job's config validates
            runtime_env = yaml.safe_load(spec.runtimeEnvYAML)
            assert set(runtime_env) <= {"working_dir", "env_vars", "pip"}, path.name
    assert jobs == 5


def test_mlflow_server_allows_its_service_hosts():
    for _path, resource, spec in _validated():
        if resource.metadata.name == "mlflow" and isinstance(spec, DeploymentSpec):
            args = " ".join(spec.template.spec.containers[0].args)
            assert "--allowed-hosts" in args and "mlflow.mlflow.svc.cluster.local:5000" in args
            assert "postgresql://${PG_USER}:${PG_PASSWORD}@" in args and "--artifacts-destination s3://" in args
            return
    raise AssertionError("no mlflow Deployment")


# --------------------------------------------------------------------------------------------------
# Resources: every job's cluster holds what its config asks for (else the job waits for GPUs forever)


def _quantity(value: Quantity) -> float:
    """A Kubernetes CPU or GPU quantity as a number ("8", 8, "500m")."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _worker_nodes(cluster: RayClusterSpec, replicas: str = "replicas") -> list[tuple[int, float, float]]:
    """``(pods, CPUs, GPUs per pod)`` per worker group: Ray gives each pod its container's limits as its
    logical CPUs and GPUs. The head has ``num-cpus: "0"`` (asserted), so it holds no actor or worker."""
    assert cluster.headGroupSpec.rayStartParams.get("num-cpus") == "0"
    groups = []
    for group in cluster.workerGroupSpecs:
        limits = group.template.spec.containers[0].resources.limits
        groups.append((getattr(group, replicas), _quantity(limits.get("cpu", 0)), _quantity(limits.get("nvidia.com/gpu", 0))))
    return groups


def _bundles_that_fit(groups: list[tuple[int, float, float]], cpus: float, gpus: float) -> int:
    """How many ``{CPU: cpus, GPU: gpus}`` bundles (one actor or worker each) the pods hold: a bundle
    lives on one pod, so it is per pod, not the cluster's totals."""
    total = 0
    for pods, pod_cpus, pod_gpus in groups:
        per_pod = min(int(pod_cpus // cpus) if cpus else 10**6, int(pod_gpus // gpus) if gpus else 10**6)
        total += pods * per_pod
    return total


def _job_stages(spec: RayJobSpec):
    """The job's config (from the entrypoint's --config) and its Ray stages, or the screen job's one task."""
    from trait_guard.config import RayStage, ray_stages

    argv = shlex.split(spec.entrypoint)
    if "--config" not in argv:  # screen_teacher_data: one ray.remote(num_gpus=N) task (1 CPU, Ray's default)
        gpus = float(argv[argv.index("--num-gpus") + 1]) if "--num-gpus" in argv else 0.0
        return None, [RayStage("screen", 1, 1.0, gpus)]
    path = ROOT / argv[argv.index("--config") + 1]
    return path.name, ray_stages(_load_job_config(path))


def _load_job_config(path: Path):
    """A shipped job config, validated as the class its file name names (as tests/test_configs.py does)."""
    from trait_guard.config import GenerateJobConfig, RedteamConfig, RunJobConfig, TrainJobConfig, load_config

    kinds = {"teacher_data": GenerateJobConfig, "train": TrainJobConfig, "run": RunJobConfig, "redteam": RedteamConfig}
    return load_config(path, next(cls for prefix, cls in kinds.items() if path.name.startswith(prefix)))


RAYJOBS = [(path, spec) for path, _resource, spec in _validated() if isinstance(spec, RayJobSpec)]


@pytest.mark.parametrize("path, spec", RAYJOBS, ids=[p.name for p, _ in RAYJOBS])
def test_each_rayjob_cluster_holds_every_stage_of_its_config(path, spec):
    """GPUs (and CPUs) each stage of the job's config asks for <= what the job's cluster provides, with
    every actor or worker placed on one pod. Stages run one after another (generation kills its actors
    before training starts), so each must fit alone. The cluster is fixed (min = replicas = max): a
    RayJob's cluster does not grow into a stage that does not fit."""
    cluster = spec.rayClusterSpec
    groups = _worker_nodes(cluster)
    for group in cluster.workerGroupSpecs:
        assert group.minReplicas == group.replicas == group.maxReplicas, f"{path.name}: {group.groupName} is not fixed"
    cluster_gpus = sum(pods * gpus for pods, _, gpus in groups)
    config, stages = _job_stages(spec)
    assert stages, f"{path.name}: no Ray stage found for {spec.entrypoint}"
    for stage in stages:
        assert stage.total_gpus <= cluster_gpus, (
            f"{path.name}: {stage.name} asks for {stage.bundles} x {stage.gpus} GPU(s) ({config}), the cluster has "
            f"{cluster_gpus}: set the worker group's replicas (and min/max) to fit")
        assert _bundles_that_fit(groups, stage.cpus, stage.gpus) >= stage.bundles, (
            f"{path.name}: {stage.bundles} {stage.name} bundles of {stage.cpus} CPU + {stage.gpus} GPU do not fit "
            f"on the pods {groups}")
    # and the cluster is not idle GPUs either: the biggest stage uses every GPU the job pays for
    assert max(stage.total_gpus for stage in stages) == cluster_gpus, f"{path.name}: GPUs left idle"


def test_the_resource_check_catches_the_shipped_mismatch():
    """The check above is real: the 2-GPU cluster the generate and run jobs had (review: 8 single-GPU
    actors on it would wait forever) fails it, and the 8-pod one passes."""
    from trait_guard.config import RayStage

    eight_actors = RayStage("generation", 8, 4.0, 1.0)
    assert _bundles_that_fit([(2, 8.0, 1.0)], eight_actors.cpus, eight_actors.gpus) == 2
    assert _bundles_that_fit([(8, 8.0, 1.0)], eight_actors.cpus, eight_actors.gpus) == 8
    # one 8-GPU pod with 16 CPUs holds 4 bundles of 4 CPUs, not 8: a bundle needs its CPUs on its pod too
    assert _bundles_that_fit([(1, 16.0, 8.0)], 4.0, 1.0) == 4


def test_the_standing_cluster_can_grow_to_every_gpu_profile():
    """raycluster.yaml (autoscaling, for `ray job submit`) reaches, at maxReplicas, the biggest stage of
    every shipped GPU config; the README tells users to submit train_gpu.yaml to it."""
    from trait_guard.config import ray_stages

    (cluster,) = [s for _, r, s in _validated() if r.kind == "RayCluster"]
    assert cluster.enableInTreeAutoscaling
    groups = _worker_nodes(cluster, replicas="maxReplicas")
    for path in sorted((ROOT / "ray_jobs" / "configs").glob("*_gpu.yaml")):
        for stage in ray_stages(_load_job_config(path)):
            assert _bundles_that_fit(groups, stage.cpus, stage.gpus) >= stage.bundles, f"{path.name}: {stage}"


@pytest.mark.parametrize("path", sorted((ROOT / "ray_jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_cpu_configs_ask_for_no_gpu_and_gpu_configs_load_bf16_on_their_gpus(path):
    """A CPU profile (every config not named *_gpu) asks Ray for no GPU and loads every model in fp32 on
    a CPU; a GPU profile's stages all ask for GPUs and its models resolve to bfloat16 on CUDA."""
    import torch

    from trait_guard.config import RedteamConfig, TrainingSettings, ray_stages
    from trait_guard.models import resolve_dtype

    config = _load_job_config(path)
    gpu = path.stem.endswith("_gpu")
    stages = ray_stages(config)
    assert all((stage.gpus > 0) == gpu for stage in stages), f"{path.name}: {stages}"
    training = config.training if isinstance(config, RedteamConfig) else config
    placements = [(t.device, t.dtype) for t in getattr(config, "teachers", [])]
    placements += [(config.extract.device, config.extract.dtype)] if hasattr(config, "extract") else []
    if isinstance(training, TrainingSettings):
        student = training.student_placement()
        placements.append((student["device"], student["dtype"]))
    device = "cuda" if gpu else "cpu"
    for setting_device, dtype in placements:
        assert setting_device == "auto", f"{path.name}: {setting_device}"
        assert resolve_dtype(dtype, device) == (torch.bfloat16 if gpu else torch.float32), f"{path.name}: {dtype}"
