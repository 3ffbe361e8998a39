"""Images: the seed's ``AccelContainerImage`` / ``Image.create`` (SEED_API §2.3, §8 step 10)
as a local, self-contained, deployable bundle directory.

A bundle (``<registry>/images/<name>/<version>/``) holds::

    model.bfpplan      the converted ONNX compiled with bfpaccel.compile (preprocessing and
                       output-name metadata travel inside the plan)
    server.json        what the server runs: route name, plan, port, format, inputs/outputs
    image.json         the seed's create payload + a manifest (sha256 of every file)
    Dockerfile         python:3.11-slim, pinned requirements, CMD python -m bfpaccel.serve
    requirements.txt   pinned to the versions installed where the image was created
    wheels/            put a bfpaccel wheel here before ``docker build`` (C++ extension)
    build.log          what Image.create did

Nothing here imports TensorFlow; onnx is needed only to compile an ``.onnx`` model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..formats import VECTOR_PRECISIONS
from ..registry import InUseError, Model, NotFoundError, Registry, RegistryError, parse_id
from ..registry._store import _fsync_dir, check_name, check_version, hash_file

__all__ = [
    "AccelContainerImage",
    "AccelImageConfiguration",
    "AccelInferenceConfig",
    "Image",
    "ImageError",
    "PAYLOAD_TEMPLATE",
    "pinned_requirements",
    "PLAN_FILE",
    "SERVER_PORT",
]

#: The seed's ``_data/accel_container_payload_template.json``.
PAYLOAD_TEMPLATE: Dict[str, Any] = {
    "name": None,
    "description": None,
    "kvTags": None,
    "modelIds": None,
    "properties": None,
    "imageFlavor": "AccelContainer",
    "imageType": "Docker",
}
PLAN_FILE = "model.bfpplan"
SERVER_PORT = 50051
#: What the server process imports at run time (pinned in requirements.txt when installed).
RUNTIME_PACKAGES = ("numpy", "simplejpeg", "Pillow", "tqdm", "grpcio", "grpcio-health-checking", "protobuf")


class ImageError(RegistryError):
    """An image could not be created (wrong model kind, compile failure, bad configuration)."""


def pinned_requirements(packages: Sequence[str] = RUNTIME_PACKAGES) -> List[str]:
    """``name==version`` for each package installed here; a comment for the missing ones.

    Example:
        >>> pinned_requirements(["numpy"])[0].startswith("numpy==")
        True
    """
    from importlib import metadata

    out = []
    for p in packages:
        try:
            out.append(f"{p}=={metadata.version(p)}")
        except metadata.PackageNotFoundError:
            out.append(f"# {p}: not installed where this image was created (left to bfpaccel's own requirements)")
    return out


class AccelImageConfiguration:
    """Configuration of an accelerated image (the seed's ``AccelImageConfiguration``).

    ``properties`` also steer the compile: ``format`` (default ``"msfp16"``),
    ``weight_format``, ``vector_precision``.

    Example:
        >>> cfg = AccelContainerImage.image_configuration(tags={"a": "b"})
        >>> cfg.build_create_payload(None, "img", ["m.1.accelonnx:1"])["imageFlavor"]
        'AccelContainer'
    """

    image_type = "Docker"
    image_flavor = "AccelContainer"

    def __init__(self, tags: Optional[Mapping[str, str]] = None, properties: Optional[Mapping[str, str]] = None,
                 description: Optional[str] = None) -> None:
        self.tags = dict(tags) if tags else None
        self.properties = dict(properties) if properties else None
        self.description = description

    def __repr__(self) -> str:
        return f"AccelImageConfiguration(tags={self.tags!r}, properties={self.properties!r})"

    def validate_configuration(self) -> None:
        """Checks the compile properties (the seed's did nothing)."""
        from ..formats import get_format

        props = self.properties or {}
        for key in ("format", "weight_format"):
            if key in props:
                try:
                    get_format(props[key])
                except (KeyError, ValueError) as e:
                    raise ImageError(f"image property {key}={props[key]!r}: {e}") from None
        vp = props.get("vector_precision")
        if vp is not None and str(vp).lower() not in VECTOR_PRECISIONS:
            raise ImageError(f"image property vector_precision={vp!r}: use fp16, bf16 or fp32")

    def build_create_payload(self, registry: Optional[Registry], name: str,
                             model_ids: Optional[Sequence[str]]) -> Dict[str, Any]:
        """The seed's JSON create payload: ``{name, description, kvTags, modelIds,
        properties, imageFlavor: "AccelContainer", imageType: "Docker"}``. ``registry`` is
        accepted for the seed's signature and unused."""
        if model_ids is None:
            raise ValueError("model_ids cannot be None")
        payload = copy.deepcopy(PAYLOAD_TEMPLATE)
        payload["name"] = name
        payload["description"] = self.description
        payload["kvTags"] = self.tags
        payload["modelIds"] = list(model_ids)
        payload["properties"] = self.properties
        return payload


class AccelContainerImage:
    """The seed's ``AccelContainerImage``: a factory of image configurations."""

    _image_type = "Docker"
    _image_flavor = "AccelContainer"

    @staticmethod
    def image_configuration(tags: Optional[Mapping[str, str]] = None, properties: Optional[Mapping[str, str]] = None,
                            description: Optional[str] = None) -> AccelImageConfiguration:
        """An :class:`AccelImageConfiguration` for :meth:`Image.create`.

        Example:
            >>> AccelContainerImage.image_configuration(properties={"format": "msfp12"}).properties
            {'format': 'msfp12'}
        """
        return AccelImageConfiguration(tags=tags, properties=properties, description=description)


def _model_artifact(model: Model) -> tuple:
    """(kind, path) of what an image can serve: ``("onnx", path)`` or ``("plan", path)``."""
    p = model.path
    candidates = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
    for ext, kind in ((".bfpplan", "plan"), (".onnx", "onnx")):
        hits = sorted(c for c in candidates if c.endswith(ext))
        if len(hits) == 1:
            return kind, hits[0]
        if len(hits) > 1:
            raise ImageError(f"model {model.id} holds {len(hits)} {ext} files; an image serves exactly one")
    raise ImageError(f"model {model.id} is not a converted model (no .onnx or .bfpplan in it): convert it first, "
                     f"e.g. AccelOnnxConverter.convert_tf_model(registry, {model.id!r}, input, outputs)")


def _dockerfile(name: str) -> str:
    from ..serve.config import ServerConfig

    # the server's command line, from the one declaration of its options
    cmd = ["python", "-m", "bfpaccel.serve"] + ServerConfig(
        plan=(f"/app/{PLAN_FILE}",), name=name, port=SERVER_PORT, host="0.0.0.0").to_argv(always=["plan", "name", "port"])
    return "\n".join([
        "# Generated by bfpaccel Image.create. Build: put a bfpaccel wheel into wheels/ (it has a C++",
        "# extension, so python:3.11-slim cannot build it from source), then",
        f"#   docker build -t {name} .   and   docker run -p {SERVER_PORT}:{SERVER_PORT} {name}",
        "FROM python:3.11-slim",
        "ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        "WORKDIR /app",
        "COPY requirements.txt /app/requirements.txt",
        "COPY wheels/ /app/wheels/",
        "RUN pip install --no-cache-dir --find-links /app/wheels -r /app/requirements.txt",
        f"COPY {PLAN_FILE} server.json image.json /app/",
        f"EXPOSE {SERVER_PORT}",
        "CMD " + json.dumps(cmd),
        "",
    ])


class Image:
    """A created image (bundle directory) in the registry; id ``"name:version"``.

    ``Image(registry, name, version=None)`` opens one (latest when None). Attributes:
    ``name``, ``version``, ``id``, ``model_id``, ``path`` (bundle dir), ``plan_path``,
    ``tags``, ``properties``, ``description``, ``payload`` (the seed's create payload),
    ``creation_state``, ``created_time``, ``image_location``.
    """

    def __init__(self, registry: Registry, name: str, version: Optional[int] = None) -> None:
        if version is None and ":" in name:
            name, version = parse_id(name)
        if version is None:
            rows = registry.query("SELECT * FROM images WHERE name=? ORDER BY version DESC LIMIT 1", (name,))
        else:
            rows = registry.query("SELECT * FROM images WHERE name=? AND version=?", (name, check_version(version)))
        if not rows:
            raise NotFoundError(f"image {name}{'' if version is None else ':' + str(version)} not found in "
                                f"{registry.root} (bfpaccel image list shows what exists)")
        self.registry = registry
        self._load(rows[0])

    @classmethod
    def _from_row(cls, registry: Registry, row: Any) -> "Image":
        im = cls.__new__(cls)
        im.registry = registry
        im._load(row)
        return im

    def _load(self, row: Any) -> None:
        self.name: str = row["name"]
        self.version: int = int(row["version"])
        self.model_id: str = row["model_id"]
        self.path: str = row["path"]
        self.description: Optional[str] = row["description"]
        self.tags: Dict[str, str] = json.loads(row["tags"])
        self.properties: Dict[str, str] = json.loads(row["properties"])
        self.payload: Dict[str, Any] = json.loads(row["payload"])
        self.creation_state: str = row["state"]
        self.created_time: float = float(row["created_time"])

    @property
    def id(self) -> str:
        """``"name:version"``."""
        return f"{self.name}:{self.version}"

    @property
    def plan_path(self) -> str:
        """The compiled plan inside the bundle."""
        return os.path.join(self.path, PLAN_FILE)

    @property
    def image_location(self) -> str:
        """Where the image lives: the local bundle directory (the seed gave an ACR path)."""
        return self.path

    @property
    def image_flavor(self) -> str:
        """``"AccelContainer"``."""
        return "AccelContainer"

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, model_id={self.model_id!r}, path={self.path!r})"

    def serialize(self) -> Dict[str, Any]:
        """A JSON-able dict of the image's record."""
        return {"id": self.id, "name": self.name, "version": self.version, "model_id": self.model_id,
                "path": self.path, "tags": self.tags, "properties": self.properties, "description": self.description,
                "creation_state": self.creation_state, "created_time": self.created_time, "payload": self.payload}

    # ------------------------------------------------------------------ create
    @staticmethod
    def create(registry: Registry, name: str, models: Sequence[Union[Model, str]],
               image_config: AccelImageConfiguration) -> "Image":
        """Build the deployable bundle of one converted model (compiles it to a BFP plan).

        ``models``: exactly one ``Model`` or id, an ONNX model (what the converter
        registers) or a ``.bfpplan``. The compile format comes from the image properties
        (``format``, default ``"msfp16"``; ``weight_format``; ``vector_precision``).

        Raises:
            ImageError: not exactly one model, a model that is not converted, a bad format,
                or a model the compiler cannot handle.
            NotFoundError: an unknown model id.
            CorruptedError: the model's stored files fail their hash check.

        Example:
            >>> cfg = AccelContainerImage.image_configuration()  # doctest: +SKIP
            >>> img = Image.create(reg, "resnet50-img", [converted], cfg)  # doctest: +SKIP
            >>> img.wait_for_creation(show_output=True)  # doctest: +SKIP
        """
        check_name(name, "image name")
        if not isinstance(image_config, AccelImageConfiguration):
            raise ImageError("image_config must come from AccelContainerImage.image_configuration()")
        models = list(models or [])
        if len(models) != 1:
            raise ImageError(f"an accelerated image holds exactly one model, got {len(models)}")
        model = models[0] if isinstance(models[0], Model) else Model(registry, str(models[0]))
        image_config.validate_configuration()
        payload = image_config.build_create_payload(registry, name, [model.id])
        props = dict(image_config.properties or {})
        fmt = str(props.get("format", "msfp16"))
        log: List[str] = []

        def say(msg: str) -> None:
            log.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}")

        model.verify()
        kind, src = _model_artifact(model)
        stage = registry.staging_dir()
        try:
            plan_out = os.path.join(stage, PLAN_FILE)
            t0 = time.perf_counter()
            if kind == "plan":
                from ..runtime import load_plan

                plan = load_plan(src)
                shutil.copyfile(src, plan_out)
                say(f"copied plan {os.path.basename(src)} of {model.id} (format {plan.format})")
            else:
                from ..runtime import compile as compile_plan

                say(f"compiling {os.path.basename(src)} of {model.id} to format {fmt}")
                try:
                    plan = compile_plan(src, format=fmt, weight_format=props.get("weight_format"),
                                        vector_precision=props.get("vector_precision"),
                                        metadata={"bfpaccel.image": name, "bfpaccel.model_id": model.id})
                except (ValueError, OSError) as e:
                    raise ImageError(f"compiling {model.id} failed: {e}") from e
                plan.save(plan_out)
                say(f"compiled in {time.perf_counter() - t0:.2f} s: {len(plan.graph.nodes)} ops, "
                    f"{plan.weight_bytes()} weight bytes")
            server = {
                "name": name,
                "model_id": model.id,
                "plan": f"/app/{PLAN_FILE}",
                "port": SERVER_PORT,
                "format": str(plan.format),
                "weight_format": str(plan.weight_format),
                "vector_precision": plan.vector_precision,
                "inputs": {k: v for k, v in plan.input_shapes.items()},
                "outputs": plan.output_names,
                "plan_metadata_keys": sorted(plan.metadata),
                "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            }
            with open(os.path.join(stage, "server.json"), "w") as f:
                json.dump(server, f, indent=2)
            from .. import __version__

            reqs = pinned_requirements()
            reqs.append(f"bfpaccel=={__version__}")
            with open(os.path.join(stage, "requirements.txt"), "w") as f:
                f.write("# pinned to the versions installed where this image was created\n" + "\n".join(reqs) + "\n")
            with open(os.path.join(stage, "Dockerfile"), "w") as f:
                f.write(_dockerfile(name))
            os.makedirs(os.path.join(stage, "wheels"))
            with open(os.path.join(stage, "wheels", "README.txt"), "w") as f:
                f.write("Put a bfpaccel wheel (pip wheel /path/to/bfpaccel) here before docker build.\n")
            manifest = {}
            for fn in (PLAN_FILE, "server.json", "requirements.txt", "Dockerfile"):
                sha, size = hash_file(os.path.join(stage, fn))
                manifest[fn] = {"sha256": sha, "size": size}
            with open(os.path.join(stage, "image.json"), "w") as f:
                json.dump({"payload": payload, "model_id": model.id, "model_sha256": model.digest,
                           "files": manifest}, f, indent=2)
            say("wrote server.json, Dockerfile, requirements.txt, image.json")
            with registry.write() as c:
                if c.execute("SELECT 1 FROM models WHERE name=? AND version=?",
                             (model.name, model.version)).fetchone() is None:
                    raise NotFoundError(f"model {model.id} was deleted while creating image {name}")
                version = registry.next_version(c, "image", name)
                final = os.path.join(registry.root, "images", name, str(version))
                say(f"image {name}:{version} created at {final}")
                with open(os.path.join(stage, "build.log"), "w") as f:
                    f.write("\n".join(log) + "\n")
                os.makedirs(os.path.dirname(final), exist_ok=True)
                if os.path.exists(final):  # left by a crash before a commit: not registered
                    shutil.rmtree(final)
                os.rename(stage, final)
                _fsync_dir(os.path.dirname(final))
                c.execute("INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?)",
                          (name, version, model.id, final, image_config.description,
                           json.dumps(image_config.tags or {}), json.dumps(props), json.dumps(payload),
                           "Succeeded", time.time()))
        finally:
            if os.path.isdir(stage):
                shutil.rmtree(stage, ignore_errors=True)
        return Image(registry, name, version)

    def wait_for_creation(self, show_output: bool = False) -> str:
        """Creation is synchronous here; prints the build log with ``show_output`` and
        returns the creation state (``"Succeeded"``)."""
        if show_output:
            try:
                with open(os.path.join(self.path, "build.log")) as f:
                    sys.stdout.write(f.read())
            except OSError:
                pass
            print(f"Image {self.id}: {self.creation_state}")
        return self.creation_state

    def verify(self) -> None:
        """Check the bundle's files against the hashes in ``image.json``."""
        from ..registry import CorruptedError

        with open(os.path.join(self.path, "image.json")) as f:
            files = json.load(f)["files"]
        for fn, rec in files.items():
            try:
                sha, size = hash_file(os.path.join(self.path, fn))
            except FileNotFoundError:
                raise CorruptedError(f"image {self.id}: {fn} is missing from {self.path}") from None
            if sha != rec["sha256"]:
                raise CorruptedError(f"image {self.id}: {fn} is corrupted (sha256 mismatch); re-create the image")

    @staticmethod
    def list(registry: Registry, name: Optional[str] = None, model_id: Optional[str] = None) -> List["Image"]:
        """Images, by name then version, optionally filtered by name or by model id."""
        rows = registry.query("SELECT * FROM images ORDER BY name, version")
        return [Image._from_row(registry, r) for r in rows
                if (name is None or r["name"] == name) and (model_id is None or r["model_id"] == model_id)]

    def run(self, *args: Any, **kwargs: Any) -> None:
        """The seed raised ``NotImplementedError("Can't run accel images locally.")``; here,
        deploy the image with ``Webservice.deploy_from_image(..., LocalTarget())``."""
        raise NotImplementedError("Image.run is not supported: deploy the image with "
                                  "Webservice.deploy_from_image(registry, name, image, "
                                  "LocalWebservice.deploy_configuration(), LocalTarget())")

    def delete(self) -> None:
        """Remove the image and its bundle; refused (:class:`InUseError`) while a deployment uses it."""
        with self.registry.write() as c:
            deps = c.execute("SELECT name FROM deployments WHERE image_id=?", (self.id,)).fetchall()
            if deps:
                raise InUseError(f"image {self.id} is used by deployment(s) {', '.join(r[0] for r in deps)}: "
                                 "delete the service first")
            n = c.execute("DELETE FROM images WHERE name=? AND version=?", (self.name, self.version)).rowcount
            if n == 0:
                raise NotFoundError(f"image {self.id} not found (already deleted?)")
            trash = None
            if os.path.isdir(self.path):
                trash = os.path.join(self.registry.root, "tmp", f"trash-{hashlib.sha1(self.path.encode()).hexdigest()}"
                                                                 f"-{time.time_ns()}")
                os.rename(self.path, trash)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)


class AccelInferenceConfig:
    """The seed's ``AccelInferenceConfig`` (SEED_API §2.4) for model-centric deploys.

    ``build_create_payload(registry, image_name, model_ids)``: exactly one id. A model that
    is not converted is first looked up as ``<name>.<ver>.accelonnx``; if absent, it is
    converted synchronously with ``input_tensor`` / ``output_tensor`` (needs TensorFlow).
    """

    def __init__(self, description: Optional[str] = None, input_tensor: Optional[str] = None,
                 output_tensor: Optional[str] = None, properties: Optional[Mapping[str, str]] = None) -> None:
        self.description = description
        self.input_tensor = input_tensor
        self.output_tensor = output_tensor
        self.properties = dict(properties) if properties else None
        self.converted_model: Optional[Model] = None

    def validate_configuration(self) -> None:
        """Does nothing (as the seed)."""

    def build_profile_payload(self, *args: Any, **kwargs: Any) -> None:
        """Always raises, as the seed."""
        raise ImageError("Model profiling is not supported for Accelerated models.")

    def resolve_model(self, registry: Registry, model_ids: Sequence[str]) -> Model:
        """The converted model to package (converting when needed)."""
        from ..registry import converted_name

        if model_ids is None or len(model_ids) != 1:
            raise ImageError(f"AccelInferenceConfig needs exactly one model id 'name:version', got {model_ids!r}")
        model = Model(registry, str(model_ids[0]))
        if model.parent_id is not None:
            return model
        try:
            return Model(registry, converted_name(model.name, model.version))
        except NotFoundError:
            pass
        if not self.input_tensor or not self.output_tensor:
            raise ImageError(f"model {model.id} is not converted and input_tensor/output_tensor are not set")
        from ..convert import AccelOnnxConverter

        op = AccelOnnxConverter.convert_tf_model(registry, model, self.input_tensor, self.output_tensor)
        if op.wait_for_completion() != "Succeeded":
            raise ImageError(f"converting {model.id} failed: {op.error}")
        return op.result

    def build_create_payload(self, registry: Registry, image_name: str, model_ids: Sequence[str]) -> Dict[str, Any]:
        """The AccelImageConfiguration payload for the (converted) model."""
        self.converted_model = self.resolve_model(registry, model_ids)
        cfg = AccelImageConfiguration(properties=self.properties, description=self.description)
        return cfg.build_create_payload(registry, image_name, [self.converted_model.id])
