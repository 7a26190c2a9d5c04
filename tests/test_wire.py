"""The wire format (blender_occnet/wire.py): round trips, limits, malformed frames, resync."""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blender_occnet import wire

ROOT = Path(__file__).resolve().parents[1]


def roundtrip(header, arrays=None):
    data = wire.frame_bytes(header, arrays)
    return wire.read_frame(io.BytesIO(data)), data


def test_header_and_arrays_round_trip_bit_exact():
    rng = np.random.default_rng(0)
    verts = rng.normal(size=(1001, 3)).astype(np.float32)
    faces = rng.integers(0, 1001, size=(333, 3)).astype(np.int32)
    pix = rng.integers(0, 256, size=(7, 5, 4)).astype(np.uint8)  # odd size: padding needed
    (header, arrays), data = roundtrip({"type": "result", "id": 7, "stats": {"a": 1.5}},
                                       {"pixels": pix, "vertices": verts, "faces": faces})
    assert header["type"] == "result" and header["id"] == 7 and header["v"] == wire.PROTOCOL_VERSION
    assert header["stats"] == {"a": 1.5}
    assert set(arrays) == {"pixels", "vertices", "faces"}
    np.testing.assert_array_equal(arrays["vertices"], verts)
    np.testing.assert_array_equal(arrays["faces"], faces)
    np.testing.assert_array_equal(arrays["pixels"], pix)
    assert arrays["vertices"].dtype == np.dtype("<f4") and arrays["faces"].dtype == np.dtype("<i4")
    # arrays are raw buffers, not JSON lists: the header stays small
    hlen = struct.unpack_from("<I", data, 4)[0]
    assert hlen < 600
    for d in header["arrays"]:
        assert d["offset"] % 8 == 0


def test_big_endian_and_noncontiguous_input_is_normalised():
    a = np.arange(12, dtype=">f4").reshape(4, 3)[:, ::-1]
    (h, arrays), _ = roundtrip({"type": "x"}, {"a": a})
    assert h["arrays"][0]["dtype"] == "<f4"
    np.testing.assert_array_equal(arrays["a"], a.astype("<f4"))


def test_unsupported_dtype_rejected_with_clear_message():
    with pytest.raises(ValueError, match="cannot travel"):
        wire.frame_bytes({"type": "x"}, {"a": np.zeros(3, dtype=np.complex64)})
    with pytest.raises(ValueError, match="type"):
        wire.frame_bytes({"id": 1})


def test_empty_arrays_and_frames_without_arrays():
    (h, arrays), _ = roundtrip({"type": "ping", "id": 1})
    assert arrays == {} and "arrays" not in h
    (h, arrays), _ = roundtrip({"type": "x"}, {"e": np.zeros((0, 3), np.float32)})
    assert arrays["e"].shape == (0, 3)


def test_eof_and_truncated_frames():
    assert wire.read_frame(io.BytesIO(b"")) is None
    data = wire.frame_bytes({"type": "x"}, {"a": np.ones(100, np.float32)})
    with pytest.raises(EOFError):
        wire.read_frame(io.BytesIO(data[:-5]))
    with pytest.raises(EOFError):
        wire.read_frame(io.BytesIO(data[:10]))


def _raw_frame(hbytes, body=b"", magic=wire.MAGIC, blen=None):
    return struct.pack("<4sIQ", magic, len(hbytes), len(body) if blen is None else blen) + hbytes + body


@pytest.mark.parametrize("hbytes,match", [
    (b"\xff\xfe not utf8", "UTF-8 JSON"),
    (b"{not json", "JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"id": 3}', "no 'type'"),
    (b'{"type": "x", "v": 99}', "protocol version"),
    (b'{"type": "x", "arrays": [{"name": "a", "dtype": "<f4", "shape": [10], "offset": 0}]}',
     "runs past the end"),
    (b'{"type": "x", "arrays": [{"name": "a", "dtype": "object", "shape": [1], "offset": 0}]}',
     "unsupported dtype"),
    (b'{"type": "x", "arrays": [{"name": "a", "dtype": "<f4", "shape": [-1], "offset": 0}]}',
     "invalid shape"),
    (b'{"type": "x", "arrays": [{"name": "a", "dtype": "<f4", "shape": [1], "offset": 3}]}',
     "invalid offset"),
    (b'{"type": "x", "arrays": 5}', "must be a list"),
])
def test_malformed_frames_raise_protocol_error_and_reader_continues(hbytes, match):
    good = wire.frame_bytes({"type": "ping", "id": 2})
    stream = io.BytesIO(_raw_frame(hbytes) + good)
    reader = wire.FrameReader(stream)
    with pytest.raises(wire.ProtocolError, match=match) as ei:
        reader.read()
    assert not ei.value.resync
    header, _ = reader.read()
    assert header == {"type": "ping", "id": 2, "v": 1}
    assert reader.read() is None


def test_bad_magic_resyncs_on_next_frame():
    good = wire.frame_bytes({"type": "ping", "id": 5})
    stream = io.BytesIO(b"garbage bytes that are not a frame at all!" + good)
    reader = wire.FrameReader(stream)
    with pytest.raises(wire.ProtocolError, match="does not start with") as ei:
        reader.read()
    assert ei.value.resync
    header, _ = reader.read()
    assert header["id"] == 5
    assert reader.read() is None


def test_impossible_lengths_resync():
    good = wire.frame_bytes({"type": "ping", "id": 9})
    bad = struct.pack("<4sIQ", wire.MAGIC, wire.MAX_HEADER_BYTES + 1, 0)
    reader = wire.FrameReader(io.BytesIO(bad + good))
    with pytest.raises(wire.ProtocolError, match="header length"):
        reader.read()
    assert reader.read()[0]["id"] == 9
    bad = struct.pack("<4sIQ", wire.MAGIC, 2, wire.MAX_BODY_BYTES + 1) + b"{}"
    reader = wire.FrameReader(io.BytesIO(bad + good))
    with pytest.raises(wire.ProtocolError, match="body length"):
        reader.read()
    assert reader.read()[0]["id"] == 9


def test_nan_in_header_refused():
    with pytest.raises(ValueError):
        wire.frame_bytes({"type": "x", "f": float("nan")})


def test_wire_imports_with_stdlib_and_numpy_only():
    """The add-on side must import in Blender's Python: no torch, no bpy, no third-party modules
    beyond numpy, and the package itself must not pull bpy at import time."""
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import blender_occnet, blender_occnet.wire, blender_occnet.client, blender_occnet.pointio\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(json.dumps(sorted(new)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    mods = set(json.loads(out.strip().splitlines()[-1]))
    stdlib = set(sys.stdlib_module_names)
    third_party = {m for m in mods if m not in stdlib and not m.startswith("_")}
    assert third_party <= {"blender_occnet", "numpy", "cython_runtime"}, third_party
    assert "bpy" not in mods and "torch" not in mods


def test_huge_announced_body_does_not_allocate_up_front():
    import tracemalloc
    data = struct.pack("<4sIQ", wire.MAGIC, 13, 8 << 30) + b'{"type": "x"}' + b"\0" * 1000
    tracemalloc.start()
    try:
        with pytest.raises(EOFError):
            wire.read_frame(io.BytesIO(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, f"peak {peak / 1e6:.0f} MB for an 8 GiB announcement"


def test_large_frame_round_trip_across_chunks(monkeypatch):
    monkeypatch.setattr(wire, "CHUNK_BYTES", 1000)
    a = np.arange(10_000, dtype=np.int32).reshape(-1, 4)
    (h, arrays), _ = roundtrip({"type": "x"}, {"a": a})
    np.testing.assert_array_equal(arrays["a"], a)
