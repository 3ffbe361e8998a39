"""``Model``: a registered model (the seed's ``azureml.core.Model``, SEED_API §8 step 8)."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ._store import (
    CorruptedError,
    InUseError,
    NotFoundError,
    Registry,
    _copy_hashing,
    _test_pause,
    check_name,
    check_version,
    parse_id,
)

__all__ = ["Model"]

TagFilter = Union[None, Mapping[str, Optional[str]], Sequence[Union[str, Sequence[str]]]]


def _tag_filter(tags: TagFilter) -> List[tuple]:
    """``["a", ["b", "1"]]`` / ``{"a": None, "b": "1"}`` -> ``[("a", None), ("b", "1")]``."""
    if tags is None:
        return []
    if isinstance(tags, Mapping):
        return [(str(k), None if v is None else str(v)) for k, v in tags.items()]
    out: List[tuple] = []
    for t in tags:
        if isinstance(t, str):
            out.append((t, None))
        elif len(t) == 1:
            out.append((str(t[0]), None))
        elif len(t) == 2:
            out.append((str(t[0]), str(t[1])))
        else:
            raise ValueError(f"tag filter {t!r}: use 'key' or ['key', 'value']")
    return out


class Model:
    """A registered model, ``id = "name:version"``.

    ``Model(registry, name, version=None)`` opens one (the latest version when ``version`` is
    None; an id ``"name:3"`` works as ``name`` too) and raises :class:`NotFoundError` when it
    does not exist.

    Attributes: ``registry``, ``name``, ``version`` (int), ``id``, ``tags`` (dict),
    ``properties`` (dict), ``description``, ``parent_id`` (the source model's id for a
    converted model, else None), ``created_time`` (epoch seconds), ``digest`` (content
    address), ``size`` (bytes), ``path`` (the file or directory inside the store).

    Example:
        >>> import tempfile, os
        >>> from bfpaccel.registry import Registry, Model
        >>> reg = Registry(tempfile.mkdtemp())
        >>> p = os.path.join(reg.root, "w.bin"); _ = open(p, "wb").write(b"abc")
        >>> _ = Model.register(reg, p, "toy", tags={"area": "vision"})
        >>> m = Model(reg, "toy"); (m.id, m.tags)
        ('toy:1', {'area': 'vision'})
    """

    def __init__(self, registry: Registry, name: str, version: Optional[int] = None) -> None:
        if version is None and ":" in name:
            name, version = parse_id(name)
        if version is None:
            rows = registry.query("SELECT * FROM models WHERE name=? ORDER BY version DESC LIMIT 1", (name,))
        else:
            rows = registry.query("SELECT * FROM models WHERE name=? AND version=?", (name, check_version(version)))
        if not rows:
            known = registry.query("SELECT version FROM models WHERE name=? ORDER BY version", (name,))
            if known:
                raise NotFoundError(f"model {name}:{version} not found in {registry.root}; versions of {name!r}: "
                                    + ", ".join(str(r[0]) for r in known))
            raise NotFoundError(f"model {name!r} not found in {registry.root} (bfpaccel registry list shows "
                                "what is registered)")
        self.registry = registry
        self._load(rows[0])

    @classmethod
    def _from_row(cls, registry: Registry, row: Any) -> "Model":
        m = cls.__new__(cls)
        m.registry = registry
        m._load(row)
        return m

    def _load(self, row: Any) -> None:
        self.name: str = row["name"]
        self.version: int = int(row["version"])
        self.digest: str = row["digest"]
        self.artifact: str = row["artifact"]
        self.kind: str = row["kind"]
        self.size: int = int(row["size"])
        self.description: Optional[str] = row["description"]
        self.tags: Dict[str, str] = json.loads(row["tags"])
        self.properties: Dict[str, str] = json.loads(row["properties"])
        self.parent_id: Optional[str] = row["parent_id"]
        self.created_time: float = float(row["created_time"])

    @property
    def id(self) -> str:
        """``"name:version"``."""
        return f"{self.name}:{self.version}"

    @property
    def path(self) -> str:
        """The registered file or directory inside the store (read it, do not modify it;
        hashes are checked by :meth:`verify`, :meth:`download` and the converter)."""
        return os.path.join(self.registry.object_dir(self.digest), "data", self.artifact)

    def __repr__(self) -> str:
        parent = f", parent_id={self.parent_id!r}" if self.parent_id else ""
        return f"Model(id={self.id!r}, tags={self.tags!r}{parent})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Model) and other.registry.root == self.registry.root and other.id == self.id

    def __hash__(self) -> int:
        return hash((self.registry.root, self.id))

    def serialize(self) -> Dict[str, Any]:
        """A JSON-able dict of the model's record."""
        return {"id": self.id, "name": self.name, "version": self.version, "tags": self.tags,
                "properties": self.properties, "description": self.description, "parent_id": self.parent_id,
                "created_time": self.created_time, "sha256": self.digest, "size": self.size,
                "kind": self.kind, "path": self.path}

    # ------------------------------------------------------------------ register / list
    @staticmethod
    def register(
        registry: Registry,
        model_path: Union[str, "os.PathLike[str]"],
        model_name: str,
        tags: Optional[Mapping[str, str]] = None,
        description: Optional[str] = None,
        properties: Optional[Mapping[str, Any]] = None,
        *,
        parent_id: Optional[str] = None,
    ) -> "Model":
        """Copy a file or directory into the store and register it as the next version of
        ``model_name`` (1, 2, ...; versions are never reused).

        The copy is content-addressed (SHA-256) and atomic: a crash at any point leaves
        either the complete new version or nothing visible. ``parent_id``: the source
        model's id when this is a converted model (set by the converter).

        Example:
            >>> import tempfile, os
            >>> reg = Registry(tempfile.mkdtemp())
            >>> p = os.path.join(reg.root, "w.bin"); _ = open(p, "wb").write(b"abc")
            >>> [Model.register(reg, p, "toy").version for _ in range(2)]
            [1, 2]
        """
        check_name(model_name, "model name")
        tags_d = {str(k): str(v) for k, v in (tags or {}).items()}
        props_d = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (properties or {}).items()}
        if parent_id is not None:
            Model(registry, *parse_id(parent_id))  # fail early with NOT_FOUND
        stage, manifest = registry.stage_artifact(os.fspath(model_path))
        try:
            with registry.write() as c:
                if parent_id is not None:
                    pn, pv = parse_id(parent_id)
                    if c.execute("SELECT 1 FROM models WHERE name=? AND version=?", (pn, pv)).fetchone() is None:
                        raise NotFoundError(f"parent model {parent_id} was deleted while registering {model_name}")
                version = registry.next_version(c, "model", model_name)
                registry.commit_object(stage, manifest["digest"])
                c.execute("INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (model_name, version, manifest["digest"], manifest["name"], manifest["kind"],
                           manifest["size"], description, json.dumps(tags_d, sort_keys=True),
                           json.dumps(props_d, sort_keys=True), parent_id, time.time()))
                _test_pause("commit")
        finally:
            if os.path.isdir(stage):
                shutil.rmtree(stage, ignore_errors=True)
        return Model(registry, model_name, version)

    @staticmethod
    def list(registry: Registry, name: Optional[str] = None, tags: TagFilter = None,
             latest: bool = False) -> List["Model"]:
        """Registered models, by name then version; filtered by ``name`` and by ``tags``
        (``["key"]`` or ``[["key", "value"]]`` or a dict; all must match); ``latest``: only
        the newest version of each name.

        Example:
            >>> import tempfile
            >>> Model.list(Registry(tempfile.mkdtemp()))
            []
        """
        if name is not None:
            rows = registry.query("SELECT * FROM models WHERE name=? ORDER BY version", (name,))
        else:
            rows = registry.query("SELECT * FROM models ORDER BY name, version")
        want = _tag_filter(tags)
        out = []
        for r in rows:
            m = Model._from_row(registry, r)
            if all(k in m.tags and (v is None or m.tags[k] == v) for k, v in want):
                out.append(m)
        if latest:
            newest: Dict[str, Model] = {}
            for m in out:
                newest[m.name] = m
            out = list(newest.values())
        return out

    # ------------------------------------------------------------------ update
    def _update(self, tags: Dict[str, str], properties: Dict[str, str], description: Optional[str]) -> None:
        with self.registry.write() as c:
            n = c.execute("UPDATE models SET tags=?, properties=?, description=? WHERE name=? AND version=?",
                          (json.dumps(tags, sort_keys=True), json.dumps(properties, sort_keys=True), description,
                           self.name, self.version)).rowcount
        if n == 0:
            raise NotFoundError(f"model {self.id} was deleted")
        self.tags, self.properties, self.description = tags, properties, description

    def add_tags(self, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags (saved at once)."""
        self._update({**self.tags, **{str(k): str(v) for k, v in tags.items()}}, self.properties, self.description)

    def remove_tags(self, tags: Iterable[str]) -> None:
        """Remove tags by key (missing keys are ignored)."""
        drop = set(tags)
        self._update({k: v for k, v in self.tags.items() if k not in drop}, self.properties, self.description)

    def add_properties(self, properties: Mapping[str, Any]) -> None:
        """Add properties (saved at once)."""
        add = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in properties.items()}
        self._update(self.tags, {**self.properties, **add}, self.description)

    # ------------------------------------------------------------------ read / delete
    def verify(self) -> None:
        """Re-hash the stored files; raises :class:`CorruptedError` if any changed."""
        try:
            self.registry.verify_object(self.digest)
        except CorruptedError as e:
            raise CorruptedError(f"model {self.id}: {e}") from None

    def download(self, target_dir: Union[str, "os.PathLike[str]"] = ".", exist_ok: bool = False) -> str:
        """Copy the model's file or directory into ``target_dir``, checking every file's
        SHA-256 as it is read; returns the path of the copy.

        Raises:
            CorruptedError: a stored file does not match its hash (the partial copy is removed).
            FileExistsError: the target exists and ``exist_ok`` is False.
        """
        manifest = self.registry.read_manifest(self.digest)
        target_dir = os.fspath(target_dir)
        dst = os.path.join(target_dir, self.artifact)
        if os.path.exists(dst):
            if not exist_ok:
                raise FileExistsError(f"{dst} exists (pass exist_ok=True to overwrite)")
            shutil.rmtree(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.remove(dst)
        os.makedirs(target_dir, exist_ok=True)
        data = os.path.join(self.registry.object_dir(self.digest), "data")
        try:
            for d in manifest["dirs"]:
                os.makedirs(os.path.join(target_dir, d), exist_ok=True)
            if manifest["kind"] == "dir":
                os.makedirs(dst, exist_ok=True)
            for f in manifest["files"]:
                out = os.path.join(target_dir, f["path"])
                os.makedirs(os.path.dirname(out), exist_ok=True)
                try:
                    sha, size = _copy_hashing(os.path.join(data, f["path"]), out)
                except FileNotFoundError:
                    raise CorruptedError(f"model {self.id}: stored file {f['path']} is missing") from None
                if sha != f["sha256"] or size != f["size"]:
                    raise CorruptedError(f"model {self.id}: stored file {f['path']} is corrupted (sha256 "
                                         f"{sha[:12]}..., registered {f['sha256'][:12]}...); re-register it")
        except BaseException:
            if os.path.isdir(dst):
                shutil.rmtree(dst, ignore_errors=True)
            elif os.path.exists(dst):
                os.remove(dst)
            raise
        return dst

    def dependents(self) -> List[str]:
        """Ids of what keeps this model from being deleted: converted models
        (``parent_id``) and images built from it."""
        kids = self.registry.query("SELECT name, version FROM models WHERE parent_id=? ORDER BY name, version",
                                   (self.id,))
        imgs = self.registry.query("SELECT name, version FROM images WHERE model_id=? ORDER BY name, version",
                                   (self.id,))
        return [f"model {r[0]}:{r[1]}" for r in kids] + [f"image {r[0]}:{r[1]}" for r in imgs]

    def delete(self) -> None:
        """Unregister this version (its files go when no other version shares them).

        Refused with :class:`InUseError` while a converted model or an image depends on it:
        the seed's cleanup order is service, image, converted model, model.
        """
        with self.registry.write() as c:
            kids = c.execute("SELECT name || ':' || version FROM models WHERE parent_id=?", (self.id,)).fetchall()
            imgs = c.execute("SELECT name || ':' || version FROM images WHERE model_id=?", (self.id,)).fetchall()
            if kids or imgs:
                what = [f"converted model {r[0]}" for r in kids] + [f"image {r[0]}" for r in imgs]
                raise InUseError(f"model {self.id} is used by {', '.join(what)}: delete "
                                 f"{'them' if len(what) > 1 else 'it'} first")
            n = c.execute("DELETE FROM models WHERE name=? AND version=?", (self.name, self.version)).rowcount
            if n == 0:
                raise NotFoundError(f"model {self.id} not found (already deleted?)")
            still = c.execute("SELECT 1 FROM models WHERE digest=? LIMIT 1", (self.digest,)).fetchone()
            trash = None
            obj = self.registry.object_dir(self.digest)
            if still is None and os.path.isdir(obj):
                trash = os.path.join(self.registry.root, "tmp", f"trash-{os.getpid()}-{self.digest[:12]}-{time.time_ns()}")
                os.rename(obj, trash)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
