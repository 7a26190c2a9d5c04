"""The add-on's one backend session, configured from the preferences: which Python runs the backend,
what it preloads, and the options of a request. Shared by the operators and the panel."""

import os
import threading
import time

import bpy

from . import interpreter, request_options
from .client import BackendError
from .preferences import device_option, get_prefs, own_venv_pythons
from .session import Session

PRESTART_WAIT_S = 120.0


def _log_backend(line):
    if os.environ.get("OCCNET_DEBUG"):
        print("[occnet-backend]", line)


session = Session(log=_log_backend)
_detected = {"python": None}  # found by detection; the preferences' Backend Python wins
_prestart_deadline = [0.0]


def backend_python(prefs):
    """The Backend Python of the preferences, else the detected one; raises InterpreterProblem."""
    if prefs.python_path:
        path = bpy.path.abspath(prefs.python_path)
        if not os.path.isfile(path):
            raise interpreter.InterpreterProblem(
                f"the Backend Python {path!r} in the add-on preferences does not exist")
        return path
    if _detected["python"] is None:
        try:
            _detected["python"] = interpreter.find_usable(own_venv_pythons()).python
        except interpreter.InterpreterProblem as exc:
            raise interpreter.InterpreterProblem(
                f"{exc}. Set the Backend Python in the add-on preferences or use "
                "'Set Up Backend Environment'") from None
    return _detected["python"]


def server_args(prefs):
    """Start-up options for the backend: load the configured models while it waits."""
    args = []
    for kind, ck in (("points", prefs.checkpoint_points), ("image", prefs.checkpoint_image)):
        args += ["--preload", f"{kind}:{bpy.path.abspath(ck)}" if ck else kind]
    return args


def request_options_for(prefs, kind, resolution, threshold, max_faces, checkpoint="", focal_length=None,
                        keep_stray=False):
    """Validated request options; an empty checkpoint means the preferences', then the shipped
    default (a fitted field, kind "none", has neither). keep_stray: points that are modelled
    vertices, not a scan. Raises request_options.OptionError."""
    ck = checkpoint or {"points": prefs.checkpoint_points, "image": prefs.checkpoint_image}.get(kind, "")
    return request_options.make_options(
        checkpoint=bpy.path.abspath(ck) if ck else None, resolution=resolution,
        threshold=threshold, max_faces=max_faces, device=device_option(prefs),
        normals=prefs.use_normals, refine=prefs.refine_points, focal_length=focal_length,
        colours=prefs.vertex_colours, keep_stray=keep_stray)


def client_for(prefs):
    """The client for the preferences' Python (not started yet)."""
    return session.client_for(backend_python(prefs), server_args(prefs))


def start_job(context, kind, array, options, name, origin=None, location=None, label="", colors=None, mask=None):
    prefs = get_prefs(context)
    return session.start_job(backend_python(prefs), kind, array, options, name, origin=origin,
                             location=location, label=label, server_args=server_args(prefs), colors=colors,
                             mask=mask)


def read_points(context, path):
    """A point-cloud file read by the backend (Session.read_points)."""
    prefs = get_prefs(context)
    return session.read_points(backend_python(prefs), path, server_args=server_args(prefs))


def read_image(context, path):
    """A picture file read by the backend (Session.read_image)."""
    prefs = get_prefs(context)
    return session.read_image(backend_python(prefs), path, server_args=server_args(prefs))


def _chosen_python(prefs):
    """The Backend Python of the preferences or the detected one, without detecting (None)."""
    return bpy.path.abspath(prefs.python_path) if prefs.python_path else _detected["python"]


def prestart_timer():
    """UI only: start the backend soon after Blender starts, so the first request does not pay
    for Python + torch start-up and model loading. Waits for the background detection or probe
    of the interpreter, so the UI never waits for torch to import."""
    prefs = get_prefs()
    if not getattr(prefs, "start_with_blender", False) or session.client is not None:
        return None
    python = _chosen_python(prefs)
    found = interpreter.known(python) if python else None
    if found is None:
        return 0.5 if time.monotonic() < _prestart_deadline[0] else None
    if not found.ok:  # say so in the panel before anyone generates
        session.fail(found.problem())
        return None
    try:
        client_for(prefs).start()
    except (interpreter.InterpreterProblem, BackendError) as exc:  # shown again on Generate
        _log_backend(f"prestart failed: {exc}")
    return None


def detect_in_background():
    """Find a backend Python while the user works, so the first Generate does not wait for it."""
    extra = own_venv_pythons()

    def work():
        try:
            found = interpreter.find_usable(extra)
        except interpreter.InterpreterProblem:
            return
        if _detected["python"] is None:
            _detected["python"] = found.python

    threading.Thread(target=work, name="occnet-detect", daemon=True).start()


def start_background_work():
    """On register, with the UI: check (or detect) the interpreter and prestart the backend."""
    prefs = get_prefs()
    if prefs.python_path:
        interpreter.probe_in_background(bpy.path.abspath(prefs.python_path))
    else:
        detect_in_background()
    _prestart_deadline[0] = time.monotonic() + PRESTART_WAIT_S
    bpy.app.timers.register(prestart_timer, first_interval=1.0, persistent=True)


def stop_background_work():
    if bpy.app.timers.is_registered(prestart_timer):
        bpy.app.timers.unregister(prestart_timer)
    session.shutdown()
