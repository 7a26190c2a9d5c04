"""What a reconstruction request may ask for: the one definition the add-on's properties, the batch
command's arguments and the options sent to the backend all come from (no bpy).

The backend's pipeline accepts exactly these values (``backend.pipeline.ReconstructOptions``);
offering only them means a request never fails on an option the user could pick.
"""

from . import wire

# MISE refines a 32^3 grid by doubling, so only powers of two from 32 reach the pipeline
RESOLUTIONS = (32, 64, 128, 256, 512)
DEFAULT_RESOLUTION = 128

# the surface is the threshold's level set: 0 and 1 have none
THRESHOLD_MIN, THRESHOLD_MAX = 0.01, 0.99
DEFAULT_THRESHOLD = 0.5

# a closed triangle mesh has at least 4 faces; 0 means no budget
MIN_FACE_BUDGET = 4
NO_FACE_BUDGET = 0

DEVICES = ("auto", "cpu", "cuda", "mps")

INPUT_KINDS = ("points", "image")


class OptionError(ValueError):
    """A request option outside what the backend accepts; the message names the allowed values."""


def resolution_items():
    """EnumProperty items for the resolution (identifiers are the numbers as text)."""
    return [(str(r), str(r), f"{r}^3 grid") for r in RESOLUTIONS]


def check_resolution(resolution):
    value = int(resolution)
    if value not in RESOLUTIONS:
        raise OptionError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, "
                          f"got {resolution}")
    return value


def check_threshold(threshold):
    value = float(threshold)
    if not THRESHOLD_MIN <= value <= THRESHOLD_MAX:
        raise OptionError(f"threshold must lie in {THRESHOLD_MIN}..{THRESHOLD_MAX}, got {threshold}")
    return value


def check_face_budget(max_faces):
    """None (no budget) for 0 or None; otherwise an integer of at least MIN_FACE_BUDGET."""
    if not max_faces:
        return None
    value = int(max_faces)
    if value < MIN_FACE_BUDGET:
        raise OptionError(f"a face budget must be 0 (no limit) or at least {MIN_FACE_BUDGET}, "
                          f"got {max_faces}")
    return value


def check_device(device):
    """None for automatic; otherwise one of DEVICES or an indexed CUDA device such as 'cuda:1'."""
    if not device or device.lower() == "auto":
        return None
    value = device.lower()
    base, _, index = value.partition(":")
    if base not in DEVICES or (index and not (base == "cuda" and index.isdigit())):
        raise OptionError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    return value


# images: the 35 mm equivalent focal length of the lens; 0 means unknown (the file's EXIF, else 50 mm)
FOCAL_LENGTH_MIN, FOCAL_LENGTH_MAX = 1.0, 2000.0
UNKNOWN_FOCAL_LENGTH = 0.0


def check_focal_length(focal_length):
    """None (unknown) for 0 or None; otherwise millimetres in FOCAL_LENGTH_MIN..FOCAL_LENGTH_MAX."""
    if not focal_length:
        return None
    value = float(focal_length)
    if not FOCAL_LENGTH_MIN <= value <= FOCAL_LENGTH_MAX:
        raise OptionError(f"focal length must lie in {FOCAL_LENGTH_MIN:g}..{FOCAL_LENGTH_MAX:g} mm "
                          f"(35 mm equivalent) or be 0 (unknown), got {focal_length}")
    return value


def make_options(checkpoint=None, resolution=DEFAULT_RESOLUTION, threshold=DEFAULT_THRESHOLD,
                 max_faces=None, device=None, normals=False, refine=True, focal_length=None, colours=True,
                 keep_stray=False):
    """The ``options`` object of a reconstruct request (wire.options_dict), validated; raises OptionError."""
    return wire.options_dict(checkpoint=checkpoint, resolution=check_resolution(resolution),
                             threshold=check_threshold(threshold), max_faces=check_face_budget(max_faces),
                             device=check_device(device), normals=normals, refine=refine,
                             focal_length=check_focal_length(focal_length), colours=colours,
                             keep_stray=keep_stray)
