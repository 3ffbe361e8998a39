"""The local model registry: versions, tags, delete order, atomicity under concurrency and
crashes, corruption detection, and the converter seam."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bfpaccel.convert import ConversionRegistry
from bfpaccel.registry import (
    CorruptedError,
    InUseError,
    Model,
    NotFoundError,
    Registry,
    RegistryError,
    converted_name,
)


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture()
def reg(tmp_path):
    r = Registry(tmp_path / "ws")
    yield r
    r.close()


@pytest.fixture()
def saved_model_dir(tmp_path):
    d = tmp_path / "saved"
    _write(str(d / "saved_model.pb"), b"graph" * 100)
    _write(str(d / "variables" / "variables.index"), b"index")
    _write(str(d / "variables" / "variables.data-00000-of-00001"), os.urandom(4096))
    os.makedirs(d / "assets")  # an empty dir survives the round trip
    return str(d)


def test_register_versions_and_ids(reg, tmp_path):
    p = _write(str(tmp_path / "a.onnx"), b"one")
    m1 = Model.register(reg, p, "resnet50", tags={"area": "vision"}, description="first")
    _write(p, b"two")
    m2 = Model.register(reg, p, "resnet50")
    assert (m1.id, m2.id) == ("resnet50:1", "resnet50:2")
    assert Model(reg, "resnet50").version == 2  # latest
    assert Model(reg, "resnet50", 1).description == "first"
    assert Model(reg, "resnet50:1").tags == {"area": "vision"}
    with open(Model(reg, "resnet50", 1).path, "rb") as f:
        assert f.read() == b"one"
    assert os.path.basename(m2.path) == "a.onnx"


def test_versions_never_reused_after_delete(reg, tmp_path):
    p = _write(str(tmp_path / "w.bin"), b"x")
    Model.register(reg, p, "m")
    Model.register(reg, p, "m").delete()
    assert Model.register(reg, p, "m").version == 3


def test_not_found_errors(reg, tmp_path):
    with pytest.raises(NotFoundError, match="not found"):
        Model(reg, "nope")
    Model.register(reg, _write(str(tmp_path / "w"), b"x"), "m")
    with pytest.raises(NotFoundError, match="versions of 'm': 1"):
        Model(reg, "m", 7)
    assert issubclass(NotFoundError, LookupError) and issubclass(NotFoundError, RegistryError)


def test_bad_name_and_missing_path(reg, tmp_path):
    with pytest.raises(ValueError, match="invalid model name"):
        Model.register(reg, _write(str(tmp_path / "w"), b"x"), "bad name/")
    with pytest.raises(FileNotFoundError):
        Model.register(reg, str(tmp_path / "missing"), "m")
    assert os.listdir(os.path.join(reg.root, "tmp")) == []


def test_directory_round_trip(reg, saved_model_dir, tmp_path):
    m = Model.register(reg, saved_model_dir, "sm")
    assert m.kind == "dir" and os.path.isdir(m.path)
    out = m.download(tmp_path / "dl")
    for rel in ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"):
        with open(os.path.join(saved_model_dir, rel), "rb") as a, open(os.path.join(out, rel), "rb") as b:
            assert a.read() == b.read()
    assert os.path.isdir(os.path.join(out, "assets"))
    with pytest.raises(FileExistsError):
        m.download(tmp_path / "dl")
    m.download(tmp_path / "dl", exist_ok=True)


def test_content_addressing_dedups(reg, tmp_path):
    p = _write(str(tmp_path / "w.bin"), b"same bytes")
    a, b = Model.register(reg, p, "a"), Model.register(reg, p, "b")
    assert a.digest == b.digest and a.path == b.path
    a.delete()
    b.verify()  # the shared object stays while b uses it
    b.delete()
    assert not os.path.exists(reg.object_dir(b.digest))


def test_list_and_tags(reg, tmp_path):
    p = _write(str(tmp_path / "w"), b"x")
    Model.register(reg, p, "a", tags={"team": "cv", "stage": "dev"})
    Model.register(reg, p, "a", tags={"team": "cv", "stage": "prod"})
    Model.register(reg, p, "b", tags={"team": "nlp"})
    assert [m.id for m in Model.list(reg)] == ["a:1", "a:2", "b:1"]
    assert [m.id for m in Model.list(reg, name="a")] == ["a:1", "a:2"]
    assert [m.id for m in Model.list(reg, tags=["team"])] == ["a:1", "a:2", "b:1"]
    assert [m.id for m in Model.list(reg, tags=[["stage", "prod"]])] == ["a:2"]
    assert [m.id for m in Model.list(reg, tags={"team": "cv", "stage": None})] == ["a:1", "a:2"]
    assert [m.id for m in Model.list(reg, latest=True)] == ["a:2", "b:1"]
    m = Model(reg, "b")
    m.add_tags({"stage": "dev"})
    m.remove_tags(["team"])
    m.add_properties({"acc": 0.75})
    again = Model(reg, "b")
    assert again.tags == {"stage": "dev"} and again.properties == {"acc": "0.75"}


def test_delete_order_converted_model(reg, tmp_path):
    src = Model.register(reg, _write(str(tmp_path / "sm" / "saved_model.pb"), b"tf"), "resnet50-cd-tl")
    onnx = _write(str(tmp_path / "conv" / "model.onnx"), b"onnx")
    conv = reg.register_converted(src.id, onnx, {"bfpaccel.preprocess": "{}"})
    assert conv.id == "resnet50-cd-tl.1.accelonnx:1" and conv.parent_id == "resnet50-cd-tl:1"
    assert conv.properties["converted_from"] == "resnet50-cd-tl:1"
    with pytest.raises(InUseError, match="converted model resnet50-cd-tl.1.accelonnx:1"):
        src.delete()
    assert src.dependents() == ["model resnet50-cd-tl.1.accelonnx:1"]
    conv.delete()
    src.delete()
    with pytest.raises(NotFoundError):
        src.delete()
    assert Model.list(reg) == []


def test_converted_name_truncation():
    assert converted_name("resnet50-cd-tl", 1) == "resnet50-cd-tl.1.accelonnx"
    long = converted_name("a" * 40, 12)
    assert long == "a" * 19 + ".12.accelonnx" and len(long) == 32


def test_registry_is_the_converter_seam(reg, tmp_path):
    assert isinstance(reg, ConversionRegistry)
    m = Model.register(reg, _write(str(tmp_path / "f.pb"), b"frozen"), "frozen")
    assert reg.model_path("frozen:1") == m.path
    with pytest.raises(NotFoundError):
        reg.model_path("frozen:2")
    with pytest.raises(NotFoundError):
        reg.register_converted("ghost:1", str(tmp_path / "f.pb"), {})


def test_corrupted_store_file_is_detected(reg, saved_model_dir, tmp_path):
    m = Model.register(reg, saved_model_dir, "sm")
    assert reg.verify() == []
    victim = os.path.join(m.path, "variables", "variables.index")
    with open(victim, "r+b") as f:
        f.write(b"X")
    with pytest.raises(CorruptedError, match="variables.index"):
        m.verify()
    with pytest.raises(CorruptedError, match="corrupted"):
        m.download(tmp_path / "dl")
    assert not os.path.exists(tmp_path / "dl" / "saved")  # no partial copy left
    with pytest.raises(CorruptedError):
        reg.model_path(m.id)
    problems = reg.verify()
    assert len(problems) == 1 and problems[0].startswith("sm:1")
    os.remove(victim)
    with pytest.raises(CorruptedError, match="missing"):
        m.verify()
    # registering the same content again repairs the shared object
    Model.register(reg, saved_model_dir, "sm")
    m.verify()
    assert reg.verify() == []


# ---------------------------------------------------------------------- concurrency
def _register_many(root: str, src_dir: str, worker: int, n: int) -> list:
    reg = Registry(root)
    out = []
    for i in range(n):
        p = _write(os.path.join(src_dir, f"w{worker}-{i}.bin"), f"worker {worker} item {i}".encode() * 1000)
        out.append((Model.register(reg, p, "shared").version, p))
    reg.close()
    return out


def test_concurrent_registration_from_four_processes(tmp_path):
    root = str(tmp_path / "ws")
    Registry(root).close()
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_register_many, [(root, str(tmp_path / "src"), w, 6) for w in range(4)])
    versions = [v for r in results for v, _ in r]
    assert sorted(versions) == list(range(1, 25))
    reg = Registry(root)
    for r in results:
        for v, p in r:
            m = Model(reg, "shared", v)
            m.verify()
            with open(p, "rb") as a, open(m.path, "rb") as b:
                assert a.read() == b.read()
    assert reg.verify() == [] and reg.gc() == {"staging": 0, "objects": 0}


# ---------------------------------------------------------------------- crashes
_CRASHER = textwrap.dedent("""
    import sys
    from bfpaccel.registry import Registry, Model
    Model.register(Registry(sys.argv[1]), sys.argv[2], "victim")
""")


@pytest.mark.parametrize("point", ["copy", "commit"])
def test_crash_mid_register_leaves_no_half_entry(tmp_path, saved_model_dir, point):
    root = str(tmp_path / "ws")
    reg = Registry(root)
    Model.register(reg, saved_model_dir, "victim")
    _write(os.path.join(saved_model_dir, "extra.txt"), b"new content")  # a new object, not a reuse
    marker = str(tmp_path / "paused")
    env = dict(os.environ, BFPACCEL_REGISTRY_TEST_PAUSE=point, BFPACCEL_REGISTRY_TEST_PAUSE_FILE=marker)
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, root, saved_model_dir], env=env)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker):
            assert proc.poll() is None, "the crasher exited before reaching the pause point"
            assert time.monotonic() < deadline, "the crasher never reached the pause point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # what the dead process left: no row; staging (copy) or an unreferenced object (commit)
    assert [m.id for m in Model.list(reg)] == ["victim:1"]
    reg2 = Registry(root)  # opening removes a dead pid's staging dir
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert reg2.gc() == {"staging": 0, "objects": 1 if point == "commit" else 0}
    assert reg2.verify() == []
    m = Model.register(reg2, saved_model_dir, "victim")
    assert m.id == "victim:2"  # the crashed transaction's version allocation rolled back
    m.verify()
    reg.close()
    reg2.close()


# ---------------------------------------------------------------------- issue 9: names, links, privacy
@pytest.mark.parametrize("name", ["ok\n", "ok\r", "a b", "", ".hidden", "-x", "a/b", "x" * 256, "ok\nrm -rf /"])
def test_names_are_checked_whole(reg, tmp_path, name):
    p = _write(str(tmp_path / "a.onnx"), b"one")
    with pytest.raises(ValueError, match="invalid model name"):
        Model.register(reg, p, name)


@pytest.mark.parametrize("model_id", ["x:99999999999999999999999", "x:9223372036854775808", "x:0", "x:-1",
                                      "x:+3", "x:3_0", "x:\u0663", "x: 3", "x:"])
def test_out_of_range_or_odd_versions_are_value_errors(reg, model_id):
    with pytest.raises(ValueError, match="bad id"):
        Model(reg, model_id)


def test_huge_version_int_is_a_value_error(reg):
    with pytest.raises(ValueError):
        Model(reg, "x", 10 ** 30)
    with pytest.raises(NotFoundError):
        Model(reg, "x:9223372036854775807")


def test_symlinks_in_a_registered_folder_are_refused(reg, tmp_path, saved_model_dir):
    secret = _write(str(tmp_path / "outside" / "secret.txt"), b"not yours")
    d = tmp_path / "linked"
    _write(str(d / "saved_model.pb"), b"graph")
    os.symlink(secret, d / "innocent.txt")
    with pytest.raises(ValueError, match="symbolic link"):
        Model.register(reg, str(d), "linked")
    os.remove(d / "innocent.txt")
    os.symlink(os.path.dirname(secret), d / "variables")  # a linked folder
    with pytest.raises(ValueError, match="symbolic link"):
        Model.register(reg, str(d), "linked")
    os.remove(d / "variables")
    os.mkfifo(d / "pipe")  # a FIFO would hang a reader: refused, not opened for reading
    with pytest.raises(ValueError, match="regular file"):
        Model.register(reg, str(d), "linked")
    os.remove(d / "pipe")
    assert Model.register(reg, str(d), "linked").id == "linked:1"
    # nothing of the refused attempts reached the store
    for root, _, files in os.walk(reg.root):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                assert b"not yours" not in f.read()
    assert os.listdir(os.path.join(reg.root, "tmp")) == []


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_registry_files_are_private(tmp_path):
    root = tmp_path / "ws"
    r = Registry(root)
    p = _write(str(tmp_path / "a.onnx"), b"one")
    Model.register(r, p, "m")
    assert _mode(root) == 0o700
    for sub in ("objects", "images", "deployments", "tmp"):
        assert _mode(root / sub) == 0o700
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(r.db_path + suffix):
            assert _mode(r.db_path + suffix) == 0o600, suffix
    r.close()
    # an existing, loose registry is tightened when opened
    os.chmod(root, 0o755)
    os.chmod(r.db_path, 0o644)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(r.db_path + suffix):
            os.chmod(r.db_path + suffix, 0o644)
    Registry(root).close()
    assert _mode(root) == 0o700 and _mode(r.db_path) == 0o600


def test_schema_1_keys_move_out_of_the_database(tmp_path):
    """A registry written before keys left the database: on open, the keys move to 0600 key
    files, the database keeps only digests, and its WAL holds no plaintext afterwards."""
    import json
    import sqlite3

    root = tmp_path / "ws"
    Registry(root).close()
    key1, key2 = "PRIMARYkeyPRIMARYkeyPRIMARYkey01", "SECONDARYkeySECONDARYkeySECOND02"
    con = sqlite3.connect(str(root / "registry.db"), isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    con.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                ("old-svc", "img:1", "local", json.dumps({"auth_enabled": True}), None, None, None, None,
                 json.dumps([key1, key2]), "Failed", str(root / "deployments" / "old-svc"), time.time()))
    con.close()
    os.chmod(root / "registry.db", 0o644)
    r = Registry(root)
    assert r.query("SELECT value FROM meta WHERE key='schema_version'")[0][0] == "2"
    rec = json.loads(r.query("SELECT keys FROM deployments WHERE name='old-svc'")[0][0])
    assert set(rec) == {"sha256"} and len(rec["sha256"]) == 2
    assert r.read_keys("old-svc") == [key1, key2]
    assert _mode(r.keys_path("old-svc")) == 0o600
    for suffix in ("", "-wal"):
        if os.path.exists(r.db_path + suffix):
            with open(r.db_path + suffix, "rb") as f:
                data = f.read()
            assert key1.encode() not in data and key2.encode() not in data, suffix
    from bfpaccel.deploy import Webservice

    svc = Webservice(r, "old-svc")
    assert svc.get_keys() == (key1, key2)
    assert key1 not in json.dumps(svc.serialize())
    r.close()
