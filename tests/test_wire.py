"""The wire format (backend/wire.py, vendored as blender_occnet/wire.py): round trips, limits,
malformed frames, resync, and property tests of the decoder on random and mutated frames."""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend import wire

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
    with pytest.raises(wire.ProtocolError, match="over the 17179869184-byte limit"):
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
        "import blender_occnet, blender_occnet.wire, blender_occnet.client, blender_occnet.filetypes\n"
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


def test_the_addon_carries_a_byte_identical_copy():
    """backend/wire.py is the source of truth; `python build_addon.py --sync-wire` refreshes the
    add-on's copy, which Blender imports without the backend."""
    source = (ROOT / "backend" / "wire.py").read_bytes()
    assert (ROOT / "blender_occnet" / "wire.py").read_bytes() == source, (
        "blender_occnet/wire.py differs from backend/wire.py: run python build_addon.py --sync-wire")


def test_backend_wire_imports_with_stdlib_and_numpy_only():
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import backend.wire\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    mods = set(json.loads(out.strip().splitlines()[-1]))
    third_party = {m for m in mods if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert third_party <= {"backend", "numpy", "cython_runtime"}, third_party


def test_deeply_nested_header_is_a_protocol_error_and_the_reader_continues():
    nested = b'{"type": "x", "a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    good = wire.frame_bytes({"type": "ping", "id": 4})
    reader = wire.FrameReader(io.BytesIO(_raw_frame(nested) + good))
    with pytest.raises(wire.ProtocolError, match="nests deeper than 32"):
        reader.read()
    assert reader.read()[0]["id"] == 4
    # real headers nest a few levels: well within the limit
    deep_ok = {"type": "x", "a": [[[[[[[[{"b": [[1]]}]]]]]]]]}
    assert wire.read_frame(io.BytesIO(wire.frame_bytes(deep_ok)))[0] == dict(deep_ok, v=1)


def test_oversized_body_is_refused_with_its_header_and_skipped_without_storing_it():
    """A request over the reader's limit gets an error that names its id (so the sender's request
    ends), and its body streams past in small reads while the reader hunts for the next frame."""
    import tracemalloc
    body = np.random.default_rng(0).integers(0, 256, 30 << 20, dtype=np.uint8)
    big = wire.frame_bytes({"type": "reconstruct", "id": 12}, {"points": body})
    good = wire.frame_bytes({"type": "ping", "id": 13})
    reader = wire.FrameReader(io.BytesIO(big + good), max_body_bytes=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(wire.ProtocolError, match="over the 1048576-byte limit") as ei:
            reader.read()
        assert ei.value.header["id"] == 12 and ei.value.resync
        assert reader.read()[0]["id"] == 13
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 1e6:.1f} MB while skipping a 30 MB body"


def test_empty_array_with_impossible_dimensions_is_a_protocol_error():
    header = json.dumps({"type": "x", "arrays": [
        {"name": "a", "dtype": "<f4", "shape": [0, 1 << 40, 1 << 40], "offset": 0}]}).encode()
    with pytest.raises(wire.ProtocolError, match="impossible dimensions"):
        wire.read_frame(io.BytesIO(_raw_frame(header)))


def test_body_size_matches_the_encoded_frame():
    arrays = {"a": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.uint8), "c": None}
    data = wire.frame_bytes({"type": "x"}, arrays)
    assert struct.unpack_from("<Q", data, 8)[0] == wire.body_size(arrays) == 64 + 8


# -- property tests: whatever arrives, the decoder ends in frames or clean protocol errors -------

CLEAN = (wire.ProtocolError, EOFError)


def drain(data, max_body_bytes=wire.MAX_BODY_BYTES):
    """Read a byte string to its end; returns the frames and the protocol errors, in order. Any
    other exception propagates (a test failure). Every read consumes input or ends the stream,
    so this terminates; the bound below proves it."""
    reader = wire.FrameReader(io.BytesIO(data), max_body_bytes=max_body_bytes)
    frames, errors = [], []
    for _ in range(len(data) + 2):
        try:
            frame = reader.read()
        except wire.ProtocolError as exc:
            errors.append(exc)
            continue
        except EOFError:
            return frames, errors
        if frame is None:
            return frames, errors
        frames.append(frame)
    raise AssertionError("the reader did not reach the end of a finite stream")


headers = st.fixed_dictionaries(
    {"type": st.sampled_from(wire.REQUEST_TYPES + wire.REPLY_TYPES), "id": st.integers(0, 2 ** 40)},
    optional={"stage": st.text(max_size=20), "fraction": st.floats(0, 1),
              "options": st.dictionaries(st.text(max_size=8), st.integers() | st.none(), max_size=4)})
array_lists = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.tuples(st.sampled_from(list(wire.DTYPES)), st.lists(st.integers(0, 5), max_size=3)).map(
        lambda t: np.zeros(t[1], dtype=wire.DTYPES[t[0]])),
    max_size=3)


@st.composite
def valid_frames(draw):
    return wire.frame_bytes(draw(headers), draw(array_lists))


@st.composite
def mutated_frames(draw):
    """Valid frames, then byte flips, truncation, insertions and lying length fields."""
    data = bytearray(b"".join(draw(st.lists(valid_frames(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "hlen", "blen"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32) | st.just(wire.MAGIC))
        elif op in ("hlen", "blen") and len(data) >= 16:
            start = data.find(wire.MAGIC, at)
            if start >= 0 and start + 16 <= len(data):
                if op == "hlen":
                    struct.pack_into("<I", data, start + 4, draw(st.integers(0, 2 ** 32 - 1)))
                else:
                    struct.pack_into("<Q", data, start + 8, draw(st.integers(0, 2 ** 64 - 1)))
    return bytes(data)


# no deadline: the machine may be busy; termination is proven by drain()'s bound instead
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=4096))
def test_random_bytes_give_only_clean_protocol_errors(data):
    frames, errors = drain(data)
    assert all(isinstance(e, wire.ProtocolError) for e in errors)


@fuzz
@given(st.lists(valid_frames(), min_size=1, max_size=4))
def test_valid_frames_decode_to_what_was_sent(frames):
    decoded, errors = drain(b"".join(frames))
    assert not errors and [wire.frame_bytes(h, a) for h, a in decoded] == frames


@fuzz
@given(mutated_frames())
def test_mutated_frames_give_only_clean_errors_in_bounded_memory(data):
    import tracemalloc
    tracemalloc.start()
    try:
        drain(data, max_body_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # lengths may claim up to 16 EiB; what is held stays near the size of what arrived
    assert peak < 2 * len(data) + (2 << 20), f"peak {peak} bytes for {len(data)} bytes of input"


@fuzz
@given(mutated_frames(), valid_frames())
def test_the_reader_resyncs_on_the_first_frame_after_garbage(garbage, good):
    """After any garbage that holds no MAGIC, the next frame is found and read intact."""
    reader_frames, _ = drain(garbage.replace(wire.MAGIC, b"XXXX") + good + good)
    assert wire.frame_bytes(*reader_frames[-1]) == good
