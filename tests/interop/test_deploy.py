"""Checks on deploy/: the Kubernetes manifests (kustomize) and the image build.

Every kustomization under deploy/ is rendered with `kubectl kustomize` (kubectl
ships kustomize) and the rendered objects are checked for the mistakes that
break a deploy without any error at apply time: a Service whose targetPort no
container declares, a probe on the wrong port, lb-server flags that disagree
with its ports, RBAC broader than list + watch on EndpointSlices, an image the
Dockerfile does not build, a container that may run as root, a client Job
pointed at a Service name or port that does not exist, a NetworkPolicy that
does not select lb-server. Every object is also validated (strictly: unknown
fields fail) against the Kubernetes OpenAPI schemas shipped by the
`kubernetes-validate` package, for the oldest and the newest version we target.

The overlays under deploy/overlays/ are what users apply: each must be whole,
so every reference in one (Service → pods, Job args → Services, RBAC subject →
ServiceAccount) resolves inside its own render. The bases are checked for what
they hold on their own.

The Dockerfile is checked against the workspace: the binaries it builds and
copies are `[[bin]]` targets (`cargo metadata`), its image name and tag are the
ones every manifest and deploy/README.md use, the tag is the workspace version.
The release build itself runs in CI.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
DEPLOY_README = DEPLOY / "README.md"
KUBECTL = shutil.which("kubectl")
CARGO = shutil.which("cargo")

# Images of other projects a kustomization under deploy/ may run (an Envoy
# sidecar overlay would add its image here); every other container must run
# the image deploy/Dockerfile builds.
OTHER_IMAGES: tuple[str, ...] = ()

# The kinds the manifests may use, each with the one stable API version the
# cluster is given (they are applied with a server-side dry run).
API_VERSIONS = {
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "Job": "batch/v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "Ingress": "networking.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

# Schemas to validate against: the oldest Kubernetes the manifests target, and
# the newest kubernetes-validate ships.
OLDEST_KUBERNETES = "1.29"

# What lb-server and greeter-server listen on without flags (README tables).
LB_LISTEN_DEFAULT = "0.0.0.0:7000"
LB_METRICS_LISTEN_DEFAULT = "0.0.0.0:9090"
LB_SHUTDOWN_TIMEOUT_DEFAULT = "10s"
GREETER_LISTEN_DEFAULT = "0.0.0.0:50051"
GREETER_DRAIN_TIMEOUT_DEFAULT = "10"

# The binaries the issue asks the image to ship.
REQUIRED_BINARIES = {"lb-server", "greeter-server", "greeter-client"}


def kustomization_dirs() -> list[Path]:
    names = ("kustomization.yaml", "kustomization.yml", "Kustomization")
    return sorted({p.parent for name in names for p in DEPLOY.rglob(name)})


def overlay_dirs() -> list[Path]:
    return [d for d in kustomization_dirs() if d.parent.name == "overlays"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


KUSTOMIZATIONS = kustomization_dirs()
OVERLAYS = overlay_dirs()


# --------------------------------------------------------------------------- rendering


@dataclass
class Container:
    """One container (or init container) of a workload's pod template."""

    workload: dict
    pod: dict  # the pod template
    spec: dict  # the container
    init: bool

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def where(self) -> str:
        meta = self.workload["metadata"]
        return f"{self.workload['kind']} {meta.get('namespace')}/{meta['name']} container {self.name}"

    @property
    def binary(self) -> str | None:
        command = self.spec.get("command") or []
        return Path(command[0]).name if command else None

    @property
    def argv(self) -> list[str]:
        return [*(self.spec.get("command") or [])[1:], *(self.spec.get("args") or [])]

    def options(self, flag: str) -> list[str]:
        """Every value of `--flag` (as `--flag=v` or `--flag v`), in order."""
        values, argv = [], self.argv
        for i, arg in enumerate(argv):
            if arg.startswith(flag + "="):
                values.append(arg.split("=", 1)[1])
            elif arg == flag and i + 1 < len(argv):
                values.append(argv[i + 1])
        return values

    def env(self, name: str) -> str | None:
        for var in self.spec.get("env") or []:
            if var["name"] == name:
                assert "value" in var, f"{self.where}: {name} must be a literal value to be checked"
                return var["value"]
        return None

    def setting(self, flag: str, env: str | None, default: str | None = None) -> str | None:
        """The value the program sees: the last --flag, else the env var, else its default."""
        values = self.options(flag)
        if values:
            return values[-1]
        if env is not None and self.env(env) is not None:
            return self.env(env)
        return default

    def port(self, ref: int | str) -> int | None:
        """A port this container declares, by number or name."""
        for port in self.spec.get("ports") or []:
            if ref == port.get("name") or ref == port["containerPort"]:
                return port["containerPort"]
        return None

    def port_name(self, number: int) -> str | None:
        for port in self.spec.get("ports") or []:
            if port["containerPort"] == number:
                return port.get("name")
        return None


@dataclass
class Render:
    """The objects `kubectl kustomize DIR` produced."""

    dir: Path
    objects: list[dict]
    _by_key: dict = field(default_factory=dict)

    def __post_init__(self):
        for obj in self.objects:
            self._by_key[(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])] = obj

    @property
    def name(self) -> str:
        return rel(self.dir)

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        return self._by_key.get((kind, namespace, name))

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]

    def containers(self, binary: str | None = None) -> list[Container]:
        found = []
        for workload in self.workloads():
            pod = workload["spec"]["template"]
            for key, init in (("initContainers", True), ("containers", False)):
                for spec in pod["spec"].get(key) or []:
                    container = Container(workload, pod, spec, init)
                    if binary is None or container.binary == binary:
                        found.append(container)
        return found

    def pods_selected(self, namespace: str | None, selector: dict | None) -> list[dict]:
        """Workloads in `namespace` whose pod template labels match `selector` (matchLabels form)."""
        return [
            w
            for w in self.workloads()
            if w["metadata"].get("namespace") == namespace
            and labels_match(selector or {}, w["spec"]["template"]["metadata"].get("labels") or {})
        ]

    def service(self, name: str, namespace: str) -> dict | None:
        return self.get("Service", name, namespace)


def labels_match(selector: dict, labels: dict) -> bool:
    """A Service-style selector (a plain map) or a LabelSelector with matchLabels only."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        assert not selector.get("matchExpressions"), f"matchExpressions are not checked here: {selector}"
        selector = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


@functools.cache
def render(directory: Path) -> Render:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered (.ci/run installs it)")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {rel(directory)} failed:\n{result.stderr}"
    # kustomize reports deprecated fields (commonLabels, patchesStrategicMerge, ...) as warnings.
    assert not result.stderr.strip(), f"kubectl kustomize {rel(directory)} warned:\n{result.stderr}"
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    return Render(directory, objects)


def all_renders() -> list[Render]:
    return [render(d) for d in KUSTOMIZATIONS]


def overlay_renders() -> list[Render]:
    return [render(d) for d in OVERLAYS]


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    rest: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), per stage."""
    instructions: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, rest = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def dockerfile_args() -> dict[str, str]:
    """Global ARGs (before the first FROM) with their defaults."""
    args = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().upper().startswith("FROM"):
            break
        match = re.match(r"^\s*ARG\s+(\w+)=(\S+)", line)
        if match:
            args[match.group(1)] = match.group(2)
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerfile_image() -> str:
    """name:tag from the final stage's OCI labels: the single source of the image name."""
    labels = {}
    for instruction in dockerfile_stages()[-1]:
        if instruction.keyword == "LABEL":
            for token in shlex.split(instruction.rest):
                key, _, value = token.partition("=")
                labels[key] = value
    title = labels.get("org.opencontainers.image.title")
    version = labels.get("org.opencontainers.image.version")
    assert title and version, "the final stage must LABEL org.opencontainers.image.title and .version"
    return f"{title}:{version}"


def dockerfile_built_binaries() -> set[str]:
    """Binaries named with --bin in the build stages' cargo commands."""
    built = set()
    for stage in dockerfile_stages()[:-1]:
        for instruction in stage:
            if instruction.keyword == "RUN" and "cargo build" in instruction.rest:
                assert "--release" in instruction.rest, f"the image must ship release builds: {instruction.rest}"
                built |= set(re.findall(r"--bin[ =]([\w-]+)", instruction.rest))
    return built


def dockerfile_copied_binaries() -> dict[str, str]:
    """{binary name: destination path} of the final stage's COPY --from lines."""
    copied = {}
    for instruction in dockerfile_stages()[-1]:
        if instruction.keyword == "COPY" and "--from=" in instruction.rest:
            parts = [p for p in instruction.rest.split() if not p.startswith("--")]
            *sources, dest = parts
            for source in sources:
                name = Path(source).name
                copied[name] = dest if not dest.endswith("/") else dest + name
    return copied


@functools.cache
def cargo_metadata() -> dict:
    if CARGO is None:
        pytest.skip("cargo is not installed")
    result = subprocess.run(
        [CARGO, "metadata", "--no-deps", "--format-version", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"cargo metadata failed:\n{result.stderr}"
    return json.loads(result.stdout)


def workspace_bin_targets() -> set[str]:
    return {
        target["name"]
        for package in cargo_metadata()["packages"]
        for target in package["targets"]
        if "bin" in target["kind"]
    }


# --------------------------------------------------------------------------- helpers


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def seconds(text: str) -> float:
    """10s, 250ms, 2m or a bare number of seconds (lb-server and greeter-server syntax)."""
    match = re.fullmatch(r"([\d.]+)(ms|s|m)?", text.strip())
    assert match, f"bad duration {text!r}"
    value = float(match.group(1))
    return {"ms": value / 1000, "m": value * 60}.get(match.group(2) or "s", value)


def service_dns(host: str, client_namespace: str) -> tuple[str, str]:
    """(service, namespace) from a Service DNS name: NAME, NAME.NS, NAME.NS.svc[.DOMAIN]."""
    parts = host.split(".")
    if len(parts) == 1:
        return parts[0], client_namespace
    assert len(parts) == 2 or parts[2] == "svc", f"{host} is not a Service DNS name"
    return parts[0], parts[1]


def service_target_port(render: Render, service: dict, port: dict) -> tuple[Container, int]:
    """The container and port number a Service port sends to (one workload must match)."""
    namespace = service["metadata"]["namespace"]
    workloads = render.pods_selected(namespace, service["spec"].get("selector"))
    assert workloads, f"Service {namespace}/{service['metadata']['name']} selects no pods in {render.name}"
    target = port.get("targetPort", port["port"])
    for workload in workloads:
        for container in render.containers():
            if container.workload is workload and not container.init:
                number = container.port(target)
                if number is not None:
                    return container, number
    raise AssertionError(
        f"{render.name}: Service {namespace}/{service['metadata']['name']} port {port.get('name')} "
        f"targets {target!r}, which no container of the selected pods declares"
    )


def is_headless(service: dict) -> bool:
    return service["spec"].get("clusterIP") == "None"


def service_port(service: dict, ref: int | str) -> dict | None:
    for port in service["spec"]["ports"]:
        if ref == port.get("name") or ref == port["port"]:
            return port
    return None


def effective(container: Container, key: str):
    """A securityContext field, the container's overriding the pod's."""
    own = (container.spec.get("securityContext") or {}).get(key)
    return own if own is not None else (container.pod["spec"].get("securityContext") or {}).get(key)


def lb_server(render: Render) -> Container | None:
    containers = render.containers("lb-server")
    assert len(containers) <= 1, f"{render.name}: more than one lb-server workload"
    return containers[0] if containers else None


# --------------------------------------------------------------------------- rendering


def test_there_is_a_base_and_overlays():
    assert (DEPLOY / "base").is_dir(), "deploy/base is missing"
    names = {d.name for d in OVERLAYS}
    assert {"cluster-wide", "namespaced", "ingress"} <= names, f"overlays: {sorted(names)}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=rel)
def test_kustomization_renders(directory: Path):
    rendered = render(directory)
    assert rendered.objects, f"{rel(directory)} renders nothing"
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered.objects]
    assert len(keys) == len(set(keys)), f"{rel(directory)} renders an object twice"


def test_objects_use_stable_api_versions_and_explicit_namespaces():
    for rendered in all_renders():
        for obj in rendered.objects:
            kind, meta = obj["kind"], obj["metadata"]
            assert kind in API_VERSIONS, f"{rendered.name}: unexpected kind {kind}"
            assert obj["apiVersion"] == API_VERSIONS[kind], f"{rendered.name}: {kind} must be {API_VERSIONS[kind]}"
            # Without an explicit namespace, `kubectl apply -k` puts an object in
            # the current context's namespace, and the DNS names in args break.
            if kind in CLUSTER_SCOPED:
                assert "namespace" not in meta, f"{rendered.name}: cluster-scoped {kind} {meta['name']} has a namespace"
            else:
                assert meta.get("namespace"), f"{rendered.name}: {kind} {meta['name']} has no namespace"


def test_objects_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    versions = [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]
    loose = [yaml.safe_load(p.read_text()) for p in DEPLOY.rglob("*.example.yaml")]
    checked = 0
    for obj in [o for r in all_renders() for o in r.objects] + loose:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = "/".join(str(p) for p in error.path)
                raise AssertionError(
                    f"{obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version} at {path}: "
                    f"{error.message}"
                ) from None
            checked += 1
    assert checked


# --------------------------------------------------------------------------- pods, ports, probes


def test_workload_selectors_match_their_pod_templates():
    for rendered in all_renders():
        for workload in rendered.workloads():
            if workload["kind"] == "Job":
                continue  # the Job controller generates its selector
            labels = workload["spec"]["template"]["metadata"].get("labels") or {}
            assert labels_match(workload["spec"]["selector"], labels), (
                f"{rendered.name}: {workload['kind']} {workload['metadata']['name']} selector does not match its pods"
            )


def test_services_select_pods_and_target_declared_ports():
    services = 0
    for rendered in all_renders():
        for service in rendered.of("Service"):
            services += 1
            for port in service["spec"]["ports"]:
                assert port.get("name"), f"{rendered.name}: Service {service['metadata']['name']} has an unnamed port"
                _, number = service_target_port(rendered, service, port)
                if is_headless(service):
                    # Clients of a headless Service dial pod IPs: the port in
                    # their address is the container's, so the two must agree.
                    assert port["port"] == number, (
                        f"{rendered.name}: headless Service {service['metadata']['name']} port {port['port']} "
                        f"is not the container port {number}"
                    )
    assert services


def test_probes_hit_ports_their_container_declares():
    probes = 0
    for rendered in all_renders():
        for container in rendered.containers():
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.spec.get(kind)
                if not probe:
                    continue
                probes += 1
                handler = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                assert handler, f"{container.where}: {kind} has no httpGet, grpc or tcpSocket"
                assert container.port(handler["port"]) is not None, (
                    f"{rendered.name}: {container.where} {kind} port {handler['port']!r} is not declared"
                )
    assert probes


def test_long_running_containers_have_probes_and_resources():
    for rendered in all_renders():
        for container in rendered.containers():
            resources = container.spec.get("resources") or {}
            assert resources.get("requests") and resources.get("limits", {}).get("memory"), (
                f"{container.where}: set resource requests and a memory limit"
            )
            if container.workload["kind"] != "Job":
                assert container.spec.get("readinessProbe"), f"{container.where} has no readiness probe"
                assert container.spec.get("livenessProbe"), f"{container.where} has no liveness probe"


def test_lb_server_flags_match_its_ports_and_probes():
    seen = 0
    for rendered in all_renders():
        lb = lb_server(rendered)
        if lb is None:
            continue
        seen += 1
        assert lb.setting("--source", "LB_SOURCE", "kube") == "kube", (
            f"{rendered.name}: lb-server must use --source kube"
        )
        grpc = port_of(lb.setting("--listen", "LB_LISTEN", LB_LISTEN_DEFAULT))
        metrics = port_of(lb.setting("--metrics-listen", "LB_METRICS_LISTEN", LB_METRICS_LISTEN_DEFAULT))
        assert lb.port("grpc") == grpc, f"{rendered.name}: container port grpc is not --listen's {grpc}"
        assert lb.port("metrics") == metrics, (
            f"{rendered.name}: container port metrics is not --metrics-listen's {metrics}"
        )
        readiness, liveness = lb.spec["readinessProbe"]["httpGet"], lb.spec["livenessProbe"]["httpGet"]
        assert (readiness["path"], lb.port(readiness["port"])) == ("/readyz", metrics), f"{rendered.name}: readiness"
        assert (liveness["path"], lb.port(liveness["port"])) == ("/healthz", metrics), f"{rendered.name}: liveness"
        assert lb.workload["spec"]["replicas"] >= 2, f"{rendered.name}: lb-server needs two replicas to fail over"
        # SIGTERM waits up to --shutdown-timeout for streams to end: SIGKILL must come later.
        timeout = seconds(lb.setting("--shutdown-timeout", "LB_SHUTDOWN_TIMEOUT", LB_SHUTDOWN_TIMEOUT_DEFAULT))
        grace = lb.pod["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > timeout, f"{rendered.name}: grace period {grace}s <= --shutdown-timeout {timeout}s"
        spread = lb.pod["spec"].get("topologySpreadConstraints") or []
        anti = (lb.pod["spec"].get("affinity") or {}).get("podAntiAffinity")
        assert anti or any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread), (
            f"{rendered.name}: lb-server replicas are not spread over nodes"
        )
    assert seen


def test_lb_server_has_a_disruption_budget():
    for rendered in all_renders():
        lb = lb_server(rendered)
        if lb is None:
            continue
        namespace = lb.workload["metadata"]["namespace"]
        budgets = [
            pdb
            for pdb in rendered.of("PodDisruptionBudget")
            if pdb["metadata"]["namespace"] == namespace
            and lb.workload in rendered.pods_selected(namespace, pdb["spec"]["selector"])
        ]
        assert len(budgets) == 1, f"{rendered.name}: {len(budgets)} PodDisruptionBudgets select lb-server"
        spec = budgets[0]["spec"]
        replicas = lb.workload["spec"]["replicas"]
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
        assert isinstance(allowed, int) and 1 <= allowed < replicas, (
            f"{rendered.name}: the budget must allow draining one replica and keep one: {spec}"
        )


def test_greeter_grace_period_covers_its_shutdown():
    seen = 0
    for rendered in all_renders():
        for greeter in rendered.containers("greeter-server"):
            seen += 1
            listen = port_of(greeter.setting("--listen", "GREETER_LISTEN", GREETER_LISTEN_DEFAULT))
            assert greeter.port("grpc") == listen, f"{greeter.where}: port grpc is not --listen's {listen}"
            for kind in ("readinessProbe", "livenessProbe"):
                assert "grpc" in greeter.spec[kind], f"{greeter.where}: {kind} should be a gRPC health probe"
                assert greeter.spec[kind]["grpc"]["port"] == listen, f"{greeter.where}: {kind} is not on {listen}"
            delay = seconds(greeter.setting("--shutdown-delay", "GREETER_SHUTDOWN_DELAY", "0"))
            drain = seconds(greeter.setting("--drain-timeout", "GREETER_DRAIN_TIMEOUT", GREETER_DRAIN_TIMEOUT_DEFAULT))
            assert delay > 0, f"{greeter.where}: without --shutdown-delay, clients see the pod go before the update"
            grace = greeter.pod["spec"].get("terminationGracePeriodSeconds", 30)
            assert grace > delay + drain, f"{greeter.where}: grace {grace}s <= shutdown delay {delay}s + drain {drain}s"
            # NOT_SERVING during the shutdown delay must not get the pod restarted.
            liveness = greeter.spec["livenessProbe"]
            tolerated = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
            assert tolerated > delay, f"{greeter.where}: liveness would fail during the shutdown delay"
            if greeter.workload["kind"] == "Deployment":
                assert greeter.workload["spec"]["replicas"] == 3, f"{greeter.where}: the example runs 3 replicas"
    assert seen


def test_no_container_runs_as_root():
    for rendered in all_renders():
        for container in rendered.containers():
            assert effective(container, "runAsNonRoot") is True, f"{rendered.name}: {container.where}: runAsNonRoot"
            user = effective(container, "runAsUser")
            assert isinstance(user, int) and user != 0, f"{rendered.name}: {container.where}: runAsUser {user!r}"
            context = container.spec.get("securityContext") or {}
            assert context.get("allowPrivilegeEscalation") is False, f"{container.where}: allowPrivilegeEscalation"
            assert not context.get("privileged"), f"{container.where}: privileged"


def test_dockerfile_user_is_the_pods_user():
    users = [i.rest for i in dockerfile_stages()[-1] if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid (runAsNonRoot checks it): {uid}"
    for rendered in all_renders():
        for container in rendered.containers():
            if container.spec["image"] == dockerfile_image():
                assert effective(container, "runAsUser") == int(uid), f"{container.where}: runAsUser is not {uid}"


def test_every_image_is_the_one_the_dockerfile_builds():
    image = dockerfile_image()
    for rendered in all_renders():
        for container in rendered.containers():
            if container.spec["image"] in OTHER_IMAGES:
                continue
            assert container.spec["image"] == image, (
                f"{rendered.name}: {container.where} runs {container.spec['image']}, not {image}"
            )
            assert container.spec.get("imagePullPolicy") == "IfNotPresent", (
                f"{container.where}: IfNotPresent, so an image loaded into kind/minikube is used"
            )
            command = container.spec.get("command") or []
            assert command and command[0] in dockerfile_copied_binaries().values(), (
                f"{container.where}: command {command} is not a binary the image ships"
            )


# --------------------------------------------------------------------------- RBAC


def test_rbac_grants_only_list_and_watch_on_endpointslices():
    roles = 0
    for rendered in all_renders():
        for role in rendered.of("ClusterRole") + rendered.of("Role"):
            roles += 1
            assert not role.get("aggregationRule"), f"{role['metadata']['name']}: no aggregation"
            rules = role.get("rules") or []
            assert len(rules) == 1, f"{rendered.name}: {role['kind']} {role['metadata']['name']} has {len(rules)} rules"
            rule = rules[0]
            assert rule.get("apiGroups") == ["discovery.k8s.io"], f"{role['metadata']['name']}: {rule}"
            assert rule.get("resources") == ["endpointslices"], f"{role['metadata']['name']}: {rule}"
            assert sorted(rule.get("verbs") or []) == ["list", "watch"], f"{role['metadata']['name']}: {rule}"
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), (
                f"{role['metadata']['name']}: {rule}"
            )
        for binding in rendered.of("ClusterRoleBinding") + rendered.of("RoleBinding"):
            ref = binding["roleRef"]
            namespace = binding["metadata"].get("namespace")
            role = rendered.get(ref["kind"], ref["name"], namespace if ref["kind"] == "Role" else None)
            assert role is not None, (
                f"{rendered.name}: {binding['kind']} {binding['metadata']['name']} binds a role it does not ship"
            )
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount", (
                    f"{binding['metadata']['name']}: bind only lb-server's account"
                )
    assert roles


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_rbac_covers_exactly_what_lb_server_watches(directory: Path):
    rendered = render(directory)
    lb = lb_server(rendered)
    if lb is None:
        assert not rendered.of("ClusterRoleBinding") and not rendered.of("RoleBinding")
        return
    account = (lb.workload["metadata"]["namespace"], lb.pod["spec"].get("serviceAccountName", "default"))
    assert account[1] != "default", f"{rendered.name}: lb-server needs its own ServiceAccount"
    assert rendered.get("ServiceAccount", account[1], account[0]), (
        f"{rendered.name}: ServiceAccount {account} is missing"
    )
    assert lb.pod["spec"].get("automountServiceAccountToken", True), f"{rendered.name}: lb-server needs its token"

    def bound(binding: dict) -> bool:
        return any((s.get("namespace"), s["name"]) == account for s in binding["subjects"])

    cluster = [b for b in rendered.of("ClusterRoleBinding") if bound(b)]
    local = {b["metadata"]["namespace"] for b in rendered.of("RoleBinding") if bound(b)}
    namespaces = [ns for value in lb.options("--namespace") for ns in value.split(",")]
    if not namespaces and lb.env("LB_NAMESPACE"):
        namespaces = lb.env("LB_NAMESPACE").split(",")
    if namespaces:
        assert not cluster, f"{rendered.name}: lb-server watches {namespaces}; it must not hold a ClusterRoleBinding"
        assert local == set(namespaces), f"{rendered.name}: Roles in {sorted(local)}, --namespace {namespaces}"
    else:
        assert cluster, f"{rendered.name}: lb-server watches every namespace but no ClusterRoleBinding grants it"
        assert not local, f"{rendered.name}: cluster-wide lb-server with extra RoleBindings"
    # Every service a client asks lb-server about is in a namespace it watches.
    for client in rendered.containers("greeter-client"):
        if client.setting("--lb", "GREETER_LB"):
            target = client.setting("--target", "GREETER_TARGET", "greeter.default:grpc")
            _, namespace = service_dns(target.removeprefix("dns:///").rsplit(":", 1)[0], "")
            assert not namespaces or namespace in namespaces, f"{client.where}: {target} is not watched"


# --------------------------------------------------------------------------- clients, network policy


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_client_jobs_point_at_real_services_and_ports(directory: Path):
    rendered = render(directory)
    for client in rendered.containers("greeter-client"):
        own_namespace = client.workload["metadata"]["namespace"]
        lbs = [u for v in client.options("--lb") for u in v.split(",")] or (client.env("GREETER_LB") or "").split(",")
        lbs = [u for u in lbs if u]
        direct = client.setting("--direct", "GREETER_DIRECT")
        dns = client.setting("--dns", "GREETER_DNS")
        assert len([m for m in (lbs, direct, dns) if m]) == 1, f"{client.where}: one of --lb, --dns, --direct"
        if lbs:
            lb = lb_server(rendered)
            assert lb is not None, f"{rendered.name}: {client.where} uses --lb but the overlay runs no lb-server"
            lb_port = port_of(lb.setting("--listen", "LB_LISTEN", LB_LISTEN_DEFAULT))
            for url in lbs:
                parts = urlsplit(url)
                assert parts.scheme == "http" and parts.port, f"{client.where}: --lb {url} must be http://HOST:PORT"
                name, namespace = service_dns(parts.hostname, own_namespace)
                service = rendered.service(name, namespace)
                assert service, f"{client.where}: --lb {url}: no Service {namespace}/{name}"
                port = service_port(service, parts.port)
                assert port, f"{client.where}: --lb {url}: Service {name} has no port {parts.port}"
                container, number = service_target_port(rendered, service, port)
                assert container.binary == "lb-server" and number == lb_port, (
                    f"{client.where}: --lb {url} reaches {container.where} port {number}, "
                    f"not lb-server's gRPC port {lb_port}"
                )
                assert is_headless(service), (
                    f"{client.where}: --lb {url}: a headless Service lets clients reach both replicas"
                )
            target = client.setting("--target", "GREETER_TARGET", "greeter.default:grpc")
            host, port_ref = target.removeprefix("dns:///").rsplit(":", 1)
            name, namespace = service_dns(host, own_namespace)
            service = rendered.service(name, namespace)
            assert service, f"{client.where}: --target {target}: no Service {namespace}/{name}"
            # lb-server resolves the port against the EndpointSlice ports, which
            # carry the Service port's name and the endpoints' (container) port.
            ref = int(port_ref) if port_ref.isdigit() else port_ref
            if isinstance(ref, int):
                matches = [p for p in service["spec"]["ports"] if service_target_port(rendered, service, p)[1] == ref]
            else:
                matches = [p for p in service["spec"]["ports"] if p.get("name") == ref]
            assert matches, f"{client.where}: --target {target}: Service {name} has no such port"
            container, _ = service_target_port(rendered, service, matches[0])
            assert container.binary == "greeter-server", f"{client.where}: --target {target} reaches {container.where}"
        # --direct is the pinned baseline through the ClusterIP; --dns resolves the headless Service.
        for addr, headless in ((direct, False), (dns, True)):
            if not addr:
                continue
            wanted = "a headless" if headless else "a ClusterIP"
            host, port_text = addr.rsplit(":", 1)
            name, namespace = service_dns(host, own_namespace)
            service = rendered.service(name, namespace)
            assert service, f"{client.where}: {addr}: no Service {namespace}/{name}"
            assert is_headless(service) == headless, (
                f"{client.where}: {addr}: Service {name} should be {wanted} Service"
            )
            port = service_port(service, int(port_text))
            assert port, f"{client.where}: {addr}: Service {name} has no port {port_text}"
            container, _ = service_target_port(rendered, service, port)
            assert container.binary == "greeter-server", f"{client.where}: {addr} reaches {container.where}"


def test_the_client_job_runs_the_classic_experiment():
    jobs = [
        c
        for r in overlay_renders()
        for c in r.containers("greeter-client")
        if not c.init and c.setting("--lb", "GREETER_LB")
    ]
    assert jobs, "no overlay runs greeter-client through lookaside"
    for client in jobs:
        assert client.setting("--calls", "GREETER_CALLS") == "1000000", f"{client.where}: 1,000,000 calls"
        assert client.setting("--concurrency", "GREETER_CONCURRENCY") == "10", f"{client.where}: concurrency 10"
        assert not client.options("--json"), f"{client.where}: print the table, not JSON"


def test_client_jobs_fail_on_failed_calls_instead_of_rerunning():
    jobs = 0
    for rendered in all_renders():
        for client in rendered.containers("greeter-client"):
            if client.init:
                continue
            jobs += 1
            # greeter-client exits 2 when a call failed: that run is the result.
            rules = (client.workload["spec"].get("podFailurePolicy") or {}).get("rules") or []
            assert any(
                rule["action"] == "FailJob"
                and rule.get("onExitCodes", {}).get("containerName") == client.name
                and rule["onExitCodes"]["operator"] == "In"
                and 2 in rule["onExitCodes"]["values"]
                for rule in rules
            ), f"{client.where}: a run with failed calls would be retried and its result hidden"
    assert jobs


def admits(rule_peer: dict, pod_labels: dict, namespace: str) -> bool:
    """Whether a NetworkPolicy `from` peer admits a pod (namespace selectors: {} or by metadata.name)."""
    pod_selector = rule_peer.get("podSelector")
    ns_selector = rule_peer.get("namespaceSelector")
    if pod_selector is not None and not labels_match(pod_selector, pod_labels):
        return False
    if ns_selector is not None:
        return labels_match(ns_selector, {"kubernetes.io/metadata.name": namespace})
    return pod_selector is not None  # a podSelector alone: the policy's own namespace only


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_network_policy_admits_only_clients_to_the_lb_port(directory: Path):
    rendered = render(directory)
    lb = lb_server(rendered)
    if lb is None:
        return
    namespace = lb.workload["metadata"]["namespace"]
    policies = [
        p
        for p in rendered.of("NetworkPolicy")
        if p["metadata"]["namespace"] == namespace
        and lb.workload in rendered.pods_selected(namespace, p["spec"]["podSelector"])
    ]
    assert len(policies) == 1, f"{rendered.name}: {len(policies)} NetworkPolicies select lb-server's pods"
    policy = policies[0]["spec"]
    assert "Ingress" in policy["policyTypes"]
    grpc = lb.port("grpc")
    metrics = lb.port("metrics")
    grpc_rules, metrics_rules = [], []
    for rule in policy.get("ingress") or []:
        assert rule.get("from"), f"{rendered.name}: an ingress rule without `from` admits everyone"
        assert rule.get("ports"), f"{rendered.name}: an ingress rule without `ports` admits every port"
        for port in rule["ports"]:
            number = lb.port(port["port"])
            assert number in (grpc, metrics), (
                f"{rendered.name}: the policy names port {port['port']!r}, not lb-server's"
            )
            (grpc_rules if number == grpc else metrics_rules).append(rule)
    assert grpc_rules and metrics_rules
    for rule in grpc_rules:
        for peer in rule["from"]:
            assert (peer.get("podSelector") or {}).get("matchLabels"), (
                f"{rendered.name}: the LB port must admit labelled client pods only"
            )
    assert any(admits(peer, {}, "monitoring") for rule in metrics_rules for peer in rule["from"]), (
        f"{rendered.name}: the monitoring namespace cannot scrape lb-server"
    )
    # Every pod that talks to lb-server is admitted to its gRPC port.
    for client in rendered.containers("greeter-client"):
        if client.setting("--lb", "GREETER_LB"):
            labels = client.pod["metadata"].get("labels") or {}
            ns = client.workload["metadata"]["namespace"]
            assert any(admits(peer, labels, ns) for rule in grpc_rules for peer in rule["from"]), (
                f"{client.where}: its pods (labels {labels}) are not admitted to lb-server's gRPC port"
            )


def test_prometheus_annotations_name_the_metrics_port():
    for rendered in all_renders():
        lb = lb_server(rendered)
        if lb is None:
            continue
        annotations = lb.pod["metadata"].get("annotations") or {}
        metrics = port_of(lb.setting("--metrics-listen", "LB_METRICS_LISTEN", LB_METRICS_LISTEN_DEFAULT))
        assert annotations.get("prometheus.io/scrape") == "true", f"{rendered.name}: prometheus.io/scrape"
        assert annotations.get("prometheus.io/port") == str(metrics), f"{rendered.name}: prometheus.io/port"
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


# --------------------------------------------------------------------------- ingress


def test_ingress_speaks_grpc_over_tls_to_a_real_service():
    ingresses = 0
    for rendered in all_renders():
        for ingress in rendered.of("Ingress"):
            ingresses += 1
            name, namespace = ingress["metadata"]["name"], ingress["metadata"]["namespace"]
            annotations = ingress["metadata"].get("annotations") or {}
            assert annotations.get("nginx.ingress.kubernetes.io/backend-protocol") in ("GRPC", "GRPCS"), name
            assert annotations.get("nginx.ingress.kubernetes.io/ssl-redirect") == "true", name
            assert ingress["spec"].get("ingressClassName") == "nginx", name
            tls = ingress["spec"].get("tls") or []
            assert tls, f"{name}: gRPC through Ingress-NGINX needs TLS (HTTP/2)"
            tls_hosts = {h for entry in tls for h in entry.get("hosts") or []}
            for entry in tls:
                secret_name = entry["secretName"]
                secret = rendered.get("Secret", secret_name, namespace)
                if secret is None:
                    examples = [yaml.safe_load(p.read_text()) for p in rendered.dir.glob("*.example.yaml")]
                    matching = [e for e in examples if e["kind"] == "Secret" and e["metadata"]["name"] == secret_name]
                    assert matching, (
                        f"{name}: TLS secret {secret_name} is neither rendered nor shown in a *.example.yaml"
                    )
                    secret = matching[0]
                assert secret["metadata"].get("namespace") == namespace, (
                    f"{secret_name} must be in {namespace}, the Ingress's"
                )
                assert secret["type"] == "kubernetes.io/tls", f"{secret_name} must be of type kubernetes.io/tls"
                assert {"tls.crt", "tls.key"} <= set(secret.get("data") or secret.get("stringData") or {})
            for rule in ingress["spec"]["rules"]:
                assert rule.get("host") in tls_hosts, f"{name}: host {rule.get('host')} is not covered by TLS"
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    service = rendered.service(backend["name"], namespace)
                    assert service, f"{name}: no Service {namespace}/{backend['name']} in {rendered.name}"
                    ref = backend["port"].get("name", backend["port"].get("number"))
                    port = service_port(service, ref)
                    assert port, f"{name}: Service {backend['name']} has no port {ref!r}"
                    container, _ = service_target_port(rendered, service, port)
                    assert container.binary == "greeter-server", f"{name}: routes to {container.where}"
    assert ingresses


# --------------------------------------------------------------------------- the image build


def test_dockerfile_binaries_are_workspace_bin_targets():
    built = dockerfile_built_binaries()
    copied = dockerfile_copied_binaries()
    assert built == REQUIRED_BINARIES, f"the build stage builds {sorted(built)}"
    assert set(copied) == built, f"built {sorted(built)} but copied {sorted(copied)}"
    missing = built - workspace_bin_targets()
    assert not missing, f"the Dockerfile builds {sorted(missing)}, which are not bin targets of the workspace"
    for name, dest in copied.items():
        assert dest == f"/usr/local/bin/{name}", f"{name} is copied to {dest}"


def test_image_tag_is_the_workspace_version_and_builder_is_new_enough():
    image = dockerfile_image()
    packages = {p["name"]: p for p in cargo_metadata()["packages"]}
    assert image.split(":")[1] == packages["lb-server"]["version"], f"{image}: tag is not the workspace version"
    args = dockerfile_args()
    builder = expand(dockerfile_stages()[0][0].rest.split()[0], args)
    match = re.match(r"(?:docker\.io/)?(?:library/)?rust:(\d+)\.(\d+)", builder)
    assert match, f"the build stage is not an official rust:X.Y image: {builder}"
    # The newest rust-version any package or the workspace asks for.
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text()).get("workspace", {}).get("package", {})
    wanted = [v for v in [workspace.get("rust-version"), *(p.get("rust_version") for p in packages.values())] if v]
    assert wanted, "the workspace declares no rust-version"
    needed = max(tuple(int(x) for x in v.split(".")[:2]) for v in wanted)
    assert (int(match.group(1)), int(match.group(2))) >= needed, f"{builder} is older than rust-version {needed}"
    runtime = expand(dockerfile_stages()[-1][0].rest.split()[0], args)
    # Built against bookworm's glibc: the runtime must be Debian 12 too.
    assert "bookworm" in builder and ("debian12" in runtime or "bookworm" in runtime), f"{builder} -> {runtime}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the Dockerfile's ignore file excludes `path` (a top-level entry), `!` exceptions included."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_workspace_and_drops_build_output():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for path in ("target", ".venv", ".git"):
        assert dockerignored(path, patterns), f"{path} should not be sent to the build context"
    members = [Path(p["manifest_path"]).parent.relative_to(ROOT) for p in cargo_metadata()["packages"]]
    for needed in ["Cargo.toml", "Cargo.lock", *(str(m.parts[0]) for m in members)]:
        assert not dockerignored(needed, patterns), f"{needed} is needed to build but the ignore file drops it"


def test_deploy_readme_commands_match_the_manifests():
    text = DEPLOY_README.read_text()
    image = dockerfile_image()
    assert f"docker build -f deploy/Dockerfile -t {image} ." in text, f"deploy/README.md: build {image}"
    assert f"kind load docker-image {image}" in text, f"deploy/README.md: kind load {image}"
    named = re.findall(r"(?:docker build .*?-t|kind load docker-image|minikube image load) ([\w./:-]+)", text)
    assert all(n == image for n in named), f"deploy/README.md names images {sorted(set(named))}, not {image}"
    paths = set(re.findall(r"kubectl (?:apply|delete|kustomize) (?:-k )?(deploy/[\w./-]+)", text))
    assert paths, "deploy/README.md applies no kustomization"
    for path in paths:
        assert (ROOT / path) in KUSTOMIZATIONS, f"deploy/README.md names {path}, which is not a kustomization"
    assert {rel(d) for d in OVERLAYS} <= paths, "deploy/README.md does not show every overlay"
