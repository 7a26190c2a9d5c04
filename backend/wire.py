"""Wire format between the Blender add-on and the backend server (``python -m backend serve``).

The source of truth is ``backend/wire.py``. The add-on carries a byte-identical copy,
``blender_occnet/wire.py``: the built zips always vendor this file, ``python build_addon.py
--sync-wire`` refreshes the copy in the source tree, and tests/test_wire.py fails while the two
differ. Blender's Python imports the copy, so this module uses the standard library and numpy only.

A frame on the pipe is::

    offset  size  field
    0       4     MAGIC  b"OCNF"
    4       4     header length H   (uint32, little-endian), 1..MAX_HEADER_BYTES
    8       8     body length B     (uint64, little-endian), at most the reader's body limit
    16      H     header: UTF-8 JSON object, nested at most MAX_HEADER_DEPTH deep
    16+H    B     body: raw little-endian array buffers, each starting on an 8-byte boundary

The header always has ``"type"`` (a message type, see below) and ``"v"`` (protocol version).
Requests carry an integer ``"id"`` that every reply about that request repeats; an id stays in use
until its request has been answered. Arrays travel in the body, never as JSON lists; the header
describes them in ``"arrays"``::

    "arrays": [{"name": "vertices", "dtype": "<f4", "shape": [V, 3], "offset": 0}, ...]

Requests (add-on -> backend); their bodies are at most MAX_REQUEST_BODY_BYTES
    reconstruct  {"id", "input": "points"|"image"|"none", "options": {...}}
                 arrays: "points" (N, 3) <f4 or <f8, optional "colors" (N, 3) <f4 in [0, 1] (the
                         mesh gets vertex colours) and "normals" (N, 3) <f4;
                         or "pixels" (H, W, 3|4) |u1 or <f4, row 0 = top, with an optional "mask" of
                         the object: (H, W) or a mask picture (H, W, 3|4), |u1, <f4 or bool,
                         of the picture's proportions (white or opaque = object);
                         "none": no arrays, the field fitted to one object (options.checkpoint)
                 options: checkpoint (path or null), resolution, threshold, max_faces, device,
                          normals (bool: also send vertex normals), refine (bool),
                          focal_length (images: 35 mm equivalent; null: the default lens),
                          colours (bool: vertex colours where the model, the points or the picture
                          have them), keep_stray (bool: points, keep those far from every other one)
    read_points  {"id", "path"}: read a point-cloud file with the backend's reader -> points
    read_image   {"id", "path"}: read a picture file with the backend's reader -> image
    cancel       {"id", "target": <id of the reconstruct or read request>}
    ping         {"id"}                       -> pong
    info         {"id"}                       -> info
    shutdown     {"id"}                       -> bye, then the server exits

Replies (backend -> add-on)
    hello        sent once at start-up: {"protocol", "backend_version", "pid"}
    progress     {"id", "stage", "fraction"}
    result       {"id", "stats"}; arrays "vertices" (V, 3) <f4 (point clouds: <f8, the input's
                 coordinates at full precision), "faces" (F, 3) <i4, optional "normals" (V, 3) <f4
                 and "colors" (V, 4) <f4 RGBA in [0, 1] (when the points had colours or the
                 model has a texture head, unless options.colours is false)
    points       {"id", "count"}; arrays "points" (N, 3) <f8, optional "colors" (N, 3) <f4 in
                 [0, 1] and "normals" (N, 3) <f4
    image        {"id", "focal_length": the 35 mm equivalent from the file's EXIF, or null};
                 array "pixels" (H, W, 4) <f4 RGBA in [0, 1], row 0 = top, upright
    error        {"id" (null when the frame could not be attributed, or when its id belongs to
                  another request still in flight), "code", "message"}
    pong         {"id", "protocol", "backend_version"}
    info         {"id", "protocol", "backend_version", "python", "torch", "device",
                  "loaded_models", "default_checkpoints"}
    bye          {"id"}

A reader never allocates more than the bytes that actually arrived (plus one read chunk), and a
frame it cannot read raises ProtocolError; after one whose lengths are unusable it skips ahead to
the next MAGIC, so one garbled frame does not end the conversation.
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
MAX_HEADER_DEPTH = 32  # real headers nest 4 deep; deeper JSON is garbage, not a request
MAX_BODY_BYTES = 1 << 34  # 16 GiB: replies (meshes); anything larger is a corrupted length
MAX_REQUEST_BODY_BYTES = 1 << 31  # 2 GiB: 50M points as float64 fit, with room to spare
MAX_ARRAY_DIMS = 8
MAX_ARRAY_ELEMENTS = 1 << 40
CHUNK_BYTES = 1 << 26  # 64 MiB: a body's buffer grows at most this far ahead of its bytes
RESYNC_CHUNK_BYTES = 1 << 16  # read size while hunting for the next MAGIC
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

REQUEST_TYPES = ("reconstruct", "read_points", "read_image", "cancel", "ping", "info", "shutdown")
REPLY_TYPES = ("hello", "progress", "result", "points", "image", "error", "pong", "info", "bye")

# Error codes the server sends (the backend's OccnetError codes pass through unchanged).
E_PROTOCOL = "protocol_error"  # a frame that could not be read
E_BAD_REQUEST = "bad_request"  # a readable frame whose content is wrong
E_DUPLICATE_ID = "duplicate_id"  # a request whose id belongs to a request still in flight
E_CANCELLED = "cancelled"
E_OOM = "out_of_memory"
E_INTERNAL = "internal_error"
# Error codes the client invents (the backend never sends these)
E_BACKEND_EXITED = "backend_exited"
E_BACKEND_START = "backend_start_failed"
E_TIMEOUT = "timeout"


class ProtocolError(Exception):
    """A frame that violates the wire format. ``resync`` says whether the stream position is lost
    (bad magic or unusable lengths) so that the reader must hunt for the next MAGIC; ``header`` is
    the frame's header when it could be read (to attribute the error to a request)."""

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


def body_size(arrays):
    """Bytes the arrays take in a frame body (with alignment padding), without encoding them."""
    return sum(_aligned(np.asarray(a).nbytes) for a in (arrays or {}).values() if a is not None)


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


def _readinto(stream, view):
    """Fill some of view from stream; the number of bytes, 0 at EOF."""
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto(view) or 0
    chunk = stream.read(len(view))
    if chunk:
        view[:len(chunk)] = chunk
    return len(chunk) if chunk else 0


def _read_some(stream, limit):
    """Up to limit bytes that are available now (at least one, blocking for it); b"" at EOF."""
    read1 = getattr(stream, "read1", None)
    return (read1 or stream.read)(limit) or b""


def _read_exact(stream, n):
    """Read exactly n bytes; returns a bytearray, or None on a clean EOF before any byte.
    Raises EOFError on EOF in the middle. The buffer starts at one chunk and at most doubles
    once its bytes have arrived, so a length that lies allocates little."""
    buf = bytearray(min(n, CHUNK_BYTES))
    got = 0
    while got < n:
        if got == len(buf):
            buf += bytes(min(n, 2 * len(buf)) - len(buf))
        with memoryview(buf) as whole, whole[got:] as rest:
            k = _readinto(stream, rest)
        if not k:
            if got == 0:
                return None
            raise EOFError(f"stream ended inside a frame ({got} of {n} bytes)")
        got += k
    return buf


def _array_problem(desc, body_len):
    """What is wrong with one entry of the header's 'arrays' list, or None."""
    if not isinstance(desc, dict):
        return "each entry of 'arrays' must be an object"
    name, key, shape, off = desc.get("name"), desc.get("dtype"), desc.get("shape"), desc.get("offset")
    if not isinstance(name, str) or not name:
        return "an array in the frame has no name"
    if key not in DTYPES:
        return f"array {name!r} has unsupported dtype {key!r}"
    if (not isinstance(shape, list) or len(shape) > MAX_ARRAY_DIMS
            or not all(_is_count(s) for s in shape)):
        return f"array {name!r} has an invalid shape {shape!r}"
    if not _is_count(off) or off % ALIGN:
        return f"array {name!r} has an invalid offset {off!r}"
    # an empty array may still claim dimensions whose product numpy cannot represent
    if _size([s for s in shape if s]) > MAX_ARRAY_ELEMENTS:
        return f"array {name!r} has impossible dimensions {shape!r}"
    nbytes = _size(shape) * DTYPES[key].itemsize
    if off + nbytes > body_len:
        return (f"array {name!r} ({nbytes} bytes at offset {off}) runs past the end of the "
                f"{body_len}-byte frame body")
    return None


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _size(shape):
    count = 1
    for s in shape:
        count *= s
    return count


def decode_arrays(header, body):
    """Turn the header's array descriptions plus the body into numpy arrays (views of body)."""
    descs = header.get("arrays", [])
    if not isinstance(descs, list):
        raise ProtocolError("'arrays' in the frame header must be a list", header=header)
    out = {}
    for d in descs:
        problem = _array_problem(d, len(body))
        if problem:
            raise ProtocolError(problem, header=header)
        dt = DTYPES[d["dtype"]]
        out[d["name"]] = np.frombuffer(body, dtype=dt, count=_size(d["shape"]),
                                       offset=d["offset"]).reshape(d["shape"])
    return out


def json_depth_exceeds(data, limit):
    """Whether JSON bytes nest arrays/objects deeper than limit. Brackets inside strings count
    too, which can only overestimate: real headers stay far below the limit either way. Checked
    before parsing, because the parser recurses once per level (200,000 levels: RecursionError,
    or on a thread with a small stack, a crash)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    steps = (np.isin(codes, _OPENERS).astype(np.int32) - np.isin(codes, _CLOSERS))
    return bool(len(steps)) and int(np.cumsum(steps).max()) > limit


_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSERS = np.frombuffer(b"]}", dtype=np.uint8)


def parse_header(hbytes):
    hbytes = bytes(hbytes)
    if json_depth_exceeds(hbytes, MAX_HEADER_DEPTH):
        raise ProtocolError(f"frame header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(hbytes.decode("utf-8"))
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
    rest of the conversation. Bodies over ``max_body_bytes`` are refused without being stored."""

    def __init__(self, stream, max_body_bytes=MAX_BODY_BYTES):
        self.stream = stream
        self.max_body_bytes = max_body_bytes
        self.resync = False
        self._pending = bytearray()  # bytes read ahead while hunting for MAGIC

    def _read_exact(self, n):
        if not self._pending:
            return _read_exact(self.stream, n)
        head = self._pending[:n]
        del self._pending[:n]
        if len(head) == n:
            return head
        rest = _read_exact(self.stream, n - len(head))
        if rest is None:
            raise EOFError("stream ended inside a frame")
        return head + rest

    def _skip_to_magic(self):
        """Drop bytes up to the next MAGIC (kept for the next frame); False at EOF."""
        window = bytes(self._pending)
        self._pending = bytearray()
        while True:
            at = window.find(MAGIC)
            if at >= 0:
                self._pending = bytearray(window[at:])
                return True
            tail = window[len(window) - len(MAGIC) + 1:]  # MAGIC may straddle two reads
            chunk = _read_some(self.stream, RESYNC_CHUNK_BYTES)
            if not chunk:
                return False
            window = tail + chunk

    def _lost(self, message, header=None):
        self.resync = True
        return ProtocolError(message, resync=True, header=header)

    def read(self):
        if self.resync:
            self.resync = False
            if not self._skip_to_magic():
                return None
        prefix = self._read_exact(PREFIX_SIZE)
        if prefix is None:
            return None
        magic, hlen, blen = _PREFIX.unpack(bytes(prefix))
        if magic != MAGIC:
            # keep what followed the bad magic: the next frame may start inside it
            self._pending[:0] = prefix[1:]
            raise self._lost(f"frame does not start with {MAGIC!r} (got {bytes(magic)!r})")
        if hlen == 0 or hlen > MAX_HEADER_BYTES:
            raise self._lost(f"frame header length {hlen} is outside 1..{MAX_HEADER_BYTES}")
        hbytes = self._read_exact(hlen)
        if hbytes is None:
            raise EOFError("stream ended inside a frame header")
        if blen > self.max_body_bytes:
            # the header is still worth reading: its id lets the sender's request end now
            raise self._lost(f"frame body of {blen} bytes is over the {self.max_body_bytes}-byte limit",
                             header=_header_or_none(hbytes))
        body = self._read_exact(blen) if blen else bytearray()
        if body is None:
            raise EOFError("stream ended inside a frame body")
        header = parse_header(hbytes)
        arrays = decode_arrays(header, body)
        return header, arrays


def _header_or_none(hbytes):
    try:
        return parse_header(hbytes)
    except ProtocolError:
        return None


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


RECONSTRUCT_OPTIONS = ("checkpoint", "resolution", "threshold", "max_faces", "device", "normals", "refine",
                       "focal_length", "colours", "keep_stray")


def options_dict(checkpoint=None, resolution=128, threshold=0.5, max_faces=None, device=None,
                 normals=False, refine=True, focal_length=None, colours=True, keep_stray=False):
    """Reconstruct options as they travel in the header (validated on the server by
    backend.pipeline.ReconstructOptions.from_wire). refine: for point clouds, pull the surface onto
    the input points and smooth it. focal_length: images, 35 mm equivalent, None for the default.
    colours: vertex colours in the result where there are any (points' colours, the picture's for
    viewer-centred image models, a texture head). keep_stray: point clouds, keep the points far from
    every other one (modelled vertices; a scan's stray points are left out)."""
    return {"checkpoint": checkpoint or None, "resolution": int(resolution),
            "threshold": float(threshold), "max_faces": int(max_faces) if max_faces else None,
            "device": device or None, "normals": bool(normals), "refine": bool(refine),
            "focal_length": float(focal_length) if focal_length else None, "colours": bool(colours),
            "keep_stray": bool(keep_stray)}


__all__ = [
    "PROTOCOL_VERSION", "MAGIC", "ProtocolError", "FrameReader", "encode_frame", "frame_bytes",
    "write_frame", "read_frame", "decode_arrays", "parse_header", "error_header", "options_dict",
    "set_binary_mode", "body_size",
]
