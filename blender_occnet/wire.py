"""Wire format between the Blender add-on and the backend server (``python -m backend serve``).

This module is the single source of truth for both sides. It must stay importable by Blender's
Python, so it uses the standard library and numpy only.

A frame on the pipe is::

    offset  size  field
    0       4     MAGIC  b"OCNF"
    4       4     header length H   (uint32, little-endian)
    8       8     body length B     (uint64, little-endian)
    16      H     header: UTF-8 JSON object
    16+H    B     body: raw little-endian array buffers, each starting on an 8-byte boundary

The header always has ``"type"`` (a message type, see below) and ``"v"`` (protocol version).
Requests carry an integer ``"id"`` that every reply about that request repeats. Arrays travel in the
body, never as JSON lists; the header describes them in ``"arrays"``::

    "arrays": [{"name": "vertices", "dtype": "<f4", "shape": [V, 3], "offset": 0}, ...]

Requests (add-on -> backend)
    reconstruct  {"id", "input": "points"|"image", "options": {...}}
                 arrays: "points" (N, 3) <f4  or  "pixels" (H, W, 3|4) |u1 or <f4, row 0 = top
                 options: checkpoint (path or null), resolution, threshold, max_faces, device,
                          normals (bool: also send vertex normals)
    cancel       {"id", "target": <id of the reconstruct request>}
    ping         {"id"}                       -> pong
    info         {"id"}                       -> info
    shutdown     {"id"}                       -> bye, then the server exits

Replies (backend -> add-on)
    hello        sent once at start-up: {"protocol", "backend_version", "pid"}
    progress     {"id", "stage", "fraction"}
    result       {"id", "stats"}; arrays "vertices" (V, 3) <f4, "faces" (F, 3) <i4,
                 optional "normals" (V, 3) <f4 and "colors" (V, 4) <f4
    error        {"id" (null when the frame could not be attributed), "code", "message"}
    pong         {"id", "protocol", "backend_version"}
    info         {"id", "protocol", "backend_version", "python", "torch", "device",
                  "loaded_models", "default_checkpoints"}
    bye          {"id"}
"""

import json
import struct
import sys

import numpy as np

PROTOCOL_VERSION = 1
MAGIC = b"OCNF"
_PREFIX = struct.Struct("<4sIQ")
PREFIX_SIZE = _PREFIX.size  # 16
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON is far more than any real header needs
MAX_BODY_BYTES = 1 << 34  # 16 GiB: anything larger is a corrupted length, not a mesh
ALIGN = 8

# dtypes allowed on the wire (explicit little-endian)
DTYPES = {
    "<f4": np.dtype("<f4"),
    "<f8": np.dtype("<f8"),
    "<i4": np.dtype("<i4"),
    "<i8": np.dtype("<i8"),
    "<u4": np.dtype("<u4"),
    "|u1": np.dtype("u1"),
}

REQUEST_TYPES = ("reconstruct", "cancel", "ping", "info", "shutdown")
REPLY_TYPES = ("hello", "progress", "result", "error", "pong", "info", "bye")

# Error codes the server sends (the backend's OccnetError codes pass through unchanged).
E_PROTOCOL = "protocol_error"  # a frame that could not be read
E_BAD_REQUEST = "bad_request"  # a readable frame whose content is wrong
E_CANCELLED = "cancelled"
E_OOM = "out_of_memory"
E_INTERNAL = "internal_error"
# Error codes the client invents (the backend never sends these)
E_BACKEND_EXITED = "backend_exited"
E_BACKEND_START = "backend_start_failed"
E_TIMEOUT = "timeout"


class ProtocolError(Exception):
    """A frame that violates the wire format. ``resync`` says whether the stream position is lost
    (bad magic or impossible lengths) so that the reader must hunt for the next MAGIC."""

    def __init__(self, message, resync=False, header=None):
        super().__init__(message)
        self.message = message
        self.resync = resync
        self.header = header


def _aligned(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _wire_dtype(arr):
    dt = arr.dtype
    if dt.kind == "b":
        raise ValueError("boolean arrays are not sent on the wire; cast to |u1")
    key = "|u1" if dt.itemsize == 1 and dt.kind == "u" else "<" + dt.kind + str(dt.itemsize)
    if key not in DTYPES:
        raise ValueError(f"dtype {dt} cannot travel on the wire (allowed: {', '.join(DTYPES)})")
    return key


def encode_frame(header, arrays=None):
    """Return the frame as a list of buffers (prefix+header, then array buffers and padding),
    ready for ``writelines``; the arrays are not copied when already little-endian and contiguous."""
    if "type" not in header:
        raise ValueError("a frame header needs a 'type'")
    header = dict(header)
    header.setdefault("v", PROTOCOL_VERSION)
    parts = []
    descs = []
    offset = 0
    for name, arr in (arrays or {}).items():
        if arr is None:
            continue
        arr = np.asarray(arr)
        key = _wire_dtype(arr)
        arr = np.ascontiguousarray(arr, dtype=DTYPES[key])
        descs.append({"name": name, "dtype": key, "shape": list(arr.shape), "offset": offset})
        nbytes = arr.nbytes
        if nbytes:
            parts.append(memoryview(arr).cast("B"))
        pad = _aligned(nbytes) - nbytes
        if pad:
            parts.append(b"\0" * pad)
        offset += nbytes + pad
    if descs:
        header["arrays"] = descs
    else:
        header.pop("arrays", None)
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(hbytes) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header is {len(hbytes)} bytes, over the {MAX_HEADER_BYTES} limit")
    return [_PREFIX.pack(MAGIC, len(hbytes), offset) + hbytes] + parts


def frame_bytes(header, arrays=None):
    """The whole frame as one bytes object (tests, small messages)."""
    return b"".join(bytes(p) for p in encode_frame(header, arrays))


def write_frame(stream, header, arrays=None):
    """Write one frame to a binary stream and flush it. Callers that share the stream between
    threads must hold a lock around this call."""
    parts = encode_frame(header, arrays)
    for p in parts:
        stream.write(p)
    stream.flush()


CHUNK_BYTES = 1 << 26  # 64 MiB: memory for a body grows only as its bytes actually arrive


def _read_exact(stream, n):
    """Read exactly n bytes; returns a bytearray, or None on a clean EOF before any byte.
    Raises EOFError on EOF in the middle."""
    if n > CHUNK_BYTES:
        # a corrupted length must not allocate gigabytes up front
        parts = []
        got = 0
        while got < n:
            part = _read_exact(stream, min(CHUNK_BYTES, n - got))
            if part is None:
                if got == 0:
                    return None
                raise EOFError(f"stream ended inside a frame ({got} of {n} bytes)")
            parts.append(part)
            got += len(part)
        return bytearray().join(parts)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    readinto = getattr(stream, "readinto", None)
    while got < n:
        if readinto is not None:
            k = readinto(view[got:])
        else:
            chunk = stream.read(n - got)
            k = len(chunk) if chunk else 0
            if k:
                view[got:got + k] = chunk
        if not k:
            if got == 0:
                return None
            raise EOFError(f"stream ended inside a frame ({got} of {n} bytes)")
        got += k
    return buf


def decode_arrays(header, body):
    """Turn the header's array descriptions plus the body into numpy arrays (views of body)."""
    descs = header.get("arrays", [])
    if not isinstance(descs, list):
        raise ProtocolError("'arrays' in the frame header must be a list", header=header)
    out = {}
    for d in descs:
        if not isinstance(d, dict):
            raise ProtocolError("each entry of 'arrays' must be an object", header=header)
        name, key, shape, off = d.get("name"), d.get("dtype"), d.get("shape"), d.get("offset")
        if not isinstance(name, str) or not name:
            raise ProtocolError("an array in the frame has no name", header=header)
        if key not in DTYPES:
            raise ProtocolError(f"array {name!r} has unsupported dtype {key!r}", header=header)
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ProtocolError(f"array {name!r} has an invalid shape {shape!r}", header=header)
        if not isinstance(off, int) or isinstance(off, bool) or off < 0 or off % ALIGN:
            raise ProtocolError(f"array {name!r} has an invalid offset {off!r}", header=header)
        dt = DTYPES[key]
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dt.itemsize
        if off + nbytes > len(body):
            raise ProtocolError(
                f"array {name!r} ({nbytes} bytes at offset {off}) runs past the end of the "
                f"{len(body)}-byte frame body", header=header)
        out[name] = np.frombuffer(body, dtype=dt, count=count, offset=off).reshape(shape)
    return out


def parse_header(hbytes):
    try:
        header = json.loads(bytes(hbytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    if not isinstance(header.get("type"), str):
        raise ProtocolError("frame header has no 'type'", header=header)
    v = header.get("v", PROTOCOL_VERSION)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {v!r} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "the add-on and the backend come from different releases", header=header)
    return header


class FrameReader:
    """Reads frames from a binary stream (a pipe). ``read()`` returns ``(header, arrays)``, or
    None at EOF; a bad frame raises ProtocolError and, when the stream position was lost, the
    next ``read()`` first skips to the next MAGIC so that one garbled frame does not poison the
    rest of the conversation."""

    def __init__(self, stream):
        self.stream = stream
        self._resync = False
        self._pending = b""  # bytes read while resyncing that belong to the next frame

    def _read_exact(self, n):
        if self._pending:
            head = self._pending[:n]
            self._pending = self._pending[n:]
            if len(head) == n:
                return bytearray(head)
            rest = _read_exact(self.stream, n - len(head))
            if rest is None:
                raise EOFError("stream ended inside a frame")
            return bytearray(head) + rest
        return _read_exact(self.stream, n)

    def _skip_to_magic(self):
        window = b""
        while True:
            b = self._read_exact(1)
            if b is None:
                return False
            window = (window + bytes(b))[-len(MAGIC):]
            if window == MAGIC:
                self._pending = MAGIC + self._pending
                return True

    def read(self):
        if self._resync:
            self._resync = False
            if not self._skip_to_magic():
                return None
        prefix = self._read_exact(PREFIX_SIZE)
        if prefix is None:
            return None
        magic, hlen, blen = _PREFIX.unpack(bytes(prefix))
        if magic != MAGIC:
            # keep what followed the bad magic: the next frame may start inside it
            self._pending = bytes(prefix[1:]) + self._pending
            self._resync = True
            raise ProtocolError(f"frame does not start with {MAGIC!r} (got {bytes(magic)!r})",
                                resync=True)
        if hlen == 0 or hlen > MAX_HEADER_BYTES:
            self._resync = True
            raise ProtocolError(f"frame header length {hlen} is outside 1..{MAX_HEADER_BYTES}",
                                resync=True)
        if blen > MAX_BODY_BYTES:
            self._resync = True
            raise ProtocolError(f"frame body length {blen} is over the {MAX_BODY_BYTES} limit",
                                resync=True)
        hbytes = self._read_exact(hlen)
        if hbytes is None:
            raise EOFError("stream ended inside a frame header")
        body = self._read_exact(blen) if blen else bytearray()
        if body is None:
            raise EOFError("stream ended inside a frame body")
        header = parse_header(hbytes)
        arrays = decode_arrays(header, body)
        return header, arrays


def read_frame(stream):
    """One frame from a stream (no resync state kept); None at EOF."""
    return FrameReader(stream).read()


def set_binary_mode(fileobj):
    """Windows pipes default to text mode at the C level; make them binary."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt
        import os
        msvcrt.setmode(fileobj.fileno(), os.O_BINARY)


def error_header(req_id, code, message):
    return {"type": "error", "id": req_id, "code": code, "message": message}


RECONSTRUCT_OPTIONS = ("checkpoint", "resolution", "threshold", "max_faces", "device", "normals", "refine")


def options_dict(checkpoint=None, resolution=128, threshold=0.5, max_faces=None, device=None,
                 normals=False, refine=True):
    """Reconstruct options as they travel in the header (validated on the server).
    refine: for point clouds, pull the surface onto the input points and smooth it."""
    return {"checkpoint": checkpoint or None, "resolution": int(resolution),
            "threshold": float(threshold), "max_faces": int(max_faces) if max_faces else None,
            "device": device or None, "normals": bool(normals), "refine": bool(refine)}


__all__ = [
    "PROTOCOL_VERSION", "MAGIC", "ProtocolError", "FrameReader", "encode_frame", "frame_bytes",
    "write_frame", "read_frame", "decode_arrays", "parse_header", "error_header", "options_dict",
    "set_binary_mode",
]
