"""``AccelOnnxConverter``: the seed's model conversion (SEED_API §2.2) done locally.

The cloud service took a registered TF model, compiled it for the FPGA and registered the
result ``<name>.<ver>.accelonnx``; the user polled an operation. Here the operation is a
subprocess running tf2onnx (``bfpaccel.convert._worker``), one model per process (tf2onnx's
peak memory is a large multiple of the model size), with a log file, the same polling API
and states, and a seam for the model registry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, List, Optional, Protocol, Sequence, Union, runtime_checkable

from ._graph import read_graph_info, resolve_tensor, source_kind, split_outputs

__all__ = ["AccelOnnxConverter", "ConvertOperation", "ConversionRegistry"]

#: States of an operation; ``get_status()`` maps them to the seed's three words.
RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED = "Running", "Succeeded", "Failed", "TimedOut", "Cancelled"
_TERMINAL = (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)


@runtime_checkable
class ConversionRegistry(Protocol):
    """What the converter needs from a model registry (the local stand-in for the seed's
    workspace + ``Model``). ``registry`` arguments may be any object with these methods.

    Example:
        >>> class Dummy:
        ...     def model_path(self, model): return "/models/" + str(model)
        ...     def register_converted(self, model, onnx_path, metadata): return onnx_path
        >>> isinstance(Dummy(), ConversionRegistry)
        True
    """

    def model_path(self, model: Any) -> str:
        """Local path (SavedModel dir or frozen .pb) of a registered model or id ``"name:ver"``."""

    def register_converted(self, model: Any, onnx_path: str, metadata: dict) -> Any:
        """Register ``onnx_path`` as the converted child of ``model``; returns what ``.result`` gives."""


class ConvertOperation:
    """A running conversion, polled like the seed's ``ModelConvertOperation``.

    ``state``: Running, Succeeded, Failed, TimedOut or Cancelled. ``get_status()``: the
    seed's mapping, "InProgress" / "Succeeded" / "Failed". ``result``: the ONNX path (or the
    registry's model). ``error``: a message with the tail of the log. ``log_path``: the log.

    Example:
        >>> op = AccelOnnxConverter.convert_tf_model(None, "model_dir", "images", "output_alias")  # doctest: +SKIP
        >>> op.wait_for_completion(show_output=True)  # doctest: +SKIP
        >>> op.result  # doctest: +SKIP
        'model_dir.onnx'
    """

    def __init__(self, spec: dict, registry: Optional[Any], source_model: Any, timeout: Optional[float],
                 env: Optional[dict] = None) -> None:
        self.operation_id = spec["operation_id"]
        self.log_path: str = spec["log_path"]
        self.output_path: str = spec["output_path"]
        self.error: Optional[str] = None
        self.details: dict = {}
        self._spec = spec
        self._registry = registry
        self._source_model = source_model
        self._result: Any = None
        self._state = RUNNING
        self._lock = threading.Lock()
        self._deadline = None if timeout is None else time.monotonic() + float(timeout)
        self._timeout = timeout
        spec_path = spec["result_path"] + ".spec.json"
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        self._spec_path = spec_path
        child_env = dict(os.environ)
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        child_env.update(env or {})
        self._log_file = open(self.log_path, "ab")
        # start_new_session: a timeout kills the worker and anything it started, by group id.
        self._proc = subprocess.Popen([sys.executable, "-m", "bfpaccel.convert._worker", spec_path],
                                      stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=child_env, start_new_session=True)
        self._watchdog: Optional[threading.Thread] = None
        if self._deadline is not None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True)
            self._watchdog.start()

    def __repr__(self) -> str:
        return f"ConvertOperation(id={self.operation_id!r}, state={self.state!r}, output={self.output_path!r})"

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """Running, Succeeded, Failed, TimedOut or Cancelled (polls the subprocess)."""
        self._poll()
        return self._state

    def get_status(self) -> str:
        """The seed's status words: "InProgress", "Succeeded" or "Failed" (TimedOut and
        Cancelled are failures). The seed spelled the first one "InProgess"."""
        state = self.state
        return {RUNNING: "InProgress", SUCCEEDED: "Succeeded"}.get(state, "Failed")

    @property
    def result(self) -> Any:
        """Path of the written ``.onnx`` (or the registry's converted model when a registry was given)."""
        state = self.state
        if state == RUNNING:
            raise ValueError("Model conversion is not complete: call wait_for_completion() first")
        if state != SUCCEEDED:
            raise ValueError(f"Model conversion is not successful ({state}): {self.error}")
        return self._result

    def wait_for_completion(self, show_output: bool = False, timeout: Optional[float] = None) -> str:
        """Block until the conversion ends; with ``timeout`` (seconds) a conversion still
        running then is killed and ends TimedOut. ``show_output`` streams the log. Returns the state."""
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        pos = 0
        while True:
            done = self.state in _TERMINAL
            if show_output:
                pos = self._print_log_from(pos)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                self._kill(TIMED_OUT, f"conversion timed out after {timeout:g} s (wait_for_completion timeout); "
                                      "the worker was killed")
                if show_output:
                    self._print_log_from(pos)
                break
            time.sleep(0.1)
        if show_output and self._state != SUCCEEDED:
            print(f"Conversion {self._state}: {self.error}")
        return self._state

    def cancel(self) -> None:
        """Kill a running conversion (state Cancelled)."""
        self._kill(CANCELLED, "conversion cancelled")

    # -- internals -----------------------------------------------------------------------
    def _print_log_from(self, pos: int) -> int:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            return pos
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        return pos + len(chunk)

    def _log_tail(self, n_lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return "\n".join(lines[-n_lines:])

    def _watch(self) -> None:
        assert self._deadline is not None
        while self._proc.poll() is None:
            if time.monotonic() >= self._deadline:
                self._kill(TIMED_OUT, f"conversion timed out after {self._timeout:g} s; the worker was killed")
                return
            time.sleep(0.1)

    def _kill(self, state: str, message: str) -> None:
        with self._lock:
            if self._state in _TERMINAL:
                return
            if self._proc.poll() is None:
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._proc.wait()
                self._state = state
                self.error = f"{message}. Log {self.log_path}, last lines:\n{self._log_tail()}"
                self._log_file.close()
                return
        self._poll()

    def _poll(self) -> None:
        with self._lock:
            if self._state in _TERMINAL:
                return
            rc = self._proc.poll()
            if rc is None:
                return
            self._log_file.close()
            result_path = self._spec["result_path"]
            if rc == 0 and os.path.isfile(result_path):
                with open(result_path) as f:
                    self.details = json.load(f)
                try:
                    if self._registry is not None:
                        self._result = self._registry.register_converted(
                            self._source_model, self.output_path, self.details.get("metadata", {}))
                    else:
                        self._result = self.output_path
                    self._state = SUCCEEDED
                except Exception as exc:  # the registry's error becomes the operation's
                    self._state = FAILED
                    self.error = f"registering the converted model failed: {type(exc).__name__}: {exc}"
                return
            self._state = FAILED
            why = f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
            if rc == -signal.SIGKILL:
                why += " (out of memory? tf2onnx needs many times the model size; try optimize=False)"
            self.error = f"conversion failed ({why}). Log {self.log_path}, last lines:\n{self._log_tail()}"


class AccelOnnxConverter:
    """Convert a TF1 model (SavedModel or frozen GraphDef) to ONNX for ``bfpaccel.compile``,
    with the seed's API (``azureml.accel.AccelOnnxConverter``)."""

    @staticmethod
    def convert_tf_model(
        registry: Optional[Any],
        source_model: Any,
        input_tensors: str,
        output_tensors: Union[str, Sequence[str]],
        *,
        output_path: Optional[str] = None,
        opset: int = 15,
        optimize: bool = True,
        timeout: Optional[float] = None,
        tag: str = "serve",
        _test_env: Optional[dict] = None,
    ) -> ConvertOperation:
        """Start converting ``source_model`` in a subprocess; returns a ``ConvertOperation``.

        ``registry``: None (``source_model`` is a path and ``.result`` the ONNX path) or an
        object with the ``ConversionRegistry`` methods. ``source_model``: a SavedModel
        directory (``simple_save``) or a frozen GraphDef ``.pb``. ``input_tensors``: one
        name, a tensor name ("Placeholder:0") or a signature alias ("images"); a string input
        is cut at the ``preprocess_array`` float output, which becomes the ONNX input.
        ``output_tensors``: comma-joined string or list of tensor names or aliases.
        ``output_path``: default ``<source>.onnx`` beside the source. ``optimize``: run
        tf2onnx's graph optimizers (without its deep copy before each pass, which is what
        makes tf2onnx's memory 40-50x the model); False = none (onnxruntime and the compiler
        fold the leftover Transposes). ``timeout``: seconds, then the worker is killed.

        Names are checked against the graph before the subprocess starts: a bad one raises
        ValueError naming the close matches.

        Example:
            >>> op = AccelOnnxConverter.convert_tf_model(
            ...     None, "resnet50_saved", "Placeholder:0",
            ...     "classifier/resnet_v1_50/predictions/Softmax:0")  # doctest: +SKIP
            >>> op.wait_for_completion(); op.get_status()  # doctest: +SKIP
            'Succeeded'
        """
        if registry is not None and not isinstance(registry, ConversionRegistry):
            raise TypeError(f"registry must be None or provide model_path() and register_converted() "
                            f"(bfpaccel.convert.ConversionRegistry), got {type(registry).__name__}")
        if isinstance(source_model, (str, os.PathLike)) and os.path.exists(source_model):
            path = os.fspath(source_model)
        elif registry is not None:
            path = registry.model_path(source_model)
        else:
            raise FileNotFoundError(f"source model {source_model!r} is not a path that exists (a SavedModel "
                                    "directory or a frozen .pb), and no registry was given to resolve it")
        if not isinstance(input_tensors, str) or "," in input_tensors:
            raise ValueError(f"input_tensors must be one tensor name or alias, got {input_tensors!r}")
        kind = source_kind(path)
        info = read_graph_info(path, tag=tag)
        in_name, _ = resolve_tensor(info, input_tensors.strip(), "input")
        outs = split_outputs(output_tensors)
        for o in outs:
            resolve_tensor(info, o, "output")
        if in_name in [resolve_tensor(info, o, "output")[0] for o in outs]:
            raise ValueError(f"input {input_tensors!r} is also listed as an output")
        if not isinstance(opset, int) or not 7 <= opset <= 18:
            raise ValueError(f"opset must be an int in 7..18 (tf2onnx 1.17 supports up to 18), got {opset!r}")

        op_id = uuid.uuid4().hex[:12]
        if output_path is None:
            if registry is not None:
                output_path = os.path.join(tempfile.mkdtemp(prefix="bfpaccel-convert-"), "model.onnx")
            else:
                output_path = path.rstrip("/").rsplit(".pb", 1)[0] + ".onnx" if kind == "graph_def" \
                    else path.rstrip("/") + ".onnx"
        output_path = os.path.abspath(os.fspath(output_path))
        os.makedirs(os.path.dirname(output_path), exist_ok=True)
        spec = {
            "operation_id": op_id,
            "source": path,
            "kind": kind,
            "tag": tag,
            "input": input_tensors.strip(),
            "outputs": outs,
            "output_path": output_path,
            "opset": opset,
            "optimize": bool(optimize),
            "log_path": output_path + ".log",
            "result_path": output_path + ".result.json",
        }
        for stale in (str(spec["log_path"]), str(spec["result_path"])):
            if os.path.exists(stale):
                os.remove(stale)
        if _test_env:  # test seams: {"fail_for_test": msg} / {"sleep_for_test": s} go in the spec
            spec.update(_test_env)
        return ConvertOperation(spec, registry, source_model, timeout)
