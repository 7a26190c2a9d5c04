"""The job lifecycle: one backend process, the one reconstruction in flight, and turning its result
into a Blender object. The operators (through ``runtime.session``) and the batch command use the
same Session; everything here runs on Blender's main thread.

    session.start_job(python, kind, array, options, name, origin=...)   # sends the request
    session.pump() / session.wait()                                     # apply received frames
    outcome = session.finish_job(context)                               # object or error
"""

import time
from collections import namedtuple

from . import interpreter, mesh_builder, wire
from .client import BackendClient

POLL_INTERVAL_S = 0.05

Outcome = namedtuple("Outcome", "obj error cancelled")


class Job:
    """A request in flight and what to build from its result."""

    def __init__(self, request, kind, name, origin=None, location=None, label="", n_points=None):
        self.request = request
        self.kind = kind
        self.name = name
        self.origin = origin  # points: subtract from the result and put the object there
        self.location = location  # images: where the object goes (the 3D cursor)
        self.label = label or "Reconstruction"
        self.n_points = n_points


class Session:
    def __init__(self, log=None):
        self.log = log  # callable(str) for the backend's stderr lines, or None
        self.client = None
        self.job = None
        self.last_error = ""
        self.last_info = ""

    @property
    def busy(self):
        return self.job is not None

    @property
    def backend_running(self):
        return self.client is not None and self.client.alive

    def client_for(self, python, args=()):
        """The client for ``python`` (checked once with the interpreter probe, so a Python without
        torch is refused here rather than failing every request); ``args`` apply to the next
        start. Raises interpreter.InterpreterProblem."""
        if self.client is not None and self.client.python != python:
            self.client.stop()
            self.client = None
        if self.client is None:
            interpreter.require_usable(python)
            self.client = BackendClient(python=python, log=self.log)
        if not self.client.alive:
            self.client.args = list(args)
        return self.client

    def start_job(self, python, kind, array, options, name, origin=None, location=None, label="",
                  server_args=(), colors=None, mask=None):
        """Send a reconstruction to the backend (starting it if needed); colors (N, 3) in [0, 1]
        for points give the mesh vertex colours; mask: an image's object mask (client.reconstruct).
        Raises InterpreterProblem or client.BackendError."""
        client = self.client_for(python, server_args)
        self.last_error = ""
        self.last_info = ""
        request = client.reconstruct(kind, array, options, colors=colors, mask=mask)
        self.job = Job(request, kind, name, origin, location, label,
                       n_points=len(array) if kind == "points" else None)
        return self.job

    def read_points(self, python, path, server_args=()):
        """Read a point-cloud file with the backend's reader (LAS/LAZ, E57, PCD, PLY, text, NumPy:
        the libraries live in the backend's Python, not in Blender's) and wait for it: a dict of
        "points" (N, 3) float64, "colors" and "normals" (N, 3) float32 or None. Raises
        InterpreterProblem, or client.BackendError naming the problem with the file."""
        return self._read(self.client_for(python, server_args).read_points(path))

    def read_image(self, python, path, server_args=()):
        """Read a picture file with the backend's reader and wait for it: a dict of "pixels"
        (H, W, 4) float32 and "focal_length" (EXIF, 35 mm equivalent) or None. Raises
        InterpreterProblem, or client.BackendError naming the problem with the file."""
        return self._read(self.client_for(python, server_args).read_image(path))

    def _read(self, request):
        self.client.wait(request)
        if request.error is not None:
            raise request.error
        return request.result

    def pump(self):
        """Apply the frames the reader thread received. Returns the requests that finished."""
        if self.client is None:
            return []
        return self.client.poll()

    def wait(self, on_progress=None):
        """Pump until the current job is done (background mode, EXEC, the batch command);
        ``on_progress(request)`` sees every progress frame."""
        request = self.job.request
        request.on_progress = on_progress
        while not request.done:
            self.client.poll(timeout=POLL_INTERVAL_S)

    def cancel(self):
        """Ask the backend to stop the current job; it finishes as cancelled."""
        if self.job is not None and self.client is not None:
            self.client.cancel(self.job.request)

    def abandon(self):
        """Cancel the current job and forget it (Blender aborted the operator)."""
        self.cancel()
        self.job = None

    def fail(self, message):
        self.last_error = message
        self.last_info = ""

    def finish_job(self, context):
        """Build the object of the finished job, or record why there is none."""
        job = self.job
        self.job = None
        request = job.request
        if request.error is not None:
            if request.error.code == wire.E_CANCELLED:
                self.last_error = ""
                self.last_info = f"{job.label} cancelled"
                return Outcome(None, None, True)
            self.fail(f"{request.error.message} [{request.error.code}]")
            return Outcome(None, self.last_error, False)
        t0 = time.perf_counter()
        try:
            obj = mesh_builder.object_from_result(context, job.name, request.result,
                                                  origin=job.origin, location=job.location)
        except mesh_builder.MeshDataError as exc:
            self.fail(f"The backend's mesh cannot be used: {exc}")
            return Outcome(None, self.last_error, False)
        self.last_info = _result_summary(obj, job, request.result.get("stats", {}),
                                         time.perf_counter() - t0)
        return Outcome(obj, None, False)

    def shutdown(self):
        """Stop the backend process (disabling the add-on, the end of a batch)."""
        self.abandon()
        if self.client is not None:
            self.client.stop()
            self.client = None


def _result_summary(obj, job, stats, build_s):
    """One line on the new object, then what the backend warned about (an estimated mask, an object
    cut off by the frame, the point-cloud safety net at work, a move to the CPU), one per line."""
    text = f"{obj.name}: {len(obj.data.vertices)} vertices, {len(obj.data.polygons)} faces"
    if job.n_points is not None:
        text += f" from {job.n_points} points"
    secs = stats.get("server_seconds")
    if isinstance(secs, (int, float)):
        text += f", {secs:.2f} s in the backend"
    warnings = [w for w in stats.get("warnings") or [] if isinstance(w, str)]
    return "\n".join([text + f", {build_s:.2f} s to build"] + [f"Warning: {w}" for w in warnings])
