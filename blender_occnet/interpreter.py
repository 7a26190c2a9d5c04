"""Which Python runs the backend, and can it? (stdlib only, no bpy)

The backend starts without importing torch, so a Python that lacks it would look healthy until the
first request failed. ``probe`` therefore runs the interpreter once with a tiny ``-c`` script that
imports every package the backend needs and prints their versions; ``require_usable`` turns a
failed probe into a sentence that says what is missing and how to get it.
"""

import json
import os
import shutil
import subprocess
import sys
import threading

# import name -> pip name, for what the backend cannot work without
REQUIRED_MODULES = {"torch": "torch", "numpy": "numpy", "skimage": "scikit-image",
                    "trimesh": "trimesh", "safetensors": "safetensors", "scipy": "scipy",
                    "PIL": "pillow", "pykdtree": "pykdtree"}
# import name -> (pip name, the feature that needs it)
OPTIONAL_MODULES = {"fast_simplification": ("fast-simplification", "Face Budget"),
                    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", "Mesh from Image")}

PROBE_TAG = "OCCNET_PROBE "
PROBE_TIMEOUT_S = 120.0  # a cold torch import on a slow disk takes tens of seconds

_PROBE_CODE = """
import importlib, json, sys
out = {"python": sys.version.split()[0], "versions": {}, "missing": {}}
for name in %r:
    try:
        out["versions"][name] = str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        out["missing"][name] = type(exc).__name__ + ": " + str(exc)
torch = sys.modules.get("torch")
if torch is not None:
    out["device"] = "cpu"
    if torch.cuda.is_available():
        out["device"] = "cuda (" + torch.cuda.get_device_name(0) + ")"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out["device"] = "mps"
print(%r + json.dumps(out))
""" % (tuple(REQUIRED_MODULES) + tuple(OPTIONAL_MODULES), PROBE_TAG)


class InterpreterProblem(Exception):
    """The chosen or detected Python cannot run the backend; the message says how to fix it."""


class Probe:
    """What running one interpreter found."""

    def __init__(self, python, versions=None, missing=None, python_version="", device="",
                 failure=""):
        self.python = python
        self.versions = versions or {}
        self.missing = missing or {}  # import name -> the error importing it raised
        self.python_version = python_version
        self.device = device
        self.failure = failure  # the interpreter could not be run at all

    @property
    def missing_required(self):
        return [m for m in REQUIRED_MODULES if m in self.missing]

    @property
    def missing_optional(self):
        return [m for m in OPTIONAL_MODULES if m in self.missing]

    @property
    def ok(self):
        return not self.failure and not self.missing_required

    def problem(self):
        """A sentence naming what is wrong and how to fix it ("" when usable)."""
        if self.failure:
            return self.failure
        if not self.missing_required:
            return ""
        pip_names = [REQUIRED_MODULES[m] for m in self.missing_required]
        details = "; ".join(f"{m}: {self.missing[m]}" for m in self.missing_required)
        return (f"{self.python} lacks {', '.join(pip_names)} ({details}). Install with "
                f"\"{self.python}\" -m pip install {' '.join(pip_names)}, choose another Backend "
                f"Python, or use Set Up Backend Environment in the add-on preferences")

    def summary(self):
        """One line for the preferences: versions, device and what optional features lack."""
        text = (f"Python {self.python_version}, torch {self.versions.get('torch', '?')}, "
                f"device: {self.device or '?'}")
        for module in self.missing_optional:
            pip_name, feature = OPTIONAL_MODULES[module]
            text += f"; {feature} needs {pip_name}"
        return text


def clean_env():
    env = dict(os.environ)
    # Blender sets these for its own Python; they must not leak into another interpreter
    for key in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE"):
        env.pop(key, None)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def probe(python, timeout=PROBE_TIMEOUT_S):
    """Run ``python`` with the import probe; never raises."""
    if not python:
        return Probe(python, failure="no Python interpreter is set")
    if not os.path.isfile(python):
        return Probe(python, failure=f"the Python interpreter {python!r} does not exist")
    try:
        # -I: isolated like the backend's own process (no user site-packages, no working
        # directory), so what the probe imports is what the backend will import
        cp = subprocess.run([python, "-I", "-c", _PROBE_CODE], env=clean_env(), capture_output=True,
                            text=True, errors="replace", timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(python, failure=f"cannot run {python!r}: {exc}")
    for line in cp.stdout.splitlines():
        if line.startswith(PROBE_TAG):
            found = json.loads(line[len(PROBE_TAG):])
            return Probe(python, found["versions"], found["missing"], found["python"],
                         found.get("device", ""))
    tail = " ".join((cp.stderr or cp.stdout).strip().splitlines()[-3:])
    return Probe(python, failure=f"{python!r} is not a working Python (exit code "
                                 f"{cp.returncode}: {tail})")


_cache = {}  # (path, mtime) -> the latest Probe: probing imports torch, which takes seconds


def _cache_key(python):
    try:
        return python, os.path.getmtime(python)
    except OSError:
        return python, None


def known(python):
    """The latest probe of ``python``, or None when it was never probed."""
    return _cache.get(_cache_key(python))


def cached_probe(python):
    """``probe`` once per interpreter file while it is usable (a reinstalled one is probed again);
    an unusable one is probed every time, so installing what it lacked is noticed at once."""
    key = _cache_key(python)
    if key not in _cache or not _cache[key].ok:
        _cache[key] = probe(python)
    return _cache[key]


def probe_in_background(python, then=None):
    """``cached_probe`` in a thread (the UI must not wait for torch to import); ``then(probe)``
    runs in that thread afterwards."""
    def work():
        found = cached_probe(python)
        if then is not None:
            then(found)

    threading.Thread(target=work, name="occnet-probe", daemon=True).start()


def forget(python):
    """Drop what is known about ``python`` (after installing packages into it)."""
    for key in [k for k in _cache if k[0] == python]:
        del _cache[key]


def require_usable(python):
    """The probe of ``python``; raises InterpreterProblem when the backend cannot run there."""
    found = cached_probe(python)
    if not found.ok:
        raise InterpreterProblem(found.problem())
    return found


def candidates(extra=()):
    """Interpreters worth trying, best first: ``extra`` (e.g. the add-on's own venv),
    $OCCNET_PYTHON, the running one, then python3/python on PATH."""
    found = []
    for path in (*extra, os.environ.get("OCCNET_PYTHON"), sys.executable,
                 shutil.which("python3"), shutil.which("python")):
        if path and os.path.isfile(path) and path not in found:
            found.append(path)
    return found


def find_usable(extra=()):
    """The probe of the first candidate that can run the backend; raises InterpreterProblem
    naming what each candidate lacks."""
    problems = []
    for python in candidates(extra):
        found = cached_probe(python)
        if found.ok:
            return found
        problems.append(found.problem())
    raise InterpreterProblem("no Python with torch and the backend's packages was found"
                             + (": " + " | ".join(problems) if problems else ""))
