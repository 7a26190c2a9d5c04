"""Set Up Backend Environment, without bpy: what to install (``backend_requirements.txt``, the one
list that agrees with pyproject.toml), which PyTorch build fits this machine, and a worker that
creates the venv and runs pip while reporting progress for the main thread to show.

Requirements reach pip only as validated names and version specifiers, one argument each: a text
a user typed can never become a pip option (``--index-url ...``) or a URL.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import namedtuple

from . import interpreter

REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "backend_requirements.txt")

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://download.pytorch.org/whl/cu126"
OTHER_PACKAGES_DOWNLOAD = "about 80 MB"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_EXTRAS = rf"\[\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\]"
_SPEC = r"(?:~=|===|==|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_REQUIREMENT = re.compile(rf"^({_NAME})\s*(?:{_EXTRAS})?\s*(?:{_SPEC}(?:\s*,\s*{_SPEC})*)?$")


class SetupError(Exception):
    pass


TorchBuild = namedtuple("TorchBuild", "label index_url download")


def check_requirement(text):
    """``text`` if it is a plain requirement (name, extras, version specifiers); raises
    SetupError otherwise (options, URLs, paths, markers)."""
    text = text.strip()
    if not _REQUIREMENT.match(text):
        raise SetupError(f"{text!r} is not a package requirement such as 'open3d' or "
                         "'open3d>=0.18' (options, URLs and paths are not accepted)")
    return text


def parse_requirements(text):
    """Requirements separated by commas or new lines, each validated."""
    return [check_requirement(item) for item in re.split(r"[,\n]", text) if item.strip()]


def requirement_name(requirement):
    return _REQUIREMENT.match(requirement).group(1).lower().replace("_", "-")


def backend_requirements():
    """The backend's requirements from ``backend_requirements.txt``."""
    with open(REQUIREMENTS_FILE, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [check_requirement(line) for line in lines if line]


@functools.lru_cache(maxsize=None)  # the preferences ask on every redraw
def nvidia_gpu_present():
    return (shutil.which("nvidia-smi") is not None
            or os.path.exists("/proc/driver/nvidia/version"))


def torch_build(platform=None, nvidia=None):
    """The PyTorch build for this machine: the CUDA wheels where an NVIDIA driver is installed,
    Apple's default wheels on macOS, and otherwise the CPU-only wheels (PyPI's Linux default would
    pull gigabytes of CUDA libraries that cannot be used)."""
    platform = platform or sys.platform
    if platform == "darwin":
        return TorchBuild("PyTorch for macOS (Apple GPU)", None, "about 80 MB")
    if nvidia_gpu_present() if nvidia is None else nvidia:
        return TorchBuild("PyTorch with CUDA 12.6 (NVIDIA GPU found)", CUDA_INDEX, "about 3 GB")
    return TorchBuild("PyTorch for the CPU (no NVIDIA GPU found)", CPU_INDEX, "about 200 MB")


def venv_python(path):
    if sys.platform == "win32":
        return os.path.join(path, "Scripts", "python.exe")
    return os.path.join(path, "bin", "python")


class Plan:
    """What one setup does."""

    def __init__(self, base_python, target, requirements=(), torch=None,
                 system_site_packages=False):
        self.base_python = base_python
        self.target = target
        self.requirements = [check_requirement(r) for r in requirements]
        self.torch = torch or torch_build()
        self.system_site_packages = system_site_packages

    @property
    def python(self):
        return venv_python(self.target)

    def commands(self):
        """(status, argv) for each step."""
        venv = [self.base_python, "-m", "venv"]
        if self.system_site_packages:
            venv.append("--system-site-packages")
        if not self.requirements:
            venv.append("--without-pip")
        steps = [("Creating the venv", venv + [self.target])]
        if not self.requirements:
            return steps
        pip = [self.python, "-m", "pip", "install", "--disable-pip-version-check"]
        steps.append(("Updating pip", pip + ["--upgrade", "pip"]))
        # "raw" prints "Progress <bytes> of <total>" lines (pip >= 24.1, hence the update first)
        pip += ["--progress-bar", "raw"]
        torch = [r for r in self.requirements if requirement_name(r) == "torch"]
        rest = [r for r in self.requirements if requirement_name(r) != "torch"]
        if torch:
            index = ["--index-url", self.torch.index_url] if self.torch.index_url else []
            steps.append((f"Installing {self.torch.label}", pip + index + torch))
        if rest:
            steps.append(("Installing the backend's packages", pip + rest))
        return steps


class Progress:
    """Written by the setup thread, read by the main thread (which copies it into properties)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.steps = 1  # run() sets the number of steps of its plan
        self.step = 0
        self.status = "Starting"
        self.step_fraction = 0.0
        self.lines = []
        self.done = False
        self.error = None
        self.python = None

    def begin_step(self, index, status):
        with self._lock:
            self.step, self.status, self.step_fraction = index, status, 0.0

    def feed(self, line):
        """One line of a command's output."""
        line = line.rstrip()
        with self._lock:
            self.lines.append(line)
            del self.lines[:-200]
            status, fraction = _pip_progress(line)
            if fraction is not None:
                self.step_fraction = fraction
            if status:
                self.status = status

    def finish(self, python=None, error=None):
        with self._lock:
            self.python, self.error, self.done = python, error, True
            self.step, self.step_fraction = self.steps, 0.0
            self.status = f"Failed: {error}" if error else "Ready"

    def snapshot(self):
        """(status, overall fraction in 0..1, last lines)"""
        with self._lock:
            fraction = min(1.0, (self.step + self.step_fraction) / max(self.steps, 1))
            return self.status, fraction, list(self.lines[-4:])


_PIP_RAW = re.compile(r"^Progress (\d+) of (\d+)$")
_PIP_STATUS = (
    (re.compile(r"^Collecting (\S+)"), "Collecting {0}"),
    (re.compile(r"^\s*Downloading (?:\S*/)?(\S+?)(?:-\d\S*)? \(([^)]+)\)"), "Downloading {0} ({1})"),
    (re.compile(r"^Installing collected packages: (.*)"), "Installing {0}"),
    (re.compile(r"^Successfully installed"), "Installed"),
)


def _pip_progress(line):
    """(status or None, fraction of the current download or None) for one line of pip output."""
    m = _PIP_RAW.match(line)
    if m:
        done, total = int(m.group(1)), int(m.group(2))
        return None, done / total if total else None
    for pattern, template in _PIP_STATUS:
        m = pattern.match(line)
        if m:
            status = template.format(*m.groups())
            return (status[:100] + "...") if len(status) > 100 else status, 0.0
    return None, None


def _run(argv, progress):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=interpreter.clean_env(), text=True,
                            errors="replace")
    for line in proc.stdout:
        progress.feed(line)
    if proc.wait() != 0:
        last = next((line for line in reversed(progress.lines) if line.strip()), "")
        raise SetupError(f"{os.path.basename(argv[0])} {' '.join(argv[1:4])} failed with code "
                         f"{proc.returncode}: {last}")


def run(plan, progress):
    """Worker: every step of ``plan``, then the interpreter probe; ends with progress.finish()."""
    commands = plan.commands()
    progress.steps = len(commands)
    try:
        for index, (status, argv) in enumerate(commands):
            progress.begin_step(index, status)
            progress.feed("$ " + " ".join(argv))
            _run(argv, progress)
            if index == 0 and plan.system_site_packages:
                _link_parent_site_packages(plan.base_python, plan.python, progress)
        interpreter.forget(plan.python)
        found = interpreter.cached_probe(plan.python)
        if not found.ok:
            raise SetupError(found.problem())
        progress.feed(f"ready: {found.summary()}")
        progress.finish(python=plan.python)
    except (SetupError, OSError) as exc:
        progress.finish(error=str(exc))


_SITE_DIRS = ("import json, os, site, sys; print(json.dumps(site.getsitepackages() + [p for p in "
              "sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')]))")


def _site_dirs(python):
    cp = subprocess.run([python, "-c", _SITE_DIRS], capture_output=True, text=True, check=True,
                        env=interpreter.clean_env())
    return json.loads(cp.stdout)


def _link_parent_site_packages(base_python, python, progress):
    """``venv --system-site-packages`` only sees the *base* installation's packages. When the base
    Python is itself a venv (or conda env) with torch, a .pth file lets the new venv see its
    site-packages too."""
    try:
        parent, own = _site_dirs(base_python), _site_dirs(python)
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        progress.feed(f"(could not list {base_python}'s site-packages: {exc})")
        return
    dirs = []
    for d in parent:
        if os.path.isdir(d) and d not in dirs and d not in own:
            dirs.append(d)
    if own and dirs:
        with open(os.path.join(own[0], "occnet_parent_site.pth"), "w", encoding="utf-8") as f:
            f.write("\n".join(dirs) + "\n")
        progress.feed("reusing packages from " + ", ".join(dirs))
