"""Run a Python command (``python -m MODULE ARGS`` or ``python -c CODE ARGS``) in a process forked from a server that
has already imported torch, transformers, spaCy and OpenCV, so a test pays those imports (about 10 CPU-seconds per
process on this project's 2-core CI machines) once per session instead of once per command.

The forked child is the command: its own session, the requested environment, working directory, argv and files for
stdout/stderr; its exit code or signal is the command's. What a fork cannot reproduce is refused, and the caller runs
a real subprocess instead (``can_run``): an environment that differs from the server's in a variable a preloaded
library reads when imported (Hugging Face, torch, thread counts...). Prefect is not preloaded: its settings are read
from the environment when it is imported, and commands differ in ``PREFECT_*``.

Commands that are themselves the subject (signals, process trees, start-up) are run as real subprocesses by their
tests; this runs the commands a test only needs the results of.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ("numpy", "cv2", "PIL.Image", "pyarrow.parquet", "pydantic", "yaml", "torch", "safetensors.torch",
           "transformers", "transformers.models.clip.modeling_clip", "spacy", "scipy.ndimage", "skimage")
# Environment variables that the preloaded libraries (or Python itself) read at import time: a child whose value of
# any of them differs from the server's would not behave like a fresh process.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "OPENBLAS", "KMP_",
                        "CUDA", "TOKENIZERS", "SPACY", "PYTHON", "LD_", "NUMEXPR", "OPENCV", "XDG_CACHE_HOME")
_HEADER = struct.Struct("!I")


def _send(conn: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    conn.sendall(_HEADER.pack(len(data)) + data)


def _receive(conn: socket.socket) -> dict | None:
    header = b""
    while len(header) < _HEADER.size:
        chunk = conn.recv(_HEADER.size - len(header))
        if not chunk:
            return None
        header += chunk
    (size,) = _HEADER.unpack(header)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def _child(request: dict) -> None:
    """Become the requested command (never returns)."""
    code = 1
    try:
        os.setsid()
        for name, fd, mode in (("stdin", 0, os.O_RDONLY), ("stdout", 1, os.O_WRONLY), ("stderr", 2, os.O_WRONLY)):
            target = os.open(request.get(name, os.devnull), mode)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        random.seed()
        sys.path[0] = request["cwd"]
        argv = request["argv"]
        try:
            if argv[0] == "-m":
                import runpy

                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:  # -c CODE ARGS
                sys.argv = ["-c", *argv[2:]]
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if exit_.code is not None and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        # What interpreter shutdown does: join non-daemon threads (a process pool's manager), run atexit handlers.
        import atexit
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(address: str) -> None:
    """Import ``PRELOAD``, then fork one child per request on the Unix socket ``address`` (one at a time) and report
    its pid, then its wait status; exit when stdin closes (the test session ended)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):
            return
        if listener not in readable:
            continue
        conn, _ = listener.accept()
        request = _receive(conn)
        if request is None:
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            _child(request)
        _send(conn, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            _send(conn, {"returncode": returncode})
        except OSError:
            pass
        conn.close()


class Zygote:
    """Client of a preloaded server started by ``start`` with environment ``env``."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = dict(env)
        self.cwd = cwd
        self.folder = Path(tempfile.mkdtemp(prefix="zygote-"))
        self.address = str(self.folder / "socket")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.zygote", self.address], cwd=cwd, env=self.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the preloaded command server did not start (exit {self.process.poll()})")

    def can_run(self, env: dict[str, str]) -> bool:
        """Whether a command with ``env`` behaves in a forked child as in a fresh process (see the module doc)."""
        keys = {k for k in (*env, *self.env) if k.startswith(IMPORT_TIME_PREFIXES)}
        return self.process.poll() is None and all(env.get(k) == self.env.get(k) for k in keys)

    def run(self, argv: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        """Run ``python ARGV`` (``-m MODULE ...`` or ``-c CODE ...``) to completion, like ``subprocess.run`` with
        ``capture_output=True, text=True``; on timeout the command's whole session is killed and TimeoutExpired
        raised."""
        out_fd, out_path = tempfile.mkstemp(dir=self.folder, suffix=".out")
        err_fd, err_path = tempfile.mkstemp(dir=self.folder, suffix=".err")
        os.close(out_fd)
        os.close(err_fd)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.address)
            _send(conn, {"argv": argv, "env": env, "cwd": str(cwd or self.cwd), "stdout": out_path,
                         "stderr": err_path})
            pid = _receive(conn)["pid"]
            conn.settimeout(timeout)
            try:
                finished = _receive(conn)
            except socket.timeout:
                with _suppress():
                    os.killpg(pid, signal.SIGKILL)
                conn.settimeout(60)
                _receive(conn)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout,
                                                Path(out_path).read_text(errors="replace"),
                                                Path(err_path).read_text(errors="replace"))
            with _suppress():  # what the command left running in its session (nothing, normally)
                os.killpg(pid, signal.SIGKILL)
            returncode = finished["returncode"] if finished else -signal.SIGKILL
            return subprocess.CompletedProcess([sys.executable, *argv], returncode,
                                               Path(out_path).read_text(errors="replace"),
                                               Path(err_path).read_text(errors="replace"))
        finally:
            conn.close()
            for path in (out_path, err_path):
                with _suppress():
                    os.unlink(path)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


MAX_SERVERS = 2  # each holds the preloaded libraries (about 0.7 GB)
REPO = Path(__file__).resolve().parent.parent
_servers: list[Zygote] = []


def run_python(argv: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None
               ) -> subprocess.CompletedProcess:
    """Run ``python ARGV`` to completion like ``subprocess.run(..., capture_output=True, text=True)``: forked from a
    preloaded server started with the same import-time environment (started on first use, at most ``MAX_SERVERS``),
    or as a real subprocess where ``STRUCTXLIP_TEST_SUBPROCESS=1``."""
    if os.environ.get("STRUCTXLIP_TEST_SUBPROCESS") == "1":
        return subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    server = next((s for s in _servers if s.can_run(env)), None)
    if server is None:
        if len(_servers) >= MAX_SERVERS:
            _servers.pop(0).close()
        server = Zygote(env, REPO)
        _servers.append(server)
    return server.run(argv, env=env, timeout=timeout, cwd=cwd)


def close_all() -> None:
    """Stop every preloaded server (the end of the test session)."""
    while _servers:
        _servers.pop().close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, (OSError, ProcessLookupError))


if __name__ == "__main__":
    serve(sys.argv[1])
