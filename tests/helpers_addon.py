"""Helpers for the add-on tests (no bpy here)."""

import subprocess
import sys
import sysconfig
from pathlib import Path


def python_without_torch(folder):
    """A venv whose Python has this environment's packages (numpy, so the backend server starts)
    except torch: a shadow ``torch`` package raises ModuleNotFoundError as a missing one does."""
    folder = Path(folder)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    shadow = folder / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    site = next((folder / "venv" / "lib").glob("python*/site-packages"), None) \
        or folder / "venv" / "Lib" / "site-packages"
    (site / "occnet_test_paths.pth").write_text(
        f"{folder / 'shadow'}\n{sysconfig.get_paths()['purelib']}\n")
    python = folder / "venv" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    return str(python)
