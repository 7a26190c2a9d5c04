"""backend.inputs against awkward and hostile files: every failure is one InputError naming the
problem, images of every pixel format read with the right values, memory stays bounded."""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import pointclouds
from backend.errors import InputError
from backend.inputs import MAX_IMAGE_SIDE, load_image, load_points, normalisation, validate_points

REPO = Path(__file__).resolve().parents[1]


def gradient(height=24, width=32) -> np.ndarray:
    """Values in [0, 1] that differ across the image, so a wrong scale or orientation shows."""
    return np.add.outer(np.arange(height) / (2 * height), np.arange(width) / (2 * width))


# --- points --------------------------------------------------------------------------------------

def test_coordinates_that_would_overflow_float32_are_refused(tmp_path):
    np.save(tmp_path / "huge.npy", np.array([[1e38, 0, 0], [-1e38, 1e38, 0], [0, 0, 1e38]]))
    with pytest.raises(InputError, match=r"huge.npy: coordinates reach 1e\+38.*scale the points down"):
        load_points(tmp_path / "huge.npy")


def test_large_but_safe_coordinates_normalise_to_the_canonical_box():
    points = validate_points(np.array([[1e36, -1e36, 0], [-1e36, 1e36, 1e36], [0, 0, -1e36]]))
    center, scale = normalisation(points)
    canonical = (points - center) / scale
    assert np.isfinite(center).all() and np.isfinite(scale)
    assert np.allclose(canonical.min(0), -0.5) and np.allclose(canonical.max(0), 0.5)
    # The padded query box mapped back stays a finite float32: the mesh cannot hold -inf vertices.
    assert np.isfinite(np.float32(center + 0.55 * scale)).all()


@pytest.mark.parametrize("name,text", [
    ("spaces.xyz", "# scanned\n\n0 0 0\n1 0 0 255 0 0\n0 1 0\n0 0 1 0.1 0.2 0.3\n"),
    ("commas.txt", "0,0,0\n1, 0, 0\n0,1,0\n0,0,1\n"),
    ("header.csv", "x,y,z,red\n0,0,0,1\n1,0,0,1\n0,1,0,1\n0,0,1,1\n"),
    ("count.pts", "4\n0 0 0 7 1 2 3\n1 0 0 7 1 2 3\n0 1 0 7 1 2 3\n0 0 1 7 1 2 3\n"),
    ("windows.xyz", "\ufeff0 0 0\r\n1 0 0\r\n0 1 0\r\n0 0 1\r\n"),
])
def test_text_point_clouds_in_every_layout(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    assert load_points(tmp_path / name).tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize("text,message", [
    ("1 2 3\n4 5\n", "invalid column index 2 at row .* with 2 columns"),
    ("1 2 3\n4 5 six\n", "could not convert string 'six'"),
    ("# only a comment\n\n", "expected lines of at least three numbers"),
])
def test_bad_text_lines_are_named(tmp_path, text, message):
    (tmp_path / "bad.xyz").write_text(text)
    with pytest.raises(InputError, match=message):
        load_points(tmp_path / "bad.xyz")


def test_npz_that_expands_beyond_the_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(pointclouds, "MAX_NPZ_BYTES", 100_000)
    np.savez_compressed(tmp_path / "bomb.npz", points=np.zeros((10_000, 3)))  # 240 KB expanded, 1 KB on disk
    with pytest.raises(InputError, match="bomb.npz: the .npz file expands to 0.0 GiB, more than the"):
        load_points(tmp_path / "bomb.npz")
    np.savez_compressed(tmp_path / "fine.npz", points=np.eye(3))
    assert load_points(tmp_path / "fine.npz").shape == (3, 3)


def test_a_folder_is_not_called_a_missing_file(tmp_path):
    (tmp_path / "scan.xyz").mkdir()
    with pytest.raises(InputError, match="scan.xyz: is a folder, not a file"):
        load_points(tmp_path / "scan.xyz")
    (tmp_path / "photo.png").mkdir()
    with pytest.raises(InputError, match="photo.png: is a folder, not a file"):
        load_image(tmp_path / "photo.png")


def test_ten_million_points_of_text_load_quickly_in_bounded_memory(tmp_path):
    """The old per-line reader took 102 s and 5.3 GB here; numpy's streaming parser needs seconds
    and about the size of the result (10M x 3 float64 = 240 MB, plus the float32 copy)."""
    path = tmp_path / "big.xyz"
    row = b"0.123456 -1.654321 2.000001\n1.5 2.5 3.5\n"
    with open(path, "wb") as f:
        for _ in range(50):
            f.write(row * 100_000)
    probe = ("import resource, time; from backend.inputs import load_points; t = time.perf_counter(); "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
             f"n = len(load_points({str(path)!r})); "
             "print(n, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    count, seconds, grown_kib = out.stdout.split()
    assert int(count) == 10_000_000, out.stderr
    assert int(grown_kib) < 700 * 1024, f"grew by {int(grown_kib) / 1024:.0f} MiB"
    assert float(seconds) < 60


# --- images --------------------------------------------------------------------------------------

def save_16bit_grey(path: Path, values: np.ndarray) -> None:
    Image.fromarray(np.round(values * 65535).astype(np.uint16)).save(path)


def test_16_bit_greyscale_png_keeps_its_values(tmp_path):
    values = gradient()
    save_16bit_grey(tmp_path / "g16.png", values)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgba = load_image(tmp_path / "g16.png")
    assert np.allclose(rgba[..., 0], values, atol=1e-4) and np.allclose(rgba[..., 2], values, atol=1e-4)
    assert (rgba[..., 3] == 1).all()


def image_in_mode(mode: str) -> Image.Image:
    rgb = (np.stack([gradient()] * 3, axis=2) * 255).round().astype(np.uint8)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba[:4, :4, 3] = 0  # a transparent corner: the mask must survive the conversion
    image = Image.fromarray(rgba)
    if mode == "P":
        return image.convert("RGB").quantize(256)
    if mode == "I32":
        return Image.fromarray((gradient() * 65535).round().astype(np.int32))
    if mode == "F":
        return Image.fromarray(gradient().astype(np.float32))
    return image.convert(mode)


@pytest.mark.parametrize("mode,suffix,has_mask,tolerance", [
    ("L", ".png", False, 1 / 255),
    ("LA", ".png", True, 1 / 255),
    ("P", ".png", False, 4 / 255),
    ("1", ".png", False, 1.0),     # bilevel: only the shape is checked
    ("CMYK", ".tif", False, 1 / 255),
    ("I32", ".tif", False, 1e-4),
    ("F", ".tif", False, 1e-6),
    ("RGBA", ".webp", True, 4 / 255),
])
def test_every_pixel_format_reads_as_rgba_in_0_1(tmp_path, mode, suffix, has_mask, tolerance):
    path = tmp_path / f"image{suffix}"
    save_kwargs = {"lossless": True} if suffix == ".webp" else {}
    image_in_mode(mode).save(path, **save_kwargs)
    rgba = load_image(path)
    assert rgba.shape == (24, 32, 4) and rgba.dtype == np.float32
    assert 0 <= rgba.min() and rgba.max() <= 1
    assert np.abs(rgba[4:, 4:, 0] - gradient()[4:, 4:]).max() <= tolerance
    assert (rgba[:4, :4, 3] == 0).all() == has_mask and (rgba[4:, 4:, 3] == 1).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red, right half blue as stored
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    rgba = load_image(tmp_path / "phone.png")
    assert rgba.shape == (20, 10, 4)
    assert (rgba[:10, :, 0] == 1).all() and (rgba[10:, :, 2] == 1).all()  # red on top, blue below


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (its data is that of a 1 x 1 image)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="bomb.png: refused as a possible decompression bomb"):
        load_image(png_with_size(tmp_path / "bomb.png", 20000, 20000))


def test_huge_non_jpeg_is_refused_before_decoding(tmp_path):
    with pytest.raises(InputError, match=r"huge.png: 10000x10000 pixels is more than the 89 megapixels"):
        load_image(png_with_size(tmp_path / "huge.png", 10000, 10000))


def test_huge_jpeg_is_decoded_reduced_in_bounded_memory(tmp_path):
    """A 64-megapixel photo: decoded at 1/4 scale and reduced to MAX_IMAGE_SIDE, it needs a
    fraction of the gigabyte a full decode to float RGBA took."""
    path = tmp_path / "photo.jpg"
    Image.new("L", (8000, 8000), 200).save(path, quality=50)
    probe = ("import json, resource, time; from backend.inputs import load_image; t = time.perf_counter(); "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
             f"rgba = load_image({str(path)!r}); "
             "print(json.dumps([rgba.shape, float(rgba[..., 0].mean()), time.perf_counter() - t, "
             "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    shape, mean, seconds, grown_kib = json.loads(out.stdout or "null") or pytest.fail(out.stderr)
    assert max(shape[:2]) <= MAX_IMAGE_SIDE and shape[2] == 4
    assert abs(mean - 200 / 255) < 0.01
    assert grown_kib < 250 * 1024, f"grew by {grown_kib / 1024:.0f} MiB"
    assert seconds < 30


@pytest.mark.parametrize("content,message", [
    (b"this is a text file, not a picture", "cannot read the image: it is not a PNG, JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot read the image"),
])
def test_a_file_that_is_not_an_image_is_named_as_such(tmp_path, content, message):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_image(tmp_path / "x.png")


def test_truncated_image_is_an_input_error(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.png: cannot read the image"):
        load_image(tmp_path / "t.png")
