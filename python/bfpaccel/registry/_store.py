"""The local workspace store: SQLite (stdlib) + a content-addressed object store.

Layout of a registry directory ``ROOT``::

    ROOT/registry.db                     SQLite (WAL): models, images, deployments, counters
    ROOT/objects/<d[:2]>/<d>/manifest.json   d = sha256 of the canonical manifest
    ROOT/objects/<d[:2]>/<d>/data/<name>     the registered file or directory tree
    ROOT/images/<name>/<version>/        deployable bundles written by ``Image.create``
    ROOT/deployments/<name>/             logs, generated certs of local services, and the
                                         service keys (``auth-keys``, 0600)
    ROOT/tmp/<pid>-<uuid>/               staging; a dead pid's staging dir is garbage

Privacy: the directory is created 0700 and the database files 0600 (an existing registry is
tightened when opened by its owner); service keys are never written to the database (only
their SHA-256 digests) nor put on a command line.

Atomicity of a registration: the artifact is copied into a staging dir (hashing while
copying, every file and dir fsynced), then, inside one ``BEGIN IMMEDIATE`` transaction, the
staging dir is renamed to its content address and the row is inserted. A crash before the
rename leaves staging garbage; a crash between rename and commit leaves an unreferenced
object. Neither is visible as a model; ``Registry.gc()`` (also run on open for staging)
removes both, and a later registration of the same content reuses or repairs the object.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

__all__ = [
    "KEYS_FILE",
    "Registry",
    "RegistryError",
    "NotFoundError",
    "InUseError",
    "CorruptedError",
    "SCHEMA_VERSION",
]

#: 2: deployment keys are no longer stored in the database (only their SHA-256); the keys
#: live in ``deployments/<name>/auth-keys`` (mode 0600). Version 1 databases are migrated on open.
SCHEMA_VERSION = 2
#: File of a deployment's keys (one per line: primary, secondary), under ``deployments/<name>/``.
KEYS_FILE = "auth-keys"
_CHUNK = 1 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_VERSION_RE = re.compile(r"[0-9]{1,19}")
#: Largest version number (SQLite stores signed 64-bit integers).
MAX_VERSION = (1 << 63) - 1
#: test seam: the name of a point in ``register`` where the process pauses (``copy``: half
#: the files staged; ``commit``: object renamed, row not committed, write lock held).
_PAUSE_ENV = "BFPACCEL_REGISTRY_TEST_PAUSE"
_PAUSE_FILE_ENV = "BFPACCEL_REGISTRY_TEST_PAUSE_FILE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    kind TEXT NOT NULL, name TEXT NOT NULL, last_version INTEGER NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL,
    digest TEXT NOT NULL, artifact TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL,
    description TEXT, tags TEXT NOT NULL, properties TEXT NOT NULL,
    parent_id TEXT, created_time REAL NOT NULL,
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS models_parent ON models (parent_id);
CREATE INDEX IF NOT EXISTS models_digest ON models (digest);
CREATE TABLE IF NOT EXISTS images (
    name TEXT NOT NULL, version INTEGER NOT NULL, model_id TEXT NOT NULL,
    path TEXT NOT NULL, description TEXT, tags TEXT NOT NULL, properties TEXT NOT NULL,
    payload TEXT NOT NULL, state TEXT NOT NULL, created_time REAL NOT NULL,
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS images_model ON images (model_id);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY, image_id TEXT NOT NULL, target TEXT NOT NULL,
    config TEXT NOT NULL, pid INTEGER, pid_start TEXT, port INTEGER, scoring_uri TEXT,
    keys TEXT NOT NULL, state TEXT NOT NULL, workdir TEXT NOT NULL, created_time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS deployments_image ON deployments (image_id);
"""


class RegistryError(Exception):
    """Base class of the registry's errors."""


class NotFoundError(RegistryError, LookupError):
    """No model / image / deployment with that name (and version): the seed's NOT_FOUND."""


class InUseError(RegistryError):
    """A delete refused because something still depends on the entry (converted model,
    image or deployment): delete those first, in the seed's cleanup order."""


class CorruptedError(RegistryError):
    """A stored file no longer matches the SHA-256 recorded when it was registered."""


def check_name(name: str, what: str = "name") -> str:
    """Validate a model/image/deployment name (letters, digits, ``.``, ``_``, ``-``)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-255 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def parse_id(model_id: str) -> Tuple[str, Optional[int]]:
    """``"name:3"`` -> ``("name", 3)``; ``"name"`` -> ``("name", None)`` (latest).

    Raises ValueError for a version that is not a plain decimal number in 1..2**63-1.
    """
    name, sep, ver = str(model_id).rpartition(":")
    if not sep:
        return str(model_id), None
    return name, check_version(ver, model_id)


def check_version(ver: Any, model_id: Any = None) -> int:
    """A version number as given by a user (int or decimal string): 1..2**63-1, else ValueError."""
    what = f"bad id {model_id!r}" if model_id is not None else f"bad version {ver!r}"
    if isinstance(ver, bool):
        raise ValueError(f"{what}: the version must be an integer")
    if isinstance(ver, int):
        v = ver
    elif isinstance(ver, str) and _VERSION_RE.fullmatch(ver):
        v = int(ver)
    else:
        raise ValueError(f"{what}: expected 'name:version' with a decimal version number")
    if not 1 <= v <= MAX_VERSION:
        raise ValueError(f"{what}: versions run from 1 to {MAX_VERSION}")
    return v


def key_digest(key: str) -> str:
    """SHA-256 hex digest of a service key (what the database stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_record(keys: List[str]) -> str:
    """The database's ``keys`` column: the keys' digests, never the keys."""
    return json.dumps({"sha256": [key_digest(k) for k in keys]})


def _tighten(path: str, mode: int) -> None:
    """Drop permission bits beyond ``mode`` from a file or folder this user owns."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return
    cur = stat.S_IMODE(st.st_mode)
    if cur & ~mode:
        os.chmod(path, cur & mode)


def private_dir(path: str) -> str:
    """Create ``path`` (and parents) with mode 0700, or tighten it to 0700 when it exists."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    _tighten(path, 0o700)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _test_pause(point: str) -> None:
    if os.environ.get(_PAUSE_ENV) == point:
        marker = os.environ.get(_PAUSE_FILE_ENV)
        if marker:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(120)


def _open_regular(src: str, follow: bool = True) -> int:
    """An fd of the regular file ``src``; ValueError for a symbolic link (when not ``follow``),
    a FIFO, a device or a socket (opened non-blocking, so a FIFO cannot hang the copy)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(src, flags)
    except OSError as e:
        if not follow and e.errno == errno.ELOOP:
            raise ValueError(f"{src} is a symbolic link: the registry does not follow links out of a "
                             "registered folder (copy the file in instead)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{src} is not a regular file (a FIFO, device or socket cannot be registered)")
    return fd


def _copy_hashing(src: str, dst: str, follow: bool = True) -> Tuple[str, int]:
    """Copy one regular file, fsync it, return (sha256 hex, size). ``follow=False``: refuse a
    symbolic link (checked when the file is opened, so it cannot be swapped in after a check)."""
    h = hashlib.sha256()
    n = 0
    fd = _open_regular(src, follow)
    with os.fdopen(fd, "rb") as fi, open(dst, "wb") as fo:
        mode = stat.S_IMODE(os.fstat(fi.fileno()).st_mode)
        while True:
            b = fi.read(_CHUNK)
            if not b:
                break
            h.update(b)
            fo.write(b)
            n += len(b)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(dst, mode & 0o7777)
    return h.hexdigest(), n


def hash_file(path: str) -> Tuple[str, int]:
    """SHA-256 hex digest and size of a file."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


def manifest_digest(manifest: Dict[str, Any]) -> str:
    """Content address of an artifact: sha256 of its canonical manifest (kind, name, files)."""
    canon = {k: manifest[k] for k in ("kind", "name", "files", "dirs")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Registry:
    """A local workspace: models, images and deployments in ``path`` (created if missing).

    It is the local stand-in for the seed's ``Workspace`` + model registry, and it satisfies
    the converter's ``ConversionRegistry`` seam (``model_path``, ``register_converted``), so
    ``AccelOnnxConverter.convert_tf_model(registry, "name:1", ...)`` registers
    ``<name>.1.accelonnx`` with ``parent_id="name:1"``.

    Safe for several processes at once: SQLite in WAL mode, ``BEGIN IMMEDIATE`` writes, a
    30 s busy timeout.

    Example:
        >>> import tempfile, os
        >>> from bfpaccel.registry import Registry, Model
        >>> reg = Registry(tempfile.mkdtemp())
        >>> p = os.path.join(reg.root, "w.bin"); open(p, "wb").write(b"abc")
        3
        >>> Model.register(reg, p, "toy").id
        'toy:1'
    """

    DB_NAME = "registry.db"

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, busy_timeout: float = 30.0) -> None:
        self.root = os.path.abspath(os.fspath(path))
        private_dir(self.root)
        for sub in ("objects", "images", "deployments", "tmp"):
            private_dir(os.path.join(self.root, sub))
        self.db_path = os.path.join(self.root, self.DB_NAME)
        # SQLite gives the -wal and -shm files the database file's mode: create it 0600 first
        os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            _tighten(self.db_path + suffix, 0o600)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db_path, timeout=busy_timeout, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # journal_mode=WAL needs a moment of exclusive access; retry while another opener holds it
        for attempt in range(100):
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                time.sleep(0.05 * (attempt + 1))
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA secure_delete = ON")  # overwritten rows leave no old bytes behind
        migrated = 0
        with self.write() as c:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RegistryError(f"{self.db_path} has schema version {row[0]}; this bfpaccel reads "
                                    f"{SCHEMA_VERSION} and older: upgrade bfpaccel")
            elif int(row[0]) < SCHEMA_VERSION:
                migrated = self._migrate_keys(c)
                c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        if migrated:
            # the plaintext keys' old pages leave the WAL now, not at some later checkpoint
            with self._lock:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._clean_staging()

    def _migrate_keys(self, c: sqlite3.Connection) -> int:
        """Schema 1 -> 2: keys stored in the database move to their 0600 key files; the
        database keeps their SHA-256 digests. Returns how many deployments had keys."""
        n = 0
        for r in c.execute("SELECT name, keys FROM deployments").fetchall():
            try:
                keys = json.loads(r["keys"])
            except ValueError:
                continue
            if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
                if keys:
                    self.write_keys(r["name"], keys)
                    n += 1
                c.execute("UPDATE deployments SET keys=? WHERE name=?", (key_record(keys), r["name"]))
        return n

    # ------------------------------------------------------------------ service keys
    def keys_path(self, name: str) -> str:
        """The key file of deployment ``name`` (one key per line)."""
        return os.path.join(self.root, "deployments", check_name(name, "service name"), KEYS_FILE)

    def write_keys(self, name: str, keys: List[str]) -> str:
        """Write a deployment's keys to its key file (0600 in a 0700 folder; atomically)."""
        path = self.keys_path(name)
        private_dir(os.path.dirname(path))
        for k in keys:
            if not k or any(ch in k for ch in "\r\n"):
                raise ValueError("a key must be one non-empty line")
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(k + "\n" for k in keys))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def read_keys(self, name: str) -> List[str]:
        """A deployment's keys from its key file ([] when it has none)."""
        try:
            with open(self.keys_path(name)) as f:
                return [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ plumbing
    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: takes the write lock up front, so
        read-then-write sequences such as version allocation cannot interleave)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def query(self, sql: str, args: Tuple[Any, ...] = ()) -> List[sqlite3.Row]:
        """Run a read-only query (a consistent snapshot)."""
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    @staticmethod
    def next_version(c: sqlite3.Connection, kind: str, name: str) -> int:
        """Allocate the next version of ``name`` (never reused, even after deletes); call
        inside :meth:`write`."""
        row = c.execute("SELECT last_version FROM counters WHERE kind=? AND name=?", (kind, name)).fetchone()
        v = (row[0] if row else 0) + 1
        c.execute("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", (kind, name, v))
        return v

    def staging_dir(self) -> str:
        """A fresh staging directory under ``tmp/`` (named after this pid, so a crashed
        process's leftovers are recognised and removed)."""
        d = os.path.join(self.root, "tmp", f"{os.getpid()}-{uuid.uuid4().hex}")
        os.makedirs(d)
        return d

    def _clean_staging(self) -> int:
        n = 0
        tmp = os.path.join(self.root, "tmp")
        for entry in os.listdir(tmp):
            pid_s = entry.split("-", 1)[0]
            dead = not pid_s.isdigit() or not _pid_alive(int(pid_s))
            if entry.startswith("trash-") or dead:
                shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
                n += 1
        return n

    # ------------------------------------------------------------------ objects
    def object_dir(self, digest: str) -> str:
        """Directory of the object with this content address."""
        return os.path.join(self.root, "objects", digest[:2], digest)

    def stage_artifact(self, src: str) -> Tuple[str, Dict[str, Any]]:
        """Copy a file or directory into a staging dir (hashing and fsyncing); returns the
        staging dir and the manifest (with its ``digest``)."""
        src = os.path.abspath(os.fspath(src))
        if not os.path.exists(src):
            raise FileNotFoundError(f"model path does not exist: {src}")
        name = os.path.basename(src.rstrip("/")) or "model"
        stage = self.staging_dir()
        try:
            data = os.path.join(stage, "data")
            os.makedirs(data)
            files: List[Dict[str, Any]] = []
            dirs: List[str] = []
            if os.path.isfile(src):
                kind = "file"
                sha, size = _copy_hashing(src, os.path.join(data, name))
                files.append({"path": name, "sha256": sha, "size": size})
                _test_pause("copy")
            elif os.path.isdir(src):
                kind = "dir"
                top = os.path.join(data, name)
                os.makedirs(top)
                # symbolic links are refused, never followed: a link could pull any file the
                # registering user can read (a system file, another user's key) into the store
                walked = sorted(os.walk(src, followlinks=False), key=lambda t: t[0])
                for count, (d, subdirs, fnames) in enumerate(walked):
                    rel_d = os.path.relpath(d, src)
                    out_d = top if rel_d == "." else os.path.join(top, rel_d)
                    if rel_d != ".":
                        os.makedirs(out_d, exist_ok=True)
                        dirs.append(os.path.join(name, rel_d))
                    for sd in subdirs:
                        if os.path.islink(os.path.join(d, sd)):
                            raise ValueError(f"{os.path.join(d, sd)} is a symbolic link: the registry does not "
                                             "follow links out of a registered folder (copy the folder in instead)")
                    for fn in sorted(fnames):
                        sha, size = _copy_hashing(os.path.join(d, fn), os.path.join(out_d, fn), follow=False)
                        rel = os.path.join(name, fn) if rel_d == "." else os.path.join(name, rel_d, fn)
                        files.append({"path": rel, "sha256": sha, "size": size})
                        if len(files) == 1:
                            _test_pause("copy")
                    _fsync_dir(out_d)
            else:
                raise ValueError(f"model path is neither a file nor a directory: {src}")
            files.sort(key=lambda f: f["path"])
            manifest: Dict[str, Any] = {"format": 1, "kind": kind, "name": name, "files": files,
                                        "dirs": sorted(dirs)}
            manifest["digest"] = manifest_digest(manifest)
            manifest["size"] = sum(f["size"] for f in files)
            mpath = os.path.join(stage, "manifest.json")
            with open(mpath, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(data)
            _fsync_dir(stage)
            return stage, manifest
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def commit_object(self, stage: str, digest: str) -> str:
        """Move a staged artifact to its content address (call inside :meth:`write`). An
        object already there is reused when intact and replaced when corrupted."""
        final = self.object_dir(digest)
        if os.path.isdir(final):
            try:
                self.verify_object(digest)
                shutil.rmtree(stage, ignore_errors=True)
                return final
            except (CorruptedError, FileNotFoundError, ValueError):
                trash = os.path.join(self.root, "tmp", f"trash-{uuid.uuid4().hex}")
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(stage, final)
        _fsync_dir(os.path.dirname(final))
        return final

    def read_manifest(self, digest: str) -> Dict[str, Any]:
        """The manifest of an object (checked against its content address)."""
        mpath = os.path.join(self.object_dir(digest), "manifest.json")
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise CorruptedError(f"object {digest[:12]} is missing from the store ({mpath})") from None
        except (OSError, ValueError) as e:
            raise CorruptedError(f"object {digest[:12]}: unreadable manifest {mpath}: {e}") from None
        if manifest_digest(manifest) != digest:
            raise CorruptedError(f"object {digest[:12]}: manifest {mpath} does not match its content address")
        return manifest

    def verify_object(self, digest: str) -> Dict[str, Any]:
        """Re-hash every file of an object; raises :class:`CorruptedError` naming the files
        whose SHA-256 or size changed (or that are missing)."""
        manifest = self.read_manifest(digest)
        data = os.path.join(self.object_dir(digest), "data")
        bad: List[str] = []
        for f in manifest["files"]:
            p = os.path.join(data, f["path"])
            try:
                sha, size = hash_file(p)
            except FileNotFoundError:
                bad.append(f"{p} (missing)")
                continue
            if sha != f["sha256"] or size != f["size"]:
                bad.append(f"{p} (sha256 {sha[:12]}..., {size} bytes; registered {f['sha256'][:12]}..., "
                           f"{f['size']} bytes)")
        if bad:
            raise CorruptedError(f"object {digest[:12]} is corrupted: " + "; ".join(bad)
                                 + ". Re-register the model from its source, or delete it")
        return manifest

    def gc(self) -> Dict[str, int]:
        """Remove staging dirs of dead processes and objects no model references (left by a
        crash between rename and commit, or by deletes). Returns counts.

        Example:
            >>> import tempfile
            >>> Registry(tempfile.mkdtemp()).gc()
            {'staging': 0, 'objects': 0}
        """
        staging = self._clean_staging()
        removed = 0
        with self.write() as c:
            used = {r[0] for r in c.execute("SELECT DISTINCT digest FROM models")}
            objroot = os.path.join(self.root, "objects")
            for pre in os.listdir(objroot):
                for d in os.listdir(os.path.join(objroot, pre)):
                    if d not in used:
                        trash = os.path.join(self.root, "tmp", f"trash-{uuid.uuid4().hex}")
                        os.rename(os.path.join(objroot, pre, d), trash)
                        shutil.rmtree(trash, ignore_errors=True)
                        removed += 1
        return {"staging": staging, "objects": removed}

    def verify(self) -> List[str]:
        """Check every model's files against their hashes; returns the problems found
        (empty when the store is intact)."""
        problems = []
        for r in self.query("SELECT name, version, digest FROM models ORDER BY name, version"):
            try:
                self.verify_object(r["digest"])
            except CorruptedError as e:
                problems.append(f"{r['name']}:{r['version']}: {e}")
        return problems

    # ------------------------------------------------------------------ converter seam
    def model_path(self, model: Any) -> str:
        """Local path of a registered model (a ``Model`` or an id ``"name:version"``), after
        checking its hashes. Part of the converter's ``ConversionRegistry`` seam."""
        from ._model import Model

        m = model if isinstance(model, Model) else Model(self, *parse_id(str(model)))
        m.verify()
        return m.path

    def register_converted(self, model: Any, onnx_path: str, metadata: dict) -> Any:
        """Register ``onnx_path`` as ``<name truncated>.<ver>.accelonnx`` with
        ``parent_id=<name>:<ver>`` (the seed's naming, SEED_API §2.2); returns the new
        ``Model``. Part of the converter's ``ConversionRegistry`` seam."""
        from ._model import Model

        parent = model if isinstance(model, Model) else Model(self, *parse_id(str(model)))
        props = {"converted_from": parent.id, "flavor": "AccelOnnx"}
        for k, v in (metadata or {}).items():
            props[str(k)] = v if isinstance(v, str) else json.dumps(v)
        return Model.register(self, onnx_path, converted_name(parent.name, parent.version),
                              tags=dict(parent.tags), description=f"{parent.id} converted to ONNX",
                              properties=props, parent_id=parent.id)


def converted_name(name: str, version: int) -> str:
    """The seed's name of a converted model: ``<name truncated to 32-(11+len(ver))>.<ver>.accelonnx``.

    Example:
        >>> converted_name("resnet50-cd-tl", 1)
        'resnet50-cd-tl.1.accelonnx'
    """
    ver = str(version)
    return f"{name[: 32 - (11 + len(ver))]}.{ver}.accelonnx"
