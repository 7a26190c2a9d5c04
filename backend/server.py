"""The pipe server that the Blender add-on runs as a child process: ``python -m backend serve``.

It speaks the frames of ``backend.wire`` on stdin/stdout and nothing else:

* stdout is reserved for frames. At start-up the real stdout file descriptor is duplicated for the
  frame writer and fd 1 (and ``sys.stdout``) are pointed at stderr, so a stray ``print``, a tqdm
  bar or a C library writing to fd 1 can never corrupt the stream.
* A reader thread reads request frames, so a ``cancel`` arrives while a reconstruction runs in the
  worker thread; the reconstruction checks ``should_cancel`` between batches.
* Models stay loaded between requests (one ``Reconstructor`` for the life of the process).
* When stdin closes (Blender quit or crashed) the server cancels the running work and exits; a
  watchdog hard-exits the process if the work does not stop within a couple of seconds, so no
  orphan outlives Blender.
* A malformed frame gets an ``error`` reply and the server carries on with the next frame; so does
  a request whose id is still in flight, and one whose body is over the request size limit.
* Every progress report is also a cancellation point, so a cancel lands between pipeline stages
  even where a stage does not check ``should_cancel`` itself.
"""

import argparse
import logging
import os
import platform
import queue
import sys
import threading
import time
import traceback

import numpy as np

from . import wire
from .errors import OccnetError

log = logging.getLogger("occnet.server")

EXIT_GRACE_S = 2.0  # after stdin closes or shutdown, how long the work may take to stop
PROGRESS_MIN_INTERVAL_S = 0.05
MAX_POINTS = 50_000_000


class FrameWriter:
    """Serialises frame writes from several threads onto the binary frame stream."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.broken = False

    def send(self, header, arrays=None):
        with self.lock:
            if self.broken:
                return False
            try:
                wire.write_frame(self.stream, header, arrays)
                return True
            except (BrokenPipeError, OSError, ValueError) as exc:
                # the add-on went away; the reader will see EOF and we will exit
                self.broken = True
                log.warning("cannot write to the add-on any more: %s", exc)
                return False


def redirect_stdout_to_stderr():
    """Return a binary stream on a duplicate of the original stdout and make fd 1 / sys.stdout
    point at stderr from now on."""
    sys.stdout.flush()
    frame_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = os.fdopen(frame_fd, "wb", buffering=1 << 20)
    wire.set_binary_mode(out)
    return out


class Job:
    """A reconstruct request from the moment it is queued until its reply is sent."""

    def __init__(self, req_id, header, arrays):
        self.id = req_id
        self.header = header
        self.arrays = arrays
        self.cancel = threading.Event()


class Server:
    def __init__(self, instream, outstream, device="auto", reconstructor_factory=None):
        self.reader = wire.FrameReader(instream, max_body_bytes=wire.MAX_REQUEST_BODY_BYTES)
        self.out = FrameWriter(outstream)
        self.default_device = device
        self._factory = reconstructor_factory
        self._reconstructor = None
        self._recon_lock = threading.Lock()
        self.jobs = queue.Queue()
        self.in_flight = {}  # id -> Job, queued or running, until its reply is sent
        self.state_lock = threading.Lock()
        self.stopping = threading.Event()
        self.warm_done = threading.Event()
        self.warm_done.set()  # set again by main() when a warm-up thread runs
        self._import_error = None

    # -- the reconstructor is created lazily (importing torch takes a while) -------------------
    def reconstructor(self):
        with self._recon_lock:
            if self._reconstructor is None:
                if self._factory is not None:
                    self._reconstructor = self._factory(self.default_device)
                else:
                    from backend.pipeline import Reconstructor
                    self._reconstructor = Reconstructor(device=self.default_device)
            return self._reconstructor

    def warm_up(self, preload=()):
        """Import torch and the pipeline, and load the models named in ``preload`` ("points",
        "image", or "kind:path"), while the add-on prepares its first request."""
        try:
            try:
                r = self.reconstructor()
            except BaseException as exc:  # reported when a request needs it
                self._import_error = exc
                log.error("backend start-up failed:\n%s", traceback.format_exc())
                return
            from backend.pipeline import ReconstructOptions
            for item in preload:
                kind, _, path = item.partition(":")
                if kind not in ("points", "image"):
                    log.warning("--preload %r: the kind must be 'points' or 'image'", item)
                    continue
                try:
                    t0 = time.perf_counter()
                    r.model_for(kind, ReconstructOptions(checkpoint=path or None))
                    log.info("preloaded the %s model %s in %.2f s", kind, path or "(default)",
                             time.perf_counter() - t0)
                except Exception as exc:  # the request that needs it reports the problem
                    log.info("could not preload the %s model %s: %s", kind, path or "(default)", exc)
        finally:
            self.warm_done.set()

    # -- replies ------------------------------------------------------------------------------
    def send_error(self, req_id, code, message):
        log.info("error for request %s: [%s] %s", req_id, code, message)
        self.out.send(wire.error_header(req_id, code, message))

    def answer(self, job, header, arrays=None):
        """Send a job's last reply. Its id is free from then on: the add-on may reuse it as soon
        as it reads the reply, so it leaves in_flight first."""
        with self.state_lock:
            self.in_flight.pop(job.id, None)
        self.out.send(header, arrays)

    def answer_error(self, job, code, message):
        log.info("error for request %s: [%s] %s", job.id, code, message)
        self.answer(job, wire.error_header(job.id, code, message))

    def versions(self):
        from backend import __version__
        return {"protocol": wire.PROTOCOL_VERSION, "backend_version": __version__}

    # -- reader side --------------------------------------------------------------------------
    def read_loop(self):
        """Runs in the reader thread: dispatch control messages at once, queue the work."""
        try:
            while not self.stopping.is_set():
                try:
                    frame = self.reader.read()
                except wire.ProtocolError as exc:
                    req_id = exc.header.get("id") if isinstance(exc.header, dict) else None
                    self.send_error(self.reply_id(req_id), wire.E_PROTOCOL,
                                    f"malformed frame: {exc.message}")
                    continue
                except MemoryError:
                    self.reader.resync = True
                    self.send_error(None, wire.E_PROTOCOL,
                                    "malformed frame: not enough memory for the frame it announced")
                    continue
                except EOFError as exc:
                    log.info("stdin ended mid-frame (%s)", exc)
                    break
                except OSError as exc:
                    log.info("stdin failed (%s)", exc)
                    break
                except Exception as exc:  # a decoder bug must not end the conversation
                    log.error("reading a frame failed:\n%s", traceback.format_exc())
                    self.reader.resync = True
                    self.send_error(None, wire.E_PROTOCOL, f"unreadable frame: {type(exc).__name__}: {exc}")
                    continue
                if frame is None:
                    break
                try:
                    self.dispatch(*frame)
                except Exception as exc:  # never let one request kill the reader
                    log.error("dispatch failed:\n%s", traceback.format_exc())
                    self.send_error(self.reply_id(frame[0].get("id")),
                                    wire.E_INTERNAL, f"the backend failed to handle the request: {exc}")
        finally:
            self.begin_stop("stdin closed")

    def dispatch(self, header, arrays):
        mtype = header["type"]
        req_id = header.get("id")
        if not _is_id(req_id):
            self.send_error(None, wire.E_BAD_REQUEST,
                            f"{mtype!r} request has no integer 'id' (got {req_id!r})")
            return
        if self.reply_id(req_id) is None:
            # replying with this id would end the other request at the add-on
            self.send_error(None, wire.E_DUPLICATE_ID,
                            f"{mtype!r} request reuses id {req_id}, which belongs to a request still "
                            "in flight; ids must be unique until their request is answered")
            return
        if mtype == "ping":
            self.out.send({"type": "pong", "id": req_id, **self.versions()})
        elif mtype == "info":
            self.send_info(req_id)
        elif mtype == "cancel":
            target = header.get("target")
            if not _is_id(target):
                self.send_error(req_id, wire.E_BAD_REQUEST, "cancel needs the integer 'target' id")
                return
            with self.state_lock:
                job = self.in_flight.get(target)
            if job is not None:
                job.cancel.set()
            else:  # already answered: the cancel crossed the reply
                log.info("cancel %s: request %s is not in flight", req_id, target)
        elif mtype == "shutdown":
            self.out.send({"type": "bye", "id": req_id})
            self.begin_stop("shutdown requested")
        elif mtype in ("reconstruct", "read_points", "read_image"):
            problem = validate_reconstruct(header, arrays) if mtype == "reconstruct" else validate_read(header)
            if problem:
                self.send_error(req_id, wire.E_BAD_REQUEST, problem)
                return
            job = Job(req_id, header, arrays)
            with self.state_lock:
                self.in_flight[req_id] = job
            self.jobs.put(job)
        else:
            self.send_error(req_id, wire.E_BAD_REQUEST,
                            f"unknown request type {mtype!r}; expected one of {', '.join(wire.REQUEST_TYPES)}")

    def reply_id(self, req_id):
        """The id to put on a reply about a frame that claimed req_id: None when it is not an
        integer, or when it belongs to a request in flight (its reply would end that request)."""
        if not _is_id(req_id):
            return None
        with self.state_lock:
            return None if req_id in self.in_flight else req_id

    def send_info(self, req_id):
        import backend
        info = {"type": "info", "id": req_id, **self.versions(),
                "python": platform.python_version(), "python_executable": sys.executable,
                "pid": os.getpid(), "backend_path": os.path.dirname(os.path.abspath(backend.__file__))}
        try:
            r = self.reconstructor()
            info.update({k: v for k, v in r.info().items() if k not in ("type", "id")})
            torch = sys.modules.get("torch")
            if torch is not None:
                info.setdefault("torch_threads", torch.get_num_threads())
            info.setdefault("omp_wait_policy", os.environ.get("OMP_WAIT_POLICY"))
            info.setdefault("omp_spin_count", os.environ.get("GOMP_SPINCOUNT"))
        except BaseException as exc:
            self.send_error(req_id, wire.E_INTERNAL, f"the backend cannot start its models: {exc}")
            return
        self.out.send(_jsonable(info))

    def begin_stop(self, why):
        if self.stopping.is_set():
            return
        log.info("stopping: %s", why)
        self.stopping.set()
        with self.state_lock:
            for job in self.in_flight.values():
                job.cancel.set()
        self.jobs.put(None)
        # the watchdog: torch may be inside a long kernel; do not outlive the add-on
        t = threading.Timer(EXIT_GRACE_S, _hard_exit)
        t.daemon = True
        t.start()

    # -- worker side --------------------------------------------------------------------------
    def work_loop(self):
        while True:
            job = self.jobs.get()
            if job is None or self.stopping.is_set():
                if job is not None:
                    self.answer_error(job, wire.E_CANCELLED, "the backend is shutting down")
                return
            self.run_job(job)

    def run_job(self, job):
        from backend.errors import Cancelled, OccnetError  # light import, no torch

        last = [0.0, None]

        def progress(stage, fraction):
            if job.cancel.is_set():
                raise Cancelled()
            now = time.monotonic()
            if stage != last[1] or now - last[0] >= PROGRESS_MIN_INTERVAL_S or fraction >= 1.0:
                last[0], last[1] = now, stage
                self.out.send({"type": "progress", "id": job.id, "stage": str(stage),
                               "fraction": float(min(max(fraction, 0.0), 1.0))})

        def should_cancel():
            return job.cancel.is_set()

        if job.cancel.is_set():
            self.answer_error(job, wire.E_CANCELLED, "the reconstruction was cancelled")
            return
        h = job.header
        try:
            progress("starting", 0.0)
            if h["type"] in ("read_points", "read_image"):  # needs no model: no waiting for the warm-up
                self.answer_read(job)
                return
            # let the warm-up finish loading models (no double loads, no racing on the cache)
            while not self.warm_done.wait(0.05):
                if job.cancel.is_set():
                    raise Cancelled()
            if self._import_error is not None and self._reconstructor is None:
                raise self._import_error
            r = self.reconstructor()
            opts = reconstruct_options(h.get("options") or {})
            t0 = time.perf_counter()
            if h["input"] == "points":
                res = r.reconstruct_points(job.arrays["points"], opts, progress=progress,
                                           should_cancel=should_cancel, colors=job.arrays.get("colors"),
                                           normals=job.arrays.get("normals"))
            elif h["input"] == "image":
                res = r.reconstruct_image(job.arrays["pixels"], opts, progress=progress,
                                          should_cancel=should_cancel, mask=job.arrays.get("mask"))
            else:
                res = r.reconstruct_field(None, opts, progress=progress, should_cancel=should_cancel)
            if job.cancel.is_set():
                raise Cancelled()
            stats = dict(res.stats or {})
            stats.setdefault("server_seconds", time.perf_counter() - t0)
            # point clouds: float64 vertices, so survey coordinates keep their millimetres
            arrays = {"vertices": np.asarray(res.vertices, dtype=np.float64 if h["input"] == "points" else np.float32),
                      "faces": np.asarray(res.faces, dtype=np.int32)}
            if res.normals is not None:
                arrays["normals"] = np.asarray(res.normals, dtype=np.float32)
            if res.colors is not None:
                arrays["colors"] = np.asarray(res.colors, dtype=np.float32)
            stats.setdefault("vertices", int(arrays["vertices"].shape[0]))
            stats.setdefault("faces", int(arrays["faces"].shape[0]))
            self.answer(job, {"type": "result", "id": job.id, "stats": _jsonable(stats)}, arrays)
        except Cancelled:
            self.answer_error(job, wire.E_CANCELLED, "the reconstruction was cancelled")
        except OccnetError as exc:
            self.answer_error(job, exc.code, exc.message)
        except MemoryError:
            self.answer_error(job, wire.E_OOM,
                            "the backend ran out of memory; try a lower resolution or the CPU device")
        except BaseException as exc:
            if _is_oom(exc):
                self.answer_error(job, wire.E_OOM,
                                f"the device ran out of memory ({_first_line(exc)}); "
                                "try a lower resolution or the CPU device")
            else:
                log.error("reconstruction %s failed:\n%s", job.id, traceback.format_exc())
                self.answer_error(job, wire.E_INTERNAL,
                                f"the reconstruction failed: {type(exc).__name__}: {_first_line(exc)}")
            if not isinstance(exc, Exception):
                raise


    def answer_read(self, job):
        """Read the file a read_points or read_image request names with the backend's one reader
        (backend.pointclouds, backend.inputs) and send what it holds."""
        from backend.errors import Cancelled
        from backend.inputs import exif_focal_35mm, load_image
        from backend.pointclouds import load_point_cloud

        path = job.header["path"]
        if job.header["type"] == "read_image":
            pixels = load_image(path)
            reply = {"type": "image", "id": job.id, "focal_length": exif_focal_35mm(path)}
            arrays = {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)}
        else:
            cloud = load_point_cloud(path)
            reply = {"type": "points", "id": job.id, "count": len(cloud.points)}
            arrays = {"points": cloud.points, "colors": cloud.colors, "normals": cloud.normals}
        if job.cancel.is_set():
            raise Cancelled()
        self.answer(job, reply, arrays)


def _first_line(exc):
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


def _is_oom(exc):
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _is_id(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _jsonable(obj):
    """Stats from the pipeline may hold numpy scalars; make them plain JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def validate_reconstruct(header, arrays):
    """Return a message naming what is wrong with a reconstruct request, or None."""
    kind = header.get("input")
    if kind not in ("points", "image", "none"):
        return f"reconstruct needs 'input' = 'points', 'image' or 'none' (got {kind!r})"
    from backend.pipeline import ReconstructOptions

    try:
        ReconstructOptions.from_wire(header.get("options"))
    except OccnetError as error:
        return str(error)
    if kind == "points":
        pts = arrays.get("points")
        if pts is None:
            return "a points reconstruction needs a 'points' array"
        if pts.ndim != 2 or pts.shape[1] != 3:
            return f"'points' must have shape (N, 3), got {tuple(pts.shape)}"
        if pts.shape[0] == 0:
            return "the point cloud is empty"
        if pts.shape[0] > MAX_POINTS:
            return f"the point cloud has {pts.shape[0]} points, over the {MAX_POINTS} limit"
        if pts.dtype.kind != "f":
            return f"'points' must be float32 or float64, got {pts.dtype}"
        if not np.isfinite(pts).all():
            return "the point cloud contains NaN or infinite coordinates"
        for name in ("colors", "normals"):
            extra = arrays.get(name)
            if extra is not None and (extra.shape != pts.shape or extra.dtype.kind != "f"):
                return f"'{name}' must be a float array of the points' shape {tuple(pts.shape)}, " \
                       f"got {extra.dtype} {tuple(extra.shape)}"
    elif kind == "image":
        px = arrays.get("pixels")
        if px is None:
            return "an image reconstruction needs a 'pixels' array"
        if px.ndim != 3 or px.shape[2] not in (3, 4) or px.shape[0] < 1 or px.shape[1] < 1:
            return f"'pixels' must have shape (H, W, 3|4), got {tuple(px.shape)}"
        if px.dtype not in (np.uint8, np.float32):
            return f"'pixels' must be uint8 or float32, got {px.dtype}"
        mask = arrays.get("mask")
        if mask is not None and (mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] not in (3, 4))
                                 or mask.dtype not in (np.uint8, np.float32, np.bool_)):
            return (f"'mask' must be (H, W) or a mask picture (H, W, 3|4), uint8, float32 or bool, "
                    f"got {mask.dtype} {tuple(mask.shape)}")
    return None


def validate_read(header):
    """Return a message naming what is wrong with a read_points or read_image request, or None."""
    path = header.get("path")
    if not isinstance(path, str) or not path:
        return f"{header['type']} needs the file's 'path' as a string (got {path!r})"
    return None


def reconstruct_options(opts):
    from backend.pipeline import ReconstructOptions
    return ReconstructOptions.from_wire(opts)


def _hard_exit():
    log.warning("the running work did not stop in %.1f s; exiting now", EXIT_GRACE_S)
    try:
        sys.stderr.flush()
    finally:
        os._exit(0)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m backend serve",
        description="Serve reconstructions to the Blender add-on over stdin/stdout frames "
                    "(see backend/wire.py). Not meant to be run by hand.")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--preload", action="append", default=[], metavar="KIND[:PATH]",
                   help="load a model at start-up: 'points' / 'image' (the shipped default) or "
                        "'points:/path/model.safetensors'; repeatable")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="do not import torch and the pipeline before the first request")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # OpenMP threads that spin while waiting for work burn the CPU that Blender and every other
    # process need; on a busy machine that made requests 3-10x slower (see bench/blender.py).
    # Threads that never spin pay a wake-up at every parallel region instead; a spin of about
    # 0.3 ms (libgomp's default is ten times longer) keeps the threads warm within a request and
    # costs nothing on a busy machine (docs/performance.md section 4: warm 128^3 0.64 / 0.57 ->
    # 0.57 / 0.52 s idle, 1.08 / 1.16 s busy either way; 3 ms: 4.5 / 2.8 s busy).
    # Must be set before torch (libgomp) loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    if args.threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    if "torch" in sys.modules:
        log.warning("torch was imported before the server set its thread policy")
    # Ctrl-C in the terminal that started Blender reaches the whole process group: the add-on
    # controls this process through its stdin (shutdown / EOF), so ignore it.
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    frames_out = redirect_stdout_to_stderr()
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="[occnet-backend %(process)d] %(levelname)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    instream = os.fdopen(os.dup(0), "rb", buffering=0)
    wire.set_binary_mode(instream)
    server = Server(instream, frames_out, device=args.device)
    server.out.send({"type": "hello", "id": None, **server.versions(), "pid": os.getpid()})
    reader = threading.Thread(target=server.read_loop, name="occnet-reader", daemon=True)
    reader.start()
    if not args.no_warm_up:
        server.warm_done.clear()
        threading.Thread(target=server.warm_up, args=(args.preload,), name="occnet-warmup",
                         daemon=True).start()
    try:
        server.work_loop()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            frames_out.flush()
        except OSError:
            pass
        sys.stderr.flush()
    # daemon threads (reader blocked on stdin, warm-up inside an import) must not keep us alive
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
