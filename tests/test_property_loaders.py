"""Property tests of the file loaders: whatever the bytes in a file of any supported suffix, the
loader returns a valid array or raises the project's InputError, never another exception."""

import io
import warnings
from contextlib import contextmanager

import laspy
import numpy as np
import pye57
import pypcd4
import pytest
import trimesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.errors import InputError
from backend.inputs import IMAGE_SUFFIXES, MAX_IMAGE_SIDE, POINT_SUFFIXES, load_image, load_points

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_point_file(suffix: str, folder) -> bytes:
    """A small, valid point cloud in the format of suffix, written by the format's own library (in
    folder, for pye57, which writes only to a path): the seed that mutations start from."""
    points = np.random.default_rng(0).uniform(-1, 1, (12, 3))
    if suffix in (".xyz", ".txt", ".pts"):
        return "".join(f"{x:.4f} {y:.4f} {z:.4f}\n" for x, y, z in points).encode()
    if suffix == ".csv":
        return ("x,y,z\n" + "".join(f"{x:.4f},{y:.4f},{z:.4f}\n" for x, y, z in points)).encode()
    if suffix in (".ply", ".obj", ".off"):
        exported = trimesh.convex.convex_hull(points).export(file_type=suffix[1:])
        return exported.encode() if isinstance(exported, str) else exported
    if suffix in (".las", ".laz"):
        las = laspy.LasData(laspy.LasHeader(point_format=2, version="1.2"))
        las.x, las.y, las.z = points.T
        buffer = io.BytesIO()
        las.write(buffer, do_compress=suffix == ".laz")
        return buffer.getvalue()
    if suffix == ".pcd":
        buffer = io.BytesIO()
        pypcd4.PointCloud.from_xyz_points(points.astype(np.float32)).save(buffer)
        return buffer.getvalue()
    if suffix == ".e57":
        e57 = pye57.E57(str(folder / "seed.e57"), mode="w")
        e57.write_scan_raw({"cartesianX": points[:, 0], "cartesianY": points[:, 1], "cartesianZ": points[:, 2]})
        e57.close()
        return (folder / "seed.e57").read_bytes()
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, points)
    else:
        np.savez(buffer, points=points)
    return buffer.getvalue()


def valid_image_file(suffix: str) -> bytes:
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[4:12, 6:18] = (200, 60, 30, 255)
    buffer = io.BytesIO()
    image = Image.fromarray(rgba)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix, suffix[1:].upper())
    (image.convert("RGB") if fmt in ("JPEG", "BMP") else image).save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """seed with a few bytes overwritten, a piece inserted and possibly cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def file_contents(seed: bytes):
    return st.one_of(st.binary(max_size=512), mutated(seed))


TEXT_CLOUDS = st.text(alphabet="0123456789 .,-+e#\nnaif\t", max_size=200)


@contextmanager
def no_warnings():
    """Warnings on stderr would break the command line's promise of one `error:` line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not caught, [str(w.message) for w in caught]


def check_points(path) -> None:
    try:
        with no_warnings():
            points = load_points(path)
    except InputError:
        return
    assert points.dtype == np.float64 and points.ndim == 2 and points.shape[1] == 3
    assert len(points) >= 3 and np.isfinite(points).all()


def check_image(path) -> None:
    try:
        with no_warnings():
            rgba = load_image(path)
    except InputError:
        return
    assert rgba.dtype == np.float32 and rgba.ndim == 3 and rgba.shape[2] == 4
    assert 8 <= min(rgba.shape[:2]) and max(rgba.shape[:2]) <= MAX_IMAGE_SIDE
    assert np.isfinite(rgba).all() and rgba.min() >= 0 and rgba.max() <= 1


@pytest.mark.parametrize("suffix", POINT_SUFFIXES)
def test_point_loader_on_any_bytes(tmp_path_factory, suffix):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"cloud{suffix}"

    @FUZZ
    @given(file_contents(valid_point_file(suffix, folder)))
    def run(content):
        path.write_bytes(content)
        check_points(path)

    run()


def test_text_point_loader_on_any_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "cloud.xyz"

    @FUZZ
    @given(TEXT_CLOUDS)
    def run(text):
        path.write_text(text)
        check_points(path)

    run()


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_image_loader_on_any_bytes(tmp_path_factory, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"image{suffix}"

    @FUZZ
    @given(file_contents(valid_image_file(suffix)))
    def run(content):
        path.write_bytes(content)
        check_image(path)

    run()
