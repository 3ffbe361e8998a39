"""Web services: the seed's ``Webservice.deploy_from_image`` (SEED_API §8 step 12) on a
local target (a ``python -m bfpaccel.serve`` subprocess on 127.0.0.1) or a Kubernetes
target (manifests written for ``kubectl apply``; nothing reaches a cluster).

Deployments are recorded in the registry DB (pid + its start time, port, state, the keys'
SHA-256 digests), so ``bfpaccel deploy local`` can return while the service keeps running, and
another process can list, check or delete it; a dead or recycled pid is detected.

Keys never appear on a command line nor in the database: they live in the registry's
``deployments/<name>/auth-keys`` (mode 0600, folder 0700), which a local server reads with
``--auth-key-file``; Kubernetes pods get them from a Secret mounted as files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..registry import NotFoundError, Registry, RegistryError
from ..registry._store import check_name, key_digest, key_record, private_dir
from ..serve.config import ServerConfig
from .image import Image

__all__ = [
    "AksWebservice",
    "DeploymentError",
    "KubernetesDeploymentConfiguration",
    "KubernetesTarget",
    "LocalDeploymentConfiguration",
    "LocalTarget",
    "LocalWebservice",
    "Webservice",
    "check_health",
    "generate_self_signed_cert",
]

#: Popen objects of services this process started (so their exit is reaped, not a zombie).
_CHILDREN: Dict[int, subprocess.Popen] = {}


class DeploymentError(RegistryError):
    """A deployment failed to start, became unhealthy, or was asked for something it lacks."""


# ---------------------------------------------------------------------- configurations
@dataclass
class LocalDeploymentConfiguration:
    """How to run a local service (see :meth:`LocalWebservice.deploy_configuration`)."""

    port: Optional[int] = None
    auth_enabled: bool = False
    ssl_enabled: bool = False
    ssl_cert_pem_file: Optional[str] = None
    ssl_key_pem_file: Optional[str] = None
    ssl_cname: Optional[str] = None
    workers: Optional[int] = None
    metrics_port: Optional[int] = None
    tags: Dict[str, str] = field(default_factory=dict)
    description: Optional[str] = None

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings."""
        if self.port is not None and not 0 < int(self.port) < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if (self.ssl_cert_pem_file is None) != (self.ssl_key_pem_file is None):
            raise ValueError("give both ssl_cert_pem_file and ssl_key_pem_file, or neither (a self-signed "
                             "certificate is generated)")
        if self.ssl_cert_pem_file and not self.ssl_enabled:
            raise ValueError("ssl_cert_pem_file given but ssl_enabled is False")
        if self.workers is not None and int(self.workers) < 1:
            raise ValueError("workers must be >= 1")


@dataclass
class KubernetesDeploymentConfiguration(LocalDeploymentConfiguration):
    """How to run a service on Kubernetes (see :meth:`AksWebservice.deploy_configuration`)."""

    autoscale_enabled: bool = False
    autoscale_min_replicas: int = 1
    autoscale_max_replicas: int = 10
    autoscale_target_utilization: int = 70
    num_replicas: int = 1
    cpu_cores: float = 1.0
    memory_gb: float = 2.0
    cpu_cores_limit: Optional[float] = None
    memory_gb_limit: Optional[float] = None

    def validate(self) -> None:
        super().validate()
        if self.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        if self.autoscale_enabled and not 1 <= self.autoscale_min_replicas <= self.autoscale_max_replicas:
            raise ValueError("need 1 <= autoscale_min_replicas <= autoscale_max_replicas")
        if not 0 < self.autoscale_target_utilization <= 100:
            raise ValueError("autoscale_target_utilization is a percentage in 1..100")
        if self.cpu_cores <= 0 or self.memory_gb <= 0:
            raise ValueError("cpu_cores and memory_gb must be > 0")


class LocalWebservice:
    """Factory of local deployment configurations (the seed's ``LocalWebservice``)."""

    @staticmethod
    def deploy_configuration(port: Optional[int] = None, auth_enabled: bool = False, ssl_enabled: bool = False,
                             ssl_cert_pem_file: Optional[str] = None, ssl_key_pem_file: Optional[str] = None,
                             ssl_cname: Optional[str] = None, workers: Optional[int] = None,
                             metrics_port: Optional[int] = None, tags: Optional[Dict[str, str]] = None,
                             description: Optional[str] = None) -> LocalDeploymentConfiguration:
        """A local service on 127.0.0.1 (``port`` None: a free one).

        ``auth_enabled``: two keys are generated (``get_keys``); ``ssl_enabled`` without PEM
        files: a self-signed certificate for localhost/127.0.0.1 (+ ``ssl_cname``).

        Example:
            >>> LocalWebservice.deploy_configuration(auth_enabled=True).auth_enabled
            True
        """
        cfg = LocalDeploymentConfiguration(port, auth_enabled, ssl_enabled, ssl_cert_pem_file, ssl_key_pem_file,
                                           ssl_cname, workers, metrics_port, dict(tags or {}), description)
        cfg.validate()
        return cfg


class AksWebservice:
    """Factory of Kubernetes deployment configurations (the seed's ``AksWebservice``)."""

    @staticmethod
    def deploy_configuration(autoscale_enabled: bool = False, autoscale_min_replicas: int = 1,
                             autoscale_max_replicas: int = 10, autoscale_target_utilization: int = 70,
                             num_replicas: int = 1, auth_enabled: bool = False, cpu_cores: float = 1.0,
                             memory_gb: float = 2.0, cpu_cores_limit: Optional[float] = None,
                             memory_gb_limit: Optional[float] = None, ssl_enabled: bool = False,
                             ssl_cert_pem_file: Optional[str] = None, ssl_key_pem_file: Optional[str] = None,
                             ssl_cname: Optional[str] = None, workers: Optional[int] = None,
                             tags: Optional[Dict[str, str]] = None,
                             description: Optional[str] = None) -> KubernetesDeploymentConfiguration:
        """Replicas (fixed, or a HorizontalPodAutoscaler on CPU), resources, auth, TLS.

        Example:
            >>> AksWebservice.deploy_configuration(num_replicas=2, cpu_cores=0.5).num_replicas
            2
        """
        cfg = KubernetesDeploymentConfiguration(
            port=None, auth_enabled=auth_enabled, ssl_enabled=ssl_enabled, ssl_cert_pem_file=ssl_cert_pem_file,
            ssl_key_pem_file=ssl_key_pem_file, ssl_cname=ssl_cname, workers=workers, metrics_port=None,
            tags=dict(tags or {}), description=description, autoscale_enabled=autoscale_enabled,
            autoscale_min_replicas=autoscale_min_replicas, autoscale_max_replicas=autoscale_max_replicas,
            autoscale_target_utilization=autoscale_target_utilization, num_replicas=num_replicas,
            cpu_cores=cpu_cores, memory_gb=memory_gb, cpu_cores_limit=cpu_cores_limit,
            memory_gb_limit=memory_gb_limit)
        cfg.validate()
        return cfg


# ---------------------------------------------------------------------- targets
@dataclass
class LocalTarget:
    """Run the service on this machine as a subprocess on ``host`` (loopback).

    ``server_command``: the command prefix that starts a server (default
    ``[sys.executable, "-m", "bfpaccel.serve"]``); the deploy appends the flags of a
    :class:`~bfpaccel.serve.config.ServerConfig` (``ServerConfig.to_argv``): ``--plan P --name N
    --port P [--tls-cert F --tls-key F] [--auth-key-file F] [--workers N] [--metrics-port P]``
    (the key file holds one key per line; keys are never put on the command line).
    """

    server_command: Optional[Sequence[str]] = None
    host: str = "127.0.0.1"
    kind: str = "local"

    def command(self) -> List[str]:
        """The server command prefix."""
        return list(self.server_command) if self.server_command else [sys.executable, "-m", "bfpaccel.serve"]


@dataclass
class KubernetesTarget:
    """Write Kubernetes manifests into ``output_dir/<service name>/`` (apply them with
    ``kubectl apply -f``). ``image_registry``: where ``docker push`` put the image (the
    container image is ``<image_registry>/<image name>:<image version>``)."""

    output_dir: str
    namespace: str = "default"
    image_registry: str = "localhost:5000"
    service_type: str = "LoadBalancer"
    kind: str = "kubernetes"


# ---------------------------------------------------------------------- helpers
def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _proc_start(pid: int) -> Optional[str]:
    """Start time of a process (clock ticks since boot; Linux), to tell a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def _alive(pid: Optional[int], start: Optional[str]) -> bool:
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    if os.path.isdir("/proc"):
        now = _proc_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def generate_self_signed_cert(cert_path: str, key_path: str, cname: Optional[str] = None, days: int = 365) -> None:
    """Write a self-signed certificate (SAN: localhost, 127.0.0.1, ``cname``) and its key.

    Uses the ``cryptography`` package when installed, else the ``openssl`` command.
    """
    names = ["localhost"] + ([cname] if cname and cname != "localhost" else [])
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1"])
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key_path, "-out", cert_path, "-days", str(days),
                        "-subj", f"/CN={names[-1]}", "-addext", f"subjectAltName={san}"],
                       check=True, capture_output=True)
        os.chmod(key_path, 0o600)
        return
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]
                                                       + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def check_health(host: str, port: int, *, tls_cert: Optional[str] = None, server_name: Optional[str] = None,
                 key: Optional[str] = None, timeout: float = 2.0, service: str = "") -> str:
    """One ``grpc.health.v1.Health/Check`` call; returns ``"SERVING"``, ``"NOT_SERVING"``,
    ``"UNKNOWN"``, ``"UNIMPLEMENTED"`` (the port speaks gRPC but has no health service) or
    ``"UNREACHABLE"``. The messages are encoded by hand, so grpcio alone is enough.

    Example:
        >>> check_health("127.0.0.1", 1, timeout=0.2)
        'UNREACHABLE'
    """
    import grpc

    target = f"{host}:{port}"
    if tls_cert:
        with open(tls_cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        opts = [("grpc.ssl_target_name_override", server_name or "localhost")]
        channel = grpc.secure_channel(target, creds, options=opts)
    else:
        channel = grpc.insecure_channel(target)
    # HealthCheckRequest{string service = 1}
    svc = service.encode()
    request = (b"\x0a" + bytes([len(svc)]) + svc) if svc else b""
    metadata = [("authorization", f"Bearer {key}")] if key else None
    try:
        call = channel.unary_unary("/grpc.health.v1.Health/Check")
        reply = call(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "UNIMPLEMENTED"
        if code == grpc.StatusCode.NOT_FOUND:
            return "NOT_SERVING"
        return "UNREACHABLE"
    finally:
        channel.close()
    # HealthCheckResponse{ServingStatus status = 1}: 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING
    status = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0
    return {1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(status, "UNKNOWN")


def _new_key() -> str:
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------- the service
class Webservice:
    """A deployed service (the seed's ``Webservice`` / ``AksWebservice``).

    ``Webservice(registry, name)`` opens a recorded one. Attributes: ``name``,
    ``image_id``, ``compute_type`` (``"local"`` or ``"kubernetes"``), ``scoring_uri``
    (``http(s)://127.0.0.1:<port>`` locally), ``port``, ``pid``, ``auth_enabled``,
    ``ssl_enabled``, ``tls_cert_path`` (trust it, e.g. ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``),
    ``workdir`` (logs; manifests for Kubernetes), ``state``.
    """

    def __init__(self, registry: Registry, name: str) -> None:
        rows = registry.query("SELECT * FROM deployments WHERE name=?", (name,))
        if not rows:
            raise NotFoundError(f"service {name!r} not found in {registry.root} (bfpaccel deploy list shows them)")
        self.registry = registry
        self._load(rows[0])

    def _load(self, row: Any) -> None:
        self.name: str = row["name"]
        self.image_id: str = row["image_id"]
        self.compute_type: str = row["target"]
        self.config: Dict[str, Any] = json.loads(row["config"])
        self.pid: Optional[int] = row["pid"]
        self._pid_start: Optional[str] = row["pid_start"]
        self.port: Optional[int] = row["port"]
        self.scoring_uri: Optional[str] = row["scoring_uri"]
        rec = json.loads(row["keys"])
        # schema 2: {"sha256": [digests]}; a plain list is a record written before the keys moved
        # to their file (the registry migrates those when it opens)
        self._key_digests: List[str] = (list(rec.get("sha256", [])) if isinstance(rec, dict)
                                        else [key_digest(k) for k in rec])
        self._state: str = row["state"]
        self.workdir: str = row["workdir"]
        self.created_time: float = float(row["created_time"])

    @classmethod
    def _from_row(cls, registry: Registry, row: Any) -> "Webservice":
        w = cls.__new__(cls)
        w.registry = registry
        w._load(row)
        return w

    def __repr__(self) -> str:
        return f"Webservice(name={self.name!r}, image={self.image_id!r}, state={self.state!r}, uri={self.scoring_uri!r})"

    @property
    def _keys(self) -> List[str]:
        """The keys, read from the key file and checked against the recorded digests."""
        if not self._key_digests:
            return []
        keys = self.registry.read_keys(self.name)
        if [key_digest(k) for k in keys] != self._key_digests:
            raise DeploymentError(f"the key file {self.registry.keys_path(self.name)} of service {self.name} is "
                                  "missing or does not hold the keys recorded for it: regen_key() makes new ones")
        return keys

    @property
    def keys_path(self) -> Optional[str]:
        """The file holding the service's keys (0600; None without auth)."""
        return self.registry.keys_path(self.name) if self._key_digests else None

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must send a key."""
        return bool(self.config.get("auth_enabled"))

    @property
    def ssl_enabled(self) -> bool:
        """Whether the service speaks TLS."""
        return bool(self.config.get("ssl_enabled"))

    @property
    def tls_cert_path(self) -> Optional[str]:
        """The certificate the service presents (None without TLS)."""
        return self.config.get("tls_cert")

    @property
    def log_path(self) -> str:
        """The server's stdout/stderr (local services)."""
        return os.path.join(self.workdir, "server.log")

    def get_logs(self, num_lines: int = 5000) -> str:
        """The last lines of the server's log."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-num_lines:])
        except OSError:
            return ""

    def serialize(self) -> Dict[str, Any]:
        """A JSON-able dict of the record (keys left out)."""
        return {"name": self.name, "image_id": self.image_id, "compute_type": self.compute_type,
                "state": self.state, "scoring_uri": self.scoring_uri, "port": self.port, "pid": self.pid,
                "auth_enabled": self.auth_enabled, "ssl_enabled": self.ssl_enabled, "workdir": self.workdir,
                "created_time": self.created_time}

    # ------------------------------------------------------------------ state
    def _set_state(self, state: str) -> None:
        with self.registry.write() as c:
            c.execute("UPDATE deployments SET state=? WHERE name=?", (state, self.name))
        self._state = state

    @property
    def state(self) -> str:
        """``Transitioning`` (starting), ``Healthy``, ``Unhealthy``, ``Failed`` (the
        process is gone) for local services; ``Generated`` for written manifests."""
        if self.compute_type == "local" and self._state not in ("Failed",) and not _alive(self.pid, self._pid_start):
            self._set_state("Failed")
        return self._state

    def check_health(self, timeout: float = 2.0) -> str:
        """One health RPC against a local service (see :func:`check_health`)."""
        if self.compute_type != "local":
            raise DeploymentError(f"service {self.name} runs on {self.compute_type}: check it with kubectl")
        return check_health("127.0.0.1", int(self.port or 0), tls_cert=self.tls_cert_path,
                            server_name=self.config.get("ssl_cname") or "localhost",
                            key=next(iter(self._keys), None), timeout=timeout)

    def wait_for_deployment(self, show_output: bool = False, timeout: float = 120.0) -> str:
        """Poll until the service answers its gRPC health check (``Healthy``), its process
        dies (``Failed``, with the log tail in the error) or ``timeout`` seconds pass
        (``Unhealthy``). Returns the state; raises :class:`DeploymentError` on failure."""
        if self.compute_type != "local":
            if show_output:
                print(f"Manifests for {self.name} are in {self.workdir}: kubectl apply -f {self.workdir}")
            return self.state
        deadline = time.monotonic() + float(timeout)
        last = ""
        while True:
            if not _alive(self.pid, self._pid_start):
                self._set_state("Failed")
                raise DeploymentError(f"service {self.name} exited while starting. Log {self.log_path}:\n"
                                      + "\n".join(self.get_logs().splitlines()[-20:]))
            status = self.check_health(timeout=1.0)
            if show_output and status != last:
                print(f"{self.name}: " + ("starting (port not answering yet)" if status == "UNREACHABLE"
                                          else f"health {status}"))
                last = status
            if status in ("SERVING", "UNIMPLEMENTED"):  # UNIMPLEMENTED: a gRPC server without health service
                self._set_state("Healthy")
                if show_output:
                    print(f"{self.name}: Healthy at {self.scoring_uri}")
                return "Healthy"
            if time.monotonic() >= deadline:
                self._set_state("Unhealthy")
                raise DeploymentError(f"service {self.name} did not become healthy in {timeout:g} s (last health "
                                      f"check: {status}). Log {self.log_path}:\n"
                                      + "\n".join(self.get_logs().splitlines()[-20:]))
            time.sleep(0.2)

    # ------------------------------------------------------------------ keys
    def get_keys(self) -> Tuple[str, str]:
        """(primary, secondary) keys; :class:`DeploymentError` when auth is not enabled.

        The only call that shows the keys: they are read from the service's key file (0600),
        never stored in the database, printed or put on a command line."""
        if not self.auth_enabled:
            raise DeploymentError(f"service {self.name} does not have key auth enabled")
        keys = self._keys
        return keys[0], keys[1]

    def regen_key(self, key: str = "Primary") -> Tuple[str, str]:
        """Replace the ``"Primary"`` or ``"Secondary"`` key; a running local service is
        restarted with the new keys (Kubernetes: the Secret manifest is rewritten). When the
        key file was lost, both keys are replaced."""
        if key not in ("Primary", "Secondary"):
            raise ValueError("key must be 'Primary' or 'Secondary'")
        if not self.auth_enabled:
            raise DeploymentError(f"service {self.name} does not have key auth enabled")
        try:
            keys = list(self.get_keys())
        except DeploymentError:
            keys = [_new_key(), _new_key()]
        keys[0 if key == "Primary" else 1] = _new_key()
        self.registry.write_keys(self.name, keys)
        with self.registry.write() as c:
            c.execute("UPDATE deployments SET keys=? WHERE name=?", (key_record(keys), self.name))
        self._key_digests = [key_digest(k) for k in keys]
        if self.compute_type == "local":
            self._stop()
            target = LocalTarget(self.config.get("server_command"))
            _start_local(self.registry, self, target)
            self.wait_for_deployment()
        else:
            from .k8s import write_manifests

            write_manifests(self, Image(self.registry, self.image_id), KubernetesTarget(**self.config["target"]))
        return keys[0], keys[1]

    # ------------------------------------------------------------------ delete
    def _stop(self, grace: float = 10.0) -> None:
        if self.compute_type != "local" or not _alive(self.pid, self._pid_start):
            return
        pid = int(self.pid or 0)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)  # the server runs in its own session: its group id is its pid
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _alive(pid, self._pid_start):
                time.sleep(0.05)
            if not _alive(pid, self._pid_start):
                break
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait()

    def delete(self) -> None:
        """Stop the service (SIGTERM, then SIGKILL after 10 s) and remove its record.
        Kubernetes: only the record goes; ``kubectl delete -f <workdir>`` removes it there."""
        self._stop()
        with self.registry.write() as c:
            c.execute("DELETE FROM deployments WHERE name=?", (self.name,))
        if self.compute_type == "local":
            shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(os.path.dirname(self.registry.keys_path(self.name)), ignore_errors=True)
        self._state = "Deleted"

    # ------------------------------------------------------------------ deploy / list
    @staticmethod
    def deploy_from_image(registry: Registry, name: str, image: Union[Image, str],
                          deployment_config: Optional[LocalDeploymentConfiguration] = None,
                          deployment_target: Union[LocalTarget, KubernetesTarget, None] = None) -> "Webservice":
        """Deploy an image as service ``name``; returns at once (call
        :meth:`wait_for_deployment`). Default target: :class:`LocalTarget`.

        Example:
            >>> cfg = LocalWebservice.deploy_configuration(auth_enabled=True)  # doctest: +SKIP
            >>> svc = Webservice.deploy_from_image(reg, "rn50", image, cfg, LocalTarget())  # doctest: +SKIP
            >>> svc.wait_for_deployment(); svc.scoring_uri  # doctest: +SKIP
            'http://127.0.0.1:41231'
        """
        check_name(name, "service name")
        image = image if isinstance(image, Image) else Image(registry, str(image))
        image.verify()
        target = deployment_target if deployment_target is not None else LocalTarget()
        if deployment_config is None:
            deployment_config = (AksWebservice.deploy_configuration() if isinstance(target, KubernetesTarget)
                                 else LocalWebservice.deploy_configuration())
        deployment_config.validate()
        if isinstance(target, KubernetesTarget) and not isinstance(deployment_config, KubernetesDeploymentConfiguration):
            raise DeploymentError("a KubernetesTarget needs AksWebservice.deploy_configuration(...)")
        cfg = asdict(deployment_config)
        keys = [_new_key(), _new_key()] if deployment_config.auth_enabled else []
        if isinstance(target, KubernetesTarget):
            workdir = os.path.abspath(os.path.join(target.output_dir, name))
            cfg["target"] = {k: v for k, v in asdict(target).items() if k != "kind"}
            cfg["target"]["output_dir"] = os.path.abspath(target.output_dir)
        else:
            workdir = os.path.join(registry.root, "deployments", name)
            cfg["server_command"] = target.server_command and list(target.server_command)
        with registry.write() as c:
            if c.execute("SELECT 1 FROM deployments WHERE name=?", (name,)).fetchone():
                raise DeploymentError(f"a service named {name!r} already exists: delete it first "
                                      f"(bfpaccel deploy delete {name}) or pick another name")
            c.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (name, image.id, target.kind, json.dumps(cfg), None, None, None, None, key_record(keys),
                       "Transitioning", workdir, time.time()))
        svc: Optional[Webservice] = None
        try:
            if keys:
                registry.write_keys(name, keys)
            svc = Webservice(registry, name)
            if isinstance(target, KubernetesTarget):
                from .k8s import write_manifests

                write_manifests(svc, image, target)
                svc._set_state("Generated")
            else:
                _start_local(registry, svc, target)
        except BaseException:
            if svc is not None:
                svc._stop()
            with registry.write() as c:
                c.execute("DELETE FROM deployments WHERE name=?", (name,))
            shutil.rmtree(os.path.dirname(registry.keys_path(name)), ignore_errors=True)
            raise
        return Webservice(registry, name)

    @staticmethod
    def list(registry: Registry, image_name: Optional[str] = None,
             compute_type: Optional[str] = None) -> List["Webservice"]:
        """Recorded services (local ones whose process died show state ``Failed``)."""
        out = [Webservice._from_row(registry, r) for r in registry.query("SELECT * FROM deployments ORDER BY name")]
        return [w for w in out if (image_name is None or w.image_id.split(":")[0] == image_name)
                and (compute_type is None or w.compute_type == compute_type)]


def _start_local(registry: Registry, svc: Webservice, target: LocalTarget) -> None:
    """Start (or restart) the server subprocess of ``svc`` and record its pid and port."""
    image = Image(registry, svc.image_id)
    cfg = svc.config
    private_dir(svc.workdir)
    port = int(cfg.get("port") or svc.port or _free_port(target.host))
    server: Dict[str, Any] = {"plan": (image.plan_path,), "name": svc.name, "port": port,
                              "metrics_port": cfg.get("metrics_port") or None}
    if cfg.get("ssl_enabled"):
        cert, key = cfg.get("ssl_cert_pem_file") or "", cfg.get("ssl_key_pem_file") or ""
        if not cert:
            cert, key = os.path.join(svc.workdir, "tls.crt"), os.path.join(svc.workdir, "tls.key")
            if not os.path.exists(cert):
                generate_self_signed_cert(cert, key, cfg.get("ssl_cname"))
        cfg["tls_cert"], cfg["tls_key"] = os.path.abspath(cert), os.path.abspath(key)
        server["tls_cert"], server["tls_key"] = cfg["tls_cert"], cfg["tls_key"]
    if svc._key_digests:
        _ = svc._keys  # the key file must hold the recorded keys (DeploymentError otherwise)
        server["auth_key_files"] = (registry.keys_path(svc.name),)  # the keys never go on the command line
    if cfg.get("workers"):
        server["workers"] = int(cfg["workers"])
    # the plan, route name and port always; workers when the deployment chose them
    cmd = target.command() + ServerConfig(**server).to_argv(
        always=["plan", "name", "port"] + (["workers"] if cfg.get("workers") else []))
    log = open(svc.log_path, "ab")
    try:
        # own session: the service outlives the deploying process (the CLI returns) and is
        # stopped by process group
        env = dict(os.environ)
        env.pop("BFPACCEL_AUTH_KEY", None)  # the service accepts its own keys only (the key file)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=svc.workdir, env=env)
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    start = _proc_start(proc.pid)
    scheme = "https" if cfg.get("ssl_enabled") else "http"
    uri = f"{scheme}://{target.host}:{port}"
    with registry.write() as c:
        c.execute("UPDATE deployments SET pid=?, pid_start=?, port=?, scoring_uri=?, config=?, state=? WHERE name=?",
                  (proc.pid, start, port, uri, json.dumps(cfg), "Transitioning", svc.name))
    svc.pid, svc._pid_start, svc.port, svc.scoring_uri, svc.config = proc.pid, start, port, uri, cfg
    svc._state = "Transitioning"
