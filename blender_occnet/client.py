"""The add-on's side of the backend: start ``python -m backend serve`` as a child process, send
requests, and receive frames on a reader thread. No bpy here (the batch command and the tests use
it too); the Blender side calls ``poll()`` from the main thread (a timer, a modal operator, or a
synchronous loop in background mode) to apply what the reader thread received.
"""

import collections
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np

from . import wire

ADDON_DIR = os.path.dirname(os.path.abspath(__file__))
STDERR_TAIL_LINES = 40


class BackendError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return self.message


def backend_root():
    """The one folder that holds the ``backend`` package the child runs, or None when the chosen
    interpreter must bring its own (``pip install blender-occnet``).

    * built add-on: ``<addon>/bundled`` (build_addon.py copies the backend there)
    * source tree: the repository root next to this package (it holds build_addon.py)
    Never the add-on's parent folder in an installation: that is the user's whole extensions or
    add-ons folder, where any other package named ``backend`` could shadow ours."""
    bundled = os.path.join(ADDON_DIR, "bundled")
    if os.path.isfile(os.path.join(bundled, "backend", "__init__.py")):
        return bundled
    repo = os.path.dirname(ADDON_DIR)
    if (os.path.isfile(os.path.join(repo, "build_addon.py"))
            and os.path.isfile(os.path.join(repo, "backend", "__init__.py"))):
        return repo
    return None


# -I (isolated mode): the working directory, PYTHON* variables and the user's site-packages stay
# out of the child's sys.path, so a folder that happens to hold a ``backend/`` package (Blender's
# working directory can be anything) is never run. -X utf8: the child's stderr is UTF-8 whatever
# the locale (isolated mode ignores PYTHONIOENCODING).
ISOLATED_FLAGS = ("-I", "-X", "utf8")
SERVE_CODE = "import runpy; runpy.run_module('backend', run_name='__main__', alter_sys=True)"


def isolated_command(python, code, args=()):
    """``python`` running ``code`` in isolated mode with only backend_root() added to sys.path."""
    root = backend_root()
    bootstrap = f"import sys\nsys.path[:0] = {[root] if root else []!r}\n{code}"
    return [python, *ISOLATED_FLAGS, "-c", bootstrap, *args]


def serve_command(python, args=()):
    """The command line of ``python -m backend serve ARGS``, isolated (see ISOLATED_FLAGS)."""
    return isolated_command(python, SERVE_CODE, ["serve", *args])


def child_env():
    env = dict(os.environ)
    # Blender sets these for its own Python; they must not leak into another interpreter.
    for k in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE"):
        env.pop(k, None)
    # Isolated mode ignores PYTHON* variables; these serve a custom ``command`` (benches, tests)
    # and whatever the backend itself starts, which then finds the same backend and nothing else.
    root = backend_root()
    if root:
        env["PYTHONPATH"] = root
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.setdefault("TQDM_DISABLE", "1")
    # idle OpenMP threads sleep instead of spinning: Blender keeps its CPU (see backend/server.py)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class Request:
    """Bookkeeping of one reconstruct or read_points request, updated by ``BackendClient.poll()``."""

    def __init__(self, req_id, kind):
        self.id = req_id
        self.kind = kind
        self.stage = "queued"
        self.fraction = 0.0
        self.result = None  # dict: vertices, faces, normals, colors, stats (read: points, colors, normals)
        self.error = None  # BackendError
        self.done = False
        self.started = time.monotonic()
        self.on_progress = None  # callable(request), called by poll() for every progress frame

    def __repr__(self):
        state = "done" if self.done else f"{self.stage} {self.fraction:.0%}"
        return f"<Request {self.id} {self.kind} {state}>"


class BackendClient:
    """One backend child process and the requests in flight. Not thread-safe except where noted:
    call everything but the reader thread's internals from one thread (Blender's main thread)."""

    def __init__(self, python=None, args=(), log=None, command=None):
        self.python = python or sys.executable
        self.args = list(args)
        self.command = list(command) if command else None  # replaces `python -m backend serve`
        self.log = log  # callable(str) for the backend's stderr lines, or None
        self.proc = None
        self.hello = None
        self._inbox = queue.Queue()
        self._next_id = 1
        self._requests = {}  # id -> Request (reconstruct)
        self._sync = {}  # id -> reply header for ping/info/shutdown
        self._stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._write_lock = threading.Lock()
        self._threads = []
        self._generation = 0

    # -- process management ---------------------------------------------------------------
    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        if self.alive:
            return
        if self._requests:  # the previous process died before its exit was polled
            code = self.proc.poll() if self.proc is not None else None
            self._fail_all(wire.E_BACKEND_EXITED,
                           f"the backend exited with code {code} during the request.{self._tail_text()}")
        self._cleanup_dead()
        cmd = self.command or serve_command(self.python, self.args)
        kwargs = {}
        if sys.platform == "win32":  # pragma: no cover
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=child_env(),
                                         bufsize=0, close_fds=True, **kwargs)
        except OSError as exc:
            self.proc = None
            raise BackendError(wire.E_BACKEND_START,
                               f"cannot start the backend with {self.python!r}: {exc}") from exc
        self._generation += 1
        gen = self._generation
        self._stderr_tail.clear()
        t1 = threading.Thread(target=self._read_frames, args=(self.proc, gen),
                              name="occnet-client-reader", daemon=True)
        t2 = threading.Thread(target=self._read_stderr, args=(self.proc,),
                              name="occnet-client-stderr", daemon=True)
        t1.start()
        t2.start()
        self._threads = [t1, t2]

    def _cleanup_dead(self):
        if self.proc is not None:
            try:
                self.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    s.close()
                except (OSError, AttributeError):
                    pass
        self.proc = None

    def _read_frames(self, proc, gen):
        reader = wire.FrameReader(proc.stdout)
        while True:
            try:
                frame = reader.read()
            except wire.ProtocolError as exc:
                self._inbox.put(("protocol", gen, exc.message))
                continue
            except (EOFError, OSError, ValueError):
                frame = None
            except MemoryError:
                self._inbox.put(("protocol", gen, "a frame too large for this machine's memory"))
                try:
                    proc.kill()  # the stream position is lost: start afresh on the next request
                except OSError:
                    pass
                frame = None
            if frame is None:
                break
            self._inbox.put(("frame", gen, frame))
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        # give the stderr thread a moment to collect the last words
        time.sleep(0.05)
        self._inbox.put(("exit", gen, code))

    def _read_stderr(self, proc):
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            if self.log is not None:
                try:
                    self.log(line)
                except Exception:
                    pass

    def stderr_tail(self, n=8):
        return list(self._stderr_tail)[-n:]

    def stop(self, timeout=3.0):
        """Ask the backend to shut down, then make sure it is gone (kill if needed)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._send({"type": "shutdown", "id": self._new_id()})
            except BackendError:
                pass
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self.poll()
        self._fail_all(wire.E_BACKEND_EXITED, "the backend was stopped")
        self._cleanup_dead()

    def kill(self):
        """Kill the child at once (tests, emergencies)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    # -- sending ----------------------------------------------------------------------------
    def _new_id(self):
        i = self._next_id
        self._next_id += 1
        return i

    def _send(self, header, arrays=None):
        if not self.alive:
            raise BackendError(wire.E_BACKEND_EXITED, "the backend is not running")
        try:
            with self._write_lock:
                wire.write_frame(self.proc.stdin, header, arrays)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise BackendError(wire.E_BACKEND_EXITED,
                               f"the backend stopped accepting requests ({exc}){self._tail_text()}") from exc

    def send_raw(self, data):
        """Write raw bytes to the backend (tests of malformed frames)."""
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def reconstruct(self, kind, array, options, colors=None, mask=None):
        """Start a reconstruction; returns its Request. ``kind`` is "points" (array (N, 3), float64
        stays float64 so survey coordinates keep their precision; colors (N, 3) in [0, 1] or None)
        or "image" (array (H, W, 3|4) uint8 or float32, row 0 = top; mask: the object's mask as
        (h, w) values or an (h, w, 3|4) mask picture of the same proportions, or None) or "none"
        (array None: the field fitted to one object named by options["checkpoint"])."""
        if kind == "points":
            arr = np.asarray(array)
            arr = np.ascontiguousarray(arr, dtype=np.float64 if arr.dtype == np.float64 else np.float32)
            arrays = {"points": arr,
                      "colors": None if colors is None else np.ascontiguousarray(colors, dtype=np.float32)}
        elif kind == "image":
            arr = np.asarray(array)
            if arr.dtype != np.uint8:
                arr = arr.astype(np.float32)
            arrays = {"pixels": np.ascontiguousarray(arr),
                      "mask": None if mask is None else np.ascontiguousarray(mask)}
        elif kind == "none":
            arrays = {}
        else:
            raise ValueError(f"unknown input kind {kind!r}")
        size = wire.body_size(arrays)
        if size > wire.MAX_REQUEST_BODY_BYTES:
            # the backend would refuse it only after all of it went through the pipe
            raise BackendError(wire.E_BAD_REQUEST,
                               f"the input is {size / 2**30:.1f} GiB, over the backend's "
                               f"{wire.MAX_REQUEST_BODY_BYTES / 2**30:.0f} GiB limit per request")
        self.start()
        req = Request(self._new_id(), kind)
        self._requests[req.id] = req
        try:
            self._send({"type": "reconstruct", "id": req.id, "input": kind,
                        "options": dict(options)}, arrays)
        except BackendError as exc:
            self._finish(req, error=exc)
        return req

    def read_points(self, path):
        """Ask the backend to read a point-cloud file (backend.pointclouds: LAS/LAZ, E57, PCD, PLY,
        text, NumPy); returns its Request, whose result holds "points" (N, 3) float64 and
        "colors" / "normals" (N, 3) float32 or None."""
        return self._read("read_points", path)

    def read_image(self, path):
        """Ask the backend to read a picture file (backend.inputs: PNG, JPEG, TIFF, WebP, BMP, any
        bit depth, EXIF orientation applied); returns its Request, whose result holds "pixels"
        (H, W, 4) float32 RGBA in [0, 1], row 0 = top, and "focal_length" (35 mm equivalent from
        the file's EXIF) or None."""
        return self._read("read_image", path)

    def _read(self, request_type, path):
        self.start()
        req = Request(self._new_id(), "read")
        self._requests[req.id] = req
        try:
            self._send({"type": request_type, "id": req.id, "path": str(path)})
        except BackendError as exc:
            self._finish(req, error=exc)
        return req

    def cancel(self, req):
        if req.done or not self.alive:
            return
        try:
            self._send({"type": "cancel", "id": self._new_id(), "target": req.id})
        except BackendError:
            pass
        req.stage = "cancelling"

    # -- receiving (main thread) ----------------------------------------------------------
    def _finish(self, req, result=None, error=None):
        req.result = result
        req.error = error
        req.done = True
        self._requests.pop(req.id, None)

    def _fail_all(self, code, message):
        for req in list(self._requests.values()):
            self._finish(req, error=BackendError(code, message))

    def _tail_text(self):
        tail = [line for line in self.stderr_tail(6) if line.strip()]
        return (" Backend output: " + " | ".join(tail)) if tail else ""

    def poll(self, timeout=0.0):
        """Apply what the reader thread received. Returns the list of Requests that finished.
        With timeout > 0, waits up to that long for the first message."""
        finished = []
        block = timeout > 0
        while True:
            try:
                item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            kind, gen, payload = item
            if kind == "frame":
                self._on_frame(*payload, finished)
            elif kind == "protocol":
                self._stderr_tail.append(f"(client) unreadable frame from the backend: {payload}")
            elif kind == "exit" and gen == self._generation:
                code = payload
                pending = list(self._requests.values())
                if pending:
                    how = (f"was killed by signal {-code}" if isinstance(code, int) and code < 0
                           else f"exited with code {code}")
                    msg = f"the backend {how} during the request.{self._tail_text()}"
                    for req in pending:
                        self._finish(req, error=BackendError(wire.E_BACKEND_EXITED, msg))
                        finished.append(req)
                self._cleanup_dead()
        return finished

    def _on_frame(self, header, arrays, finished):
        t = header.get("type")
        rid = header.get("id")
        if t == "hello":
            self.hello = header
            return
        if t in ("pong", "info", "bye"):
            self._sync[rid] = header
            return
        req = self._requests.get(rid)
        if t == "error" and req is None:
            self._sync[rid] = header
            if rid is None:
                self._stderr_tail.append(f"(backend error) {header.get('message')}")
            return
        if req is None:
            return
        if t == "progress":
            req.stage = str(header.get("stage", ""))
            req.fraction = float(header.get("fraction", 0.0))
            if req.on_progress is not None:
                req.on_progress(req)
        elif t == "result":
            res = {"vertices": arrays.get("vertices"), "faces": arrays.get("faces"),
                   "normals": arrays.get("normals"), "colors": arrays.get("colors"),
                   "stats": header.get("stats") or {}}
            if res["vertices"] is None or res["faces"] is None:
                self._finish(req, error=BackendError(
                    wire.E_PROTOCOL, "the backend sent a result without vertices or faces"))
            else:
                self._finish(req, result=res)
            finished.append(req)
        elif t == "points":
            if arrays.get("points") is None:
                self._finish(req, error=BackendError(wire.E_PROTOCOL, "the backend sent no points"))
            else:
                self._finish(req, result={"points": arrays["points"], "colors": arrays.get("colors"),
                                          "normals": arrays.get("normals")})
            finished.append(req)
        elif t == "image":
            if arrays.get("pixels") is None:
                self._finish(req, error=BackendError(wire.E_PROTOCOL, "the backend sent no pixels"))
            else:
                self._finish(req, result={"pixels": arrays["pixels"], "focal_length": header.get("focal_length")})
            finished.append(req)
        elif t == "error":
            self._finish(req, error=BackendError(header.get("code", wire.E_INTERNAL),
                                                 header.get("message", "unknown error")))
            finished.append(req)

    def wait(self, req, timeout=None, on_progress=None):
        """Block until ``req`` is done (synchronous callers: batch, background mode)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if on_progress is not None:
            req.on_progress = on_progress
        while not req.done:
            self.poll(timeout=0.1)
            if deadline is not None and time.monotonic() > deadline and not req.done:
                self.cancel(req)
                self._finish(req, error=BackendError(
                    wire.E_TIMEOUT, f"the backend did not answer within {timeout:.0f} s"))
        return req

    def _call(self, mtype, timeout):
        self.start()
        rid = self._new_id()
        self._send({"type": mtype, "id": rid})
        deadline = time.monotonic() + timeout
        while rid not in self._sync:
            if time.monotonic() > deadline:
                raise BackendError(wire.E_TIMEOUT, f"the backend did not answer {mtype!r} within {timeout:.0f} s")
            self.poll(timeout=0.05)
            if self.proc is None:
                raise BackendError(wire.E_BACKEND_EXITED,
                                   f"the backend exited before answering {mtype!r}.{self._tail_text()}")
        reply = self._sync.pop(rid)
        if reply.get("type") == "error":
            raise BackendError(reply.get("code", wire.E_INTERNAL), reply.get("message", ""))
        return reply

    def ping(self, timeout=30.0):
        return self._call("ping", timeout)

    def info(self, timeout=120.0):
        return self._call("info", timeout)

    @property
    def busy(self):
        return bool(self._requests)

    def take_unattributed_errors(self):
        """Error replies that did not belong to a request (e.g. to a malformed frame)."""
        out = [h for k, h in list(self._sync.items()) if h.get("type") == "error"]
        for k in [k for k, h in self._sync.items() if h.get("type") == "error"]:
            del self._sync[k]
        return out
