"""Reconstruction: an input (points or an image) and a model -> a mesh, with statistics.

This is the one pipeline the CLI, the pipe server and the benchmarks share. It keeps loaded
models between calls, reports progress and checks for cancellation between network batches.
"""

import functools
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .camera import VIEW_HALF_EXTENT, elevation_of_up
from .checkpoint import load_checkpoint
from .colours import transfer_cells, transfer_colours
from .defaults import default_checkpoint, installed_defaults
from .device import resolve_device
from .errors import Cancelled, InputError, OccnetError
from .extraction import MeshArrays, grid_to_mesh, mise, simplify_mesh
from .extraction.marching import (averaging_operator, cloud_tolerance, closed_decimation, simplify_to_tolerance,
                                  smoothing_steps, spanned, subdivided, taubin_smoothed, without_specks)
from .extraction.nearest import NearestPoints
from .extraction.outliers import stray_points
from .extraction.pointfield import PointField, dense_enough
from .extraction.repeats import repeated_points
from .extraction.refine import chords_onto_surface, median_edge, points_denser_than_mesh, refine_to_points
from .extraction.sheets import SheetReport, thicken_sheets
from .extraction.spacing import median_spacing
from .extraction.support import SupportNet, SupportSettings
from .foreground import object_mask
from .inputs import normalisation, validate_image
from .pointclouds import MIN_POINTS, checked_cloud
from .preprocess import image_to_model_input, subsample_indices, subsample_points
from .viewer import (MirrorAveraged, fill_the_mask, follow_the_outline, masked_logits, output_transform,
                     photo_camera, picture_colours, picture_where_shown, viewer_input, visible_vertices)

RESOLUTIONS = (32, 64, 128, 256, 512)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
COARSE_RESOLUTION = 32
# A point cloud marks every cell that holds one of its points for refinement, so its MISE may start
# coarser: on 30 validation clouds of 3000 points identical meshes with 26% fewer evaluations (at 300
# points one of 28 lost a speck of 194 faces; docs/performance.md).
POINT_COARSE_RESOLUTION = 16
QUERY_BOX = (-0.55, 0.55)
VIEWER_BOX = (-VIEW_HALF_EXTENT, VIEW_HALF_EXTENT)
# Out of memory during extraction: batches shrink fourfold down to this before giving up.
MIN_BATCH_POINTS = 4096
# Masks smaller than this many pixels hold too little of the object to reconstruct it from.
MIN_MASK_PIXELS = 64
# The refinement fits planes to at most this many input points (a covering subset of a larger
# scan): its search tree then stays within ~100 MB, and a mesh of at most 512^3 cells gains
# nothing from more.
MAX_REFINE_POINTS = 1_000_000
# The point-cloud safety net (backend/extraction/support.py): the surface stays near the input
# points, and parts the network missed are rebuilt from them. None switches it off (benchmarks
# measure with and without). It works on a covering subset of at most this many points.
POINT_SUPPORT: SupportSettings | None = SupportSettings()
MAX_SUPPORT_POINTS = 200_000
# A mesh of the points-corrected grid that three decimation passes cannot keep closed gives way to
# the network's own grid (docs/performance.md, section 3: an open scan at 256^3; with two, one draw
# of 300,000 points on a chest of drawers, a thousand handles, fell back: docs/pointclouds.md).
CORRECTED_DECIMATION_ATTEMPTS = 3
# A split mesh's vertices further than this many of its edges from every point have no surface of
# the points to follow: they span the membrane the others make (marching.spanned).
UNSUPPORTED_EDGES = 2.0
# The mesh is split over at most this many refinement points: its refinement then costs 2.5 to 3 times
# the unsplit one's, which over a million points (a 3-million-point scan's subset) took the request
# past the 10 s the issue allows 3 million points (docs/pointclouds.md, "Dense clouds: a finer mesh").
MAX_SPLIT_POINTS = 500_000
# ... and on grids of at most this many cells a side: the split gives a 128^3 request the vertices of
# 256^3 without its network evaluations, but on finer grids its faces come closer than the fits can
# place them and their noise turns into the faces' normals (300,000 points at 256^3: normal
# consistency 0.978 -> 0.973 on 8 validation clouds, 1.4 times the time; docs/pointclouds.md).
MAX_SPLIT_RESOLUTION = 128
# Viewer-centred images: when the network doubted more than this fraction of the rays through the
# mask (backend.viewer.fill_the_mask filled them), the result says its depth is mostly a guess.
DOUBTFUL_FRACTION = 0.5
# Viewer-centred images: Taubin steps on the grid's mesh. The decoder's steep logits (its layers
# prior) leave terraces a cell high; smoothing them out raised normal consistency on 60 validation
# renders at 128^3 from 0.660 to 0.666 for Chamfer-L1 x10 0.584 -> 0.586, IoU and F-score within
# 0.0005 (backend/weights/MODEL_CARD.md).
VIEWER_SMOOTHING_STEPS = 4
# Below this confidence an estimated mask is not trusted: the user is asked for one.
MIN_MASK_CONFIDENCE = 0.25
Progress = Callable[[str, float], None]


def worth_splitting(spacing: float, edge: float, resolution: int, points: int) -> bool:
    """Whether the grid's mesh, median edge `edge`, from a grid of `resolution` cells a side, is
    split once before the refinement onto `points` points with median spacing `spacing`: they
    are denser than even the split mesh (points_denser_than_mesh), the grid is at most
    MAX_SPLIT_RESOLUTION and the points at most MAX_SPLIT_POINTS."""
    return (points_denser_than_mesh(spacing, edge / 2) and resolution <= MAX_SPLIT_RESOLUTION
            and points <= MAX_SPLIT_POINTS)


@dataclass
class ReconstructOptions:
    checkpoint: str | None = None      # None: the shipped default for the input's kind
    resolution: int = 128              # final grid resolution, one of RESOLUTIONS
    threshold: float = 0.5             # occupancy probability of the surface
    max_faces: int | None = None       # decimate to this face budget
    device: str | None = None          # None: the Reconstructor's device
    normals: bool = False              # vertex normals from the network's gradient
    refine: bool = True                # point clouds: pull the surface onto the input points, smooth
    batch_points: int = 65536          # points per network batch (bounds memory)
    focal_length: float | None = None  # images: 35 mm equivalent focal length; None: a 50 mm lens
    colours: bool = True               # vertex colours (texture head, the input points' or the picture's)
    keep_stray: bool = False           # point clouds: keep the points far from every other one (modelled
                                       # vertices, not a scan; backend/extraction/outliers.py)

    @classmethod
    def from_wire(cls, options: dict | None) -> "ReconstructOptions":
        """Parse and validate request options as they travel (backend/wire.py's options_dict): the
        one set of rules for the CLI, the server and the add-on. Raises OccnetError("bad_option")."""
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise OccnetError("bad_option", "reconstruct options must be an object")
        known = {f.name for f in fields(cls)} - {"batch_points"}
        unknown = set(options) - known
        if unknown:
            raise OccnetError("bad_option", f"unknown reconstruct option(s): {', '.join(sorted(unknown))}")
        expected = {"checkpoint": (str,), "resolution": (int,), "threshold": (int, float), "max_faces": (int,),
                    "device": (str,), "normals": (bool,), "refine": (bool,), "focal_length": (int, float),
                    "colours": (bool,), "keep_stray": (bool,)}
        for name, value in options.items():
            if value is None and name in ("checkpoint", "max_faces", "device", "focal_length"):
                continue
            if not isinstance(value, expected[name]) or (isinstance(value, bool) and bool not in expected[name]):
                raise OccnetError("bad_option", f"option {name} has the wrong type ({value!r})")
        parsed = cls(**options)
        parsed.validate()
        return parsed

    def validate(self) -> None:
        if self.device is not None and not DEVICE_PATTERN.fullmatch(self.device):
            raise OccnetError("bad_option", f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.resolution not in RESOLUTIONS:
            raise OccnetError("bad_option", f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        if not 0.0 < self.threshold < 1.0:
            raise OccnetError("bad_option", f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if self.max_faces is not None and self.max_faces < 4:
            raise OccnetError("bad_option", f"face budget must be at least 4, got {self.max_faces}")
        if self.batch_points < 1:
            raise OccnetError("bad_option", "batch_points must be positive")
        if self.focal_length is not None and not 1.0 <= self.focal_length <= 2000.0:
            raise OccnetError("bad_option", f"focal length must lie between 1 and 2000 mm (35 mm equivalent), "
                                            f"got {self.focal_length}")


@dataclass
class ReconstructionResult:
    vertices: np.ndarray               # (V, 3) float32 (point clouds: float64)
    faces: np.ndarray                  # (F, 3) int32
    normals: np.ndarray | None = None  # (V, 3) float32
    colors: np.ndarray | None = None   # (V, 4) float32 RGBA in [0, 1]
    stats: dict = field(default_factory=dict)


@dataclass
class CloudWork:
    """What one point-cloud request works with after encoding, in the canonical frame (the
    input's longest edge 1), and what it builds on the way: the safety net, the point field and
    the sheets' report."""
    options: ReconstructOptions
    timer: "StageTimer"
    progress: Progress | None
    should_cancel: Callable[[], bool] | None
    seeds: torch.Tensor                # (M, 3) the encoder's points on the device: MISE refines their cells
    fitted: np.ndarray                 # (K, 3) float32 the covering subset the refinement and point field fit
    normals: np.ndarray | None         # (K, 3) their own normals, if the cloud has them (sparse clouds' planes)
    spacing: float                     # the median nearest-neighbour spacing of fitted
    support: SupportNet | None = None
    point_field: PointField | None = None
    sheets: SheetReport | None = None

    def announce(self, stage: str) -> None:
        """Tell the caller a stage starts."""
        if self.progress is not None:
            self.progress(stage, 0.0)


def falls_back_to_cpu(reconstruct):
    """A reconstruction whose GPU runs out of memory, even with the smallest network batches, is
    run again on the CPU, and its result says so: slower, but the user gets the mesh."""

    @functools.wraps(reconstruct)
    def run(self, data, options: ReconstructOptions | None = None, **kwargs) -> ReconstructionResult:
        options = options or ReconstructOptions()
        try:
            return reconstruct(self, data, options, **kwargs)
        except (OccnetError, torch.OutOfMemoryError) as exc:
            device = resolve_device(options.device) if options.device else self.device
            if device.type == "cpu" or (isinstance(exc, OccnetError) and exc.code != "out_of_memory"):
                raise
        self.release(device)
        result = reconstruct(self, data, replace(options, device="cpu"), **kwargs)
        result.stats["warnings"].append(f"{device} ran out of memory: this result was computed on the CPU instead")
        result.stats["fell_back_from"] = str(device)
        return result

    return run


class Reconstructor:
    """Holds models by (checkpoint, device) and runs reconstructions with them."""

    def __init__(self, device: str | None = "auto"):
        self.device = resolve_device(device)
        self._models: dict = {}

    def info(self) -> dict:
        return {
            "backend": __version__,
            "torch": torch.__version__,
            "device": str(self.device),
            "cuda_available": torch.cuda.is_available(),
            "loaded_models": [{"checkpoint": path, "device": dev} for path, dev in self._models],
            "default_checkpoints": installed_defaults(),
        }

    def release(self, device: torch.device) -> None:
        """Forget the models held on device and return its cached memory."""
        self._models = {key: held for key, held in self._models.items() if key[1] != str(device)}
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def model_for(self, kind: str, options: ReconstructOptions):
        """(model, config) for a request, loading it once per checkpoint and device."""
        device = resolve_device(options.device) if options.device else self.device
        path = Path(options.checkpoint) if options.checkpoint else default_checkpoint(kind)
        key = (str(path.resolve()), str(device))
        if key not in self._models:
            model, config, _ = load_checkpoint(path, device)
            self._models[key] = (model, config)
        model, config = self._models[key]
        if model.input_kind != kind:
            raise OccnetError("wrong_model", wrong_model_message(path, model.input_kind, kind))
        return model, config, device

    @falls_back_to_cpu
    def reconstruct_points(self, points, options: ReconstructOptions | None = None,
                           progress: Progress | None = None,
                           should_cancel: Callable[[], bool] | None = None,
                           colors=None, normals=None) -> ReconstructionResult:
        """points (N, 3) in the caller's coordinates -> mesh in the same coordinates, vertices
        float64 (a survey's coordinates 10^5 m from the origin keep their millimetres).
        colors (N, 3), floats in [0, 1] or uint8 / uint16: the mesh gets vertex colours (V, 4) from
        the nearest points. normals (N, 3), oriented or not: over points sparser than the mesh
        the refinement's planes take their direction from them (docs/performance.md: they help
        there, not over denser points)."""
        options = options or ReconstructOptions()
        options.validate()
        cloud = checked_cloud(points, colors, normals)
        timer = StageTimer()
        with timer("load"):
            model, config, device = self.model_for("points", options)
        input_points = len(cloud.points)
        with timer("repeated_points"):
            repeated = repeated_points(cloud.points)
        if repeated.any():
            cloud = cloud.subset(~repeated)
            if len(cloud.points) < MIN_POINTS:
                raise InputError(f"input: the cloud holds only {len(cloud.points)} distinct points (its other "
                                 f"{int(repeated.sum())} repeat them): too few to outline a surface")
        with timer("stray_points"):
            stray = np.zeros(input_points, bool) if options.keep_stray else stray_points(cloud.points)
        if stray.any():
            cloud = cloud.subset(~stray)
        level = model.surface_level(options.threshold)
        center, scale = normalisation(cloud.points)
        canonical = ((cloud.points - center) / scale).astype(np.float32)
        encoder_points = subsample_points(canonical, int(config["input"].get("max_points", 20000)))
        with timer("encode"), torch.inference_mode():
            seeds = torch.from_numpy(encoder_points).to(device)
            code = model.encode(seeds[None])
        keep = subsample_indices(canonical, MAX_REFINE_POINTS)
        work = CloudWork(options, timer, progress, should_cancel, seeds, canonical[keep],
                         None if cloud.normals is None else cloud.normals[keep], median_spacing(canonical[keep]))

        def decode(p: torch.Tensor) -> torch.Tensor:
            return model.decode(p[None], code)[0]

        if POINT_SUPPORT is not None:
            with timer("support"), torch.inference_mode():
                # float64 where the cloud is small enough: the same cloud anywhere gives the same net
                near = (cloud.points - center) / scale if len(cloud.points) <= MAX_SUPPORT_POINTS else \
                    subsample_points(canonical, MAX_SUPPORT_POINTS)
                work.support = SupportNet(near, QUERY_BOX, POINT_SUPPORT, should_cancel)
                work.support.prepare(decode, level, device, options.batch_points)
        warnings = []
        if stray.any():
            warnings.append(f"left out {int(stray.sum())} stray points ({stray.mean():.1%} of the cloud) that lie far from "
                            f"every other point: a scanner's flying pixels or mismatches")
        mesh, tolerance, evaluations = self._cloud_surface(decode, level, device, work, warnings)
        result = self._finish(model, code, device, mesh, QUERY_BOX, options, timer, should_cancel, warnings,
                              tolerance=tolerance, progress=progress)
        if cloud.colors is not None and options.colours:
            work.announce("colours")
            with timer("colours"):
                result.colors = transfer_colours(result.vertices, canonical, cloud.colors,
                                                  cells=transfer_cells(options.resolution), should_cancel=should_cancel)
        result.vertices = result.vertices.astype(np.float64) * scale + center
        result.stats.update(evaluations=evaluations, input_points=input_points, repeated_points=int(repeated.sum()),
                            stray_points=int(stray.sum()),
                            encoder_points=len(encoder_points),
                            center=center.tolist(), scale=scale, input_colours=cloud.colors is not None,
                            input_normals=cloud.normals is not None)
        if work.point_field is not None:
            result.stats["point_field"] = work.point_field.report.as_stats()
        if work.sheets is not None:
            result.stats["sheets"] = work.sheets.as_stats()
        if work.support is not None:
            result.stats["support"] = work.support.report.as_stats()
            corrected = work.point_field is not None and work.point_field.report.applied
            warning = work.support.report.warning(points_surface=corrected)
            if warning:
                result.stats["warnings"].append(warning)
        return result

    def _cloud_surface(self, decode, level: float, device, work: CloudWork, warnings: list
                       ) -> tuple[MeshArrays, float | None, int]:
        """A point cloud's mesh before _finish -> (mesh, the tolerance _finish decimates it to or
        None when it is decimated already, network evaluations): the network's grid (filtered by the
        safety net, corrected by dense points), refined onto the points; a corrected mesh is
        decimated here, and when it cannot be kept closed the network's own surface is used instead."""
        options, timer = work.options, work.timer
        evaluate = decode if work.support is None else work.support.wrap(decode, level)
        cell = (QUERY_BOX[1] - QUERY_BOX[0]) / options.resolution
        if options.refine and dense_enough(work.spacing, cell):
            with timer("point_field"):
                work.point_field = PointField(work.fitted, work.spacing, cell)

        def settle(grid, level: float) -> None:
            """The points' corrections of the grid: their own surface where dense, then their sheets."""
            if work.point_field is not None:
                work.announce("point_field")
                with timer("point_field"):
                    work.point_field.correct(grid.values, level, grid.box_min, work.should_cancel)
            if options.refine:
                work.announce("sheets")
                with timer("sheets"):
                    work.sheets = thicken_sheets(grid.values, level, grid.box_min, grid.spacing, work.fitted,
                                                 work.spacing, should_cancel=work.should_cancel)

        mesh, evaluations = self._extract(evaluate, level, QUERY_BOX, device, options, timer, work.progress,
                                          work.should_cancel, seed_points=work.seeds, warnings=warnings,
                                          coarse=POINT_COARSE_RESOLUTION, settle=settle)
        tolerance = cloud_tolerance(work.spacing)
        if work.point_field is None or not work.point_field.report.applied:
            return self._refined(mesh, work), tolerance, evaluations
        with timer("point_field"):
            mesh = MeshArrays(*work.point_field.without_bubbles(mesh.vertices, mesh.faces))
        mesh = self._refined(mesh, work)
        if options.max_faces is not None:
            return mesh, tolerance, evaluations
        work.announce("decimate")
        with timer("decimate"):
            small = closed_decimation(mesh, tolerance, work.should_cancel, attempts=CORRECTED_DECIMATION_ATTEMPTS)
        if small is not None:
            return small, None, evaluations
        # Hundreds of small tunnels (an open scan at 256^3): the network's own surface instead, extracted
        # once more (rare, and cheaper than a copy of every corrected grid: 540 MB at 512^3), with the
        # safety net's report left as the first extraction made it, and without sheets (on the bunny's
        # open scan they left 477k faces the decimation could not keep closed).
        again = decode if work.support is None else \
            (lambda p: work.support.filter(p, decode(p), level, count=False))
        try:
            network, _ = self._extract(again, level, QUERY_BOX, device, options, timer, work.progress,
                                       work.should_cancel, seed_points=work.seeds, warnings=warnings,
                                       coarse=POINT_COARSE_RESOLUTION)
        except OccnetError as error:
            if error.code != "empty_mesh":
                raise
            return mesh, tolerance, evaluations   # a network with no surface of its own: the corrected mesh
        work.point_field.report.applied, work.point_field.report.undone = False, True
        work.sheets = None
        return self._refined(network, work), tolerance, evaluations

    @staticmethod
    def _refined(mesh: MeshArrays, work: CloudWork) -> MeshArrays:
        """The grid's mesh shrink-wrapped onto the points and smoothed, when the request refines."""
        if not work.options.refine:
            return mesh
        work.announce("refine")
        on_round = (lambda fraction: work.progress("refine", fraction)) if work.progress is not None else None
        with work.timer("refine"):
            edge = median_edge(mesh.vertices, mesh.faces)
            split = worth_splitting(work.spacing, edge, work.options.resolution, len(work.fitted))
            if split:
                # Points denser than even the grid's mesh with its edges halved: its vertices sample the
                # surface at the grid's spacing, the points finer, so the mesh is split once and its
                # vertices follow the points at twice the density (docs/pointclouds.md, "Dense clouds:
                # a finer mesh").
                mesh, edge = subdivided(mesh), edge / 2
            averaging, points = averaging_operator(mesh), NearestPoints(work.fitted)
            # One decision for the rounds' sliding, the chords' lift and the scan's own normals: over
            # points denser than the mesh their fitted planes did better on validation than the normals
            # (docs/performance.md, "Do input normals help?")
            dense = points_denser_than_mesh(work.spacing, edge)
            mesh = MeshArrays(refine_to_points(mesh.vertices, mesh.faces, work.fitted, progress=on_round,
                                               should_cancel=work.should_cancel,
                                               normals=None if dense else work.normals,
                                               spacing=work.spacing, averaging=averaging, slide=dense, tree=points),
                              mesh.faces)
        with work.timer("smooth"):
            steps = smoothing_steps(work.spacing, median_edge(mesh.vertices, mesh.faces))
            mesh = taubin_smoothed(mesh, steps, averaging)
            if split:
                # Where no point is near (a scan's open underside) nothing but the smoothing shapes the mesh:
                # there it spans the smoothest surface the rim allows (the bunny's open base at 300,000
                # points, docs/pointclouds.md, "Dense clouds: a finer mesh").
                distance, _ = points.query(mesh.vertices.astype(np.float64), distance_upper_bound=UNSUPPORTED_EDGES * edge)
                mesh = spanned(mesh, ~np.isfinite(distance), averaging)
            return chords_onto_surface(mesh, averaging) if dense else mesh

    @falls_back_to_cpu
    def reconstruct_image(self, pixels, options: ReconstructOptions | None = None,
                          progress: Progress | None = None,
                          should_cancel: Callable[[], bool] | None = None,
                          mask: np.ndarray | None = None) -> ReconstructionResult:
        """pixels (H, W, 3|4), row 0 = top; mask (H, W) optional, else alpha or an estimate.

        Viewer-centred models return the mesh in Blender's axes as the picture shows it from the
        Front view, resting on z = 0 (backend.viewer.output_transform); canonical models return
        it in their canonical box, centred at the origin."""
        options = options or ReconstructOptions()
        options.validate()
        rgba = validate_image(pixels)
        timer = StageTimer()
        with timer("load"):
            model, config, device = self.model_for("image", options)
        if model.frame == "viewer":
            return self._reconstruct_viewer(model, config, device, rgba, mask, options, timer, progress, should_cancel)
        size = int(config["input"]["image_size"])
        with timer("encode"), torch.inference_mode():
            image = torch.from_numpy(image_to_model_input(rgba, size)).to(device)[None]
            code = model.encode(image)
        warnings = []
        mesh, evaluations = self._extract(lambda p: model.decode(p[None], code)[0],
                                          model.surface_level(options.threshold), QUERY_BOX, device, options,
                                          timer, progress, should_cancel, warnings=warnings)
        result = self._finish(model, code, device, mesh, QUERY_BOX, options, timer, should_cancel, warnings,
                              progress=progress)
        result.stats.update(evaluations=evaluations, image_size=list(rgba.shape[:2]))
        return result

    @falls_back_to_cpu
    def reconstruct_field(self, data: None = None, options: ReconstructOptions | None = None,
                          progress: Progress | None = None,
                          should_cancel: Callable[[], bool] | None = None) -> ReconstructionResult:
        """The surface of a fitted field (input kind "none", options.checkpoint: training.dvr's
        model) in the box it was fitted in. data: None, a fitted field has no input (the argument
        keeps the signature of the other reconstructions)."""
        options = options or ReconstructOptions()
        options.validate()
        if options.checkpoint is None:
            raise OccnetError("bad_option", "a fitted field is its checkpoint: name it (there is no default)")
        timer = StageTimer()
        with timer("load"):
            model, _, device = self.model_for("none", options)
        warnings = []
        mesh, evaluations = self._extract(lambda p: model.decode(p[None], None)[0],
                                          model.surface_level(options.threshold), QUERY_BOX, device, options,
                                          timer, progress, should_cancel, warnings=warnings)
        result = self._finish(model, None, device, mesh, QUERY_BOX, options, timer, should_cancel, warnings,
                              progress=progress)
        result.stats.update(evaluations=evaluations)
        return result

    def _reconstruct_viewer(self, model, config, device, rgba, mask, options, timer, progress, should_cancel):
        with timer("mask"):
            try:
                found = object_mask(rgba, mask)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            if found.confidence < MIN_MASK_CONFIDENCE:
                raise OccnetError("no_mask", f"could not tell the object from the background (confidence "
                                             f"{found.confidence:.2f}): give a picture with transparency or a mask")
            pixels = int(found.mask.sum())
            if pixels == 0:
                raise OccnetError("empty_mask", f"no object in the picture: its mask ({found.source}) is empty")
            if pixels < MIN_MASK_PIXELS:
                raise OccnetError("empty_mask", f"the object's mask ({found.source}) covers only {pixels} pixels, "
                                                f"too few to reconstruct from")
        size = int(config["input"]["image_size"])
        height, width = rgba.shape[:2]
        model = MirrorAveraged(model)
        with timer("encode"), torch.inference_mode():
            camera_mat = photo_camera(height, width, options.focal_length)
            view = viewer_input(rgba, found, camera_mat, size)
            image = torch.from_numpy(view.image).to(device)[None]
            code = model.encode(image, torch.tensor([view.crop.focal], device=device),
                                torch.from_numpy(view.mask)[None])
        mask_tensor = torch.from_numpy(view.mask).to(device)

        def evaluate(p: torch.Tensor) -> torch.Tensor:
            return masked_logits(lambda q: model.decode(q[None], code)[0], p, mask_tensor, view.crop.focal)

        def fit_the_mask(grid, level: float) -> None:
            with timer("fit_the_mask"):
                filled.append(fill_the_mask(grid.values, grid.box_min, grid.spacing, view.mask, view.crop.focal,
                                            level))
                follow_the_outline(grid.values, grid.box_min, grid.spacing, view.mask, view.crop.focal, level)

        warnings, filled = [], []
        mesh, evaluations = self._extract(evaluate, model.surface_level(options.threshold), VIEWER_BOX, device,
                                          options, timer, progress, should_cancel,
                                          warnings=warnings, settle=fit_the_mask)
        with timer("smooth"):
            mesh = taubin_smoothed(mesh, VIEWER_SMOOTHING_STEPS)
        result = self._finish(model, code, device, mesh, VIEWER_BOX, options, timer, should_cancel, warnings,
                              progress=progress)
        if options.colours:
            with timer("colours"):
                if result.colors is None:   # no texture head: every vertex the picture's colour on its ray
                    result.colors = picture_colours(rgba, found.mask, camera_mat, view.crop, result.vertices)
                else:   # the picture's colour where it shows the surface, the head's, lit alike, elsewhere
                    shown = visible_vertices(result.vertices, result.faces, view.crop.focal)
                    if shown.any():
                        seen = picture_colours(rgba, found.mask, camera_mat, view.crop, result.vertices[shown])
                        result.colors[:, :3] = picture_where_shown(result.colors[:, :3], seen[:, :3], shown)
        up = code["up"][0].double().cpu().numpy()
        transform = output_transform(up, result.vertices.astype(np.float64))
        result.vertices = (result.vertices.astype(np.float64) @ transform[:3, :3].T + transform[:3, 3]).astype(np.float32)
        if result.normals is not None:
            result.normals = (result.normals.astype(np.float64) @ transform[:3, :3].T).astype(np.float32)
        if found.touches_border:
            warnings.append("the object touches the picture's border: it is cut off there, and so is the result")
        if filled[0] > DOUBTFUL_FRACTION:
            warnings.append(f"the network was unsure of {filled[0]:.0%} of the object as the picture shows it: those "
                            f"parts were placed at their likeliest depth, which is a guess")
        if found.source in ("estimate", "saliency"):
            how = "from the background" if found.source == "estimate" else "by a salient-object network"
            warnings.append(f"the picture has no transparency: the object's mask was estimated {how} "
                            f"(confidence {found.confidence:.2f}); give a mask if the outline is wrong")
        result.stats.update(evaluations=evaluations, image_size=[height, width], mask_source=found.source,
                            mask_confidence=round(found.confidence, 3), cut_off=found.touches_border,
                            focal=view.crop.focal, elevation_deg=round(math.degrees(elevation_of_up(up)), 1),
                            viewer_to_output=transform.tolist(),
                            filled_fraction=round(filled[0], 4))
        return result

    def _extract(self, evaluate, level: float, box, device, options, timer, progress, should_cancel, *,
                 warnings: list, seed_points=None, settle=None, coarse: int = COARSE_RESOLUTION):
        """evaluate(points (M, 3)) -> logits (M,), inside above level (the model's surface_level), in
        the box (low, high) -> (grid mesh, evaluations).
        What the user should know (batches shrunk for memory) is appended to warnings.
        settle(grid, level) may reshape grid.values in place once the grid is known, before marching cubes.
        coarse: the resolution MISE starts from."""
        steps = int(round(math.log2(options.resolution / coarse))) if options.resolution > coarse else 0
        resolution0 = min(options.resolution, coarse)

        def on_fraction(fraction: float) -> None:
            if progress is not None:
                progress("extract", fraction)

        if should_cancel is not None and should_cancel():
            raise Cancelled()
        batch_points = options.batch_points
        while True:
            try:
                with timer("extract"), torch.inference_mode():
                    grid = mise(evaluate, resolution0, steps, level=level, box=box, seed_points=seed_points,
                                batch_points=batch_points, device=device, progress=on_fraction,
                                should_cancel=should_cancel)
                break
            except torch.OutOfMemoryError:
                if batch_points <= MIN_BATCH_POINTS:
                    raise OccnetError("out_of_memory", f"{device} ran out of memory even with network batches of "
                                                       f"{batch_points} points: use a lower resolution") from None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                batch_points //= 4
                warnings.append(f"out of memory on {device}: retried with network batches of {batch_points} points")
        if not np.isfinite(grid.values).all():
            raise OccnetError("bad_model", "the network's output is not a number (NaN or infinite) for some points: "
                                           "the model is broken, whatever the threshold")
        if settle is not None:
            settle(grid, level)
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        if progress is not None:
            progress("marching_cubes", 0.0)
        with timer("marching_cubes"):
            mesh = grid_to_mesh(grid.values, level, grid.box_min, grid.spacing)
        if len(mesh.faces) == 0:
            raise OccnetError("empty_mesh", "the network found no surface in the input's box "
                                            "(every point is outside at this threshold); try a lower threshold")
        return mesh, grid.evaluations

    def _finish(self, model, code, device, mesh: MeshArrays, box, options, timer, should_cancel,
                warnings: list, tolerance: float | None = None,
                progress: Progress | None = None) -> ReconstructionResult:
        """The result of a grid mesh extracted in box (low, high): decimated, without specks, with
        normals and texture colours as asked; its stats carry the warnings (a list the caller may
        still extend)."""
        if options.max_faces is not None or tolerance is not None:
            if progress is not None:
                progress("decimate", 0.0)
            with timer("decimate"):  # to a face budget, or to as many faces as the detail needs
                mesh = simplify_mesh(mesh, options.max_faces, should_cancel=should_cancel) \
                    if options.max_faces is not None else \
                    simplify_to_tolerance(mesh, tolerance, should_cancel=should_cancel)
        with timer("specks"):
            mesh, specks = without_specks(mesh, (box[1] - box[0]) / options.resolution)
        normals = None
        if options.normals:
            with timer("normals"):
                normals = gradient_normals(model, code, mesh.vertices, device, options.batch_points)
        colours = None
        if options.colours and model.has_texture:
            with timer("colours"):
                colours = texture_colours(model, code, mesh.vertices, device, options.batch_points)
        stats = {"vertices": len(mesh.vertices), "faces": len(mesh.faces), "specks": specks,
                 "resolution": options.resolution,
                 "threshold": options.threshold, "device": str(device), "seconds": timer.seconds,
                 "warnings": warnings}
        return ReconstructionResult(mesh.vertices, mesh.faces, normals, colours, stats)


def wrong_model_message(path, model_kind: str, input_kind: str) -> str:
    """Why a checkpoint does not fit the request, and what would."""
    if model_kind == "none":
        return f"{path} is a fitted field (input kind none): reconstruct it without an input"
    if input_kind == "none":
        return f"{path} is a model for {model_kind} input: it needs one (a fitted field needs none)"
    return f"{path} is a model for {model_kind} input, but the input is " \
           f"{'an image' if input_kind == 'image' else 'a point cloud'}"


@torch.inference_mode()
def texture_colours(model, code, vertices: np.ndarray, device, batch_points: int) -> np.ndarray:
    """(V, 4) float32 RGBA in [0, 1] (alpha 1) at vertices (V, 3) in the model's frame, from its
    texture head."""
    rgb = np.empty((len(vertices), 3), np.float32)
    for start in range(0, len(vertices), batch_points):
        p = torch.from_numpy(np.ascontiguousarray(vertices[start:start + batch_points], np.float32)).to(device)
        rgb[start:start + batch_points] = model.decode_colour(p[None], code)[0].float().cpu().numpy()
    return np.concatenate([rgb, np.ones((len(vertices), 1), np.float32)], axis=1)


def cloned(code):
    """A copy of a model's code (a tensor, dicts of them, nested, or None) outside inference mode."""
    if isinstance(code, dict):
        return {k: cloned(v) for k, v in code.items()}
    return code.clone() if isinstance(code, torch.Tensor) else code


def gradient_normals(model, code, vertices: np.ndarray, device, batch_points: int) -> np.ndarray:
    """Unit normals (V, 3) at canonical vertices (V, 3): minus the gradient of the occupancy logit,
    which points out of the shape."""
    out = np.zeros_like(vertices)
    code = cloned(code)  # leave inference mode's tensors behind
    for start in range(0, len(vertices), batch_points):
        p = torch.from_numpy(vertices[start:start + batch_points]).to(device)[None].requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model.decode(p, code).sum(), p)
        n = -grad[0]
        out[start:start + batch_points] = (n / n.norm(dim=1, keepdim=True).clamp(min=1e-12)).cpu().numpy()
    return out


class StageTimer:
    """Wall-clock seconds per named stage, plus their total: `with timer("extract"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.seconds["total"] = sum(v for k, v in self.seconds.items() if k != "total")
