"""Run the batch command inside Blender, whichever way the add-on was installed:

    blender -b --python-exit-code 2 --python <add-on folder>/batch_launcher.py -- INPUTS... --out DIR

An extension is the module ``bl_ext.<repository>.blender_occnet``, a legacy add-on (or the
source tree on sys.path) ``blender_occnet``; a fixed ``from blender_occnet.batch import main``
fails for extensions. This script asks addon_utils which one is installed, runs its batch command
and exits with its status; ``--python-exit-code 2`` makes Blender exit 2, not 0, should the script
itself fail. The add-on's preferences show this command with the real folder (Copy Batch Command).
"""

import importlib
import sys

ADDON_NAME = "blender_occnet"
EXIT_USAGE = 2


def installed_module_names():
    """Module names of the installed add-on, enabled ones first."""
    import addon_utils

    names = [m.__name__ for m in addon_utils.modules()
             if m.__name__.rpartition(".")[2] == ADDON_NAME]
    enabled = [n for n in names if addon_utils.check(n)[1]]
    return enabled + [n for n in names if n not in enabled]


def find_batch_module():
    for name in installed_module_names() + [ADDON_NAME]:
        try:
            return importlib.import_module(name + ".batch")
        except ModuleNotFoundError as exc:
            if not (name + ".batch").startswith(exc.name or "\0"):
                raise  # the add-on is there but something it imports is not
    return None


def main():
    batch = find_batch_module()
    if batch is None:
        print(f"error: the {ADDON_NAME} add-on is not installed in this Blender", file=sys.stderr)
        return EXIT_USAGE
    return batch.main()


if __name__ == "__main__":
    sys.exit(main())
