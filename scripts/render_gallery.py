"""Pictures for the README, rendered with Blender: input | result from the front | result from the
side | ground truth from the front | ground truth from the side.

    python scripts/render_gallery.py DATA_DIR OUT.png [--checkpoint PATH] [--count 8] [--resolution 128]
        [--classic-renders out/bench_image] [--classic ../shared/data/meshes/classic] [--exclude-from CONFIG]

Rows: test-split shapes of DATA_DIR (one per class while classes last), each from its first
rendered view; then the benchmark's Cycles renders of classic meshes (bench/image.py makes them);
then one of those composited on a plain background without alpha, so the mask is estimated.
"Front" is Blender's Front view of the returned mesh (the picture's own view), in the colours the
result carries (the picture's); "side" is the Right view. The ground truth is moved into the same frame (the view's viewer frame, then the result's
viewer_to_output), so both columns compare like with like.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TILE = 256
CLASSIC_ROWS = (("spot", 0), ("stanford-bunny", 3), ("teapot", 1), ("cow", 2))
PHOTO_ROW = ("beetle", 0)


def on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA").resize((TILE, TILE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def text_tile(text: str) -> Image.Image:
    from PIL import ImageDraw

    tile = Image.new("RGB", (TILE, TILE), "white")
    ImageDraw.Draw(tile).text((TILE // 2, TILE // 2), text, fill=(160, 30, 30), anchor="mm")
    return tile


def pick_shapes(data_dir: Path, count: int, exclude: set) -> list[str]:
    ids = [i for i in (data_dir / "split" / "test.txt").read_text().split() if i not in exclude
           and (data_dir / i / "images" / "000.png").is_file()]
    by_class: dict[str, list[str]] = {}
    for shape_id in ids:
        by_class.setdefault(json.loads((data_dir / shape_id / "shape.json").read_text())["class"], []).append(shape_id)
    picked = []
    while len(picked) < count and any(by_class.values()):
        for members in by_class.values():
            if members and len(picked) < count:
                picked.append(members.pop(0))
    return picked


def row_tiles(renderer, reconstructor, options, rgba, gt_vertices, gt_faces, similarity, name, work):
    """The five tiles of one row; gt_vertices (canonical) go through similarity into the viewer frame."""
    from backend import camera
    from backend.errors import OccnetError
    from training.render import framing_view

    shown = Image.fromarray((np.clip(rgba, 0, 1) * 255).astype(np.uint8))
    try:
        result = reconstructor.reconstruct_image(rgba, options)
    except OccnetError as error:  # a failure is part of the picture, not a reason to drop the row
        print(f"{name}: {error.code}: {error}", flush=True)
        return [on_white(shown)] + [text_tile(error.code.replace("_", " "))] * 2 + [text_tile("")] * 2
    to_output = np.asarray(result.stats["viewer_to_output"])
    gt_output = camera.transform_points(to_output @ similarity, gt_vertices)
    both = np.concatenate([result.vertices, gt_output])
    front, side = framing_view(both, np.array([0.0, 1.0, 0.0])), framing_view(both, np.array([-1.0, 0.0, 0.0]))
    tiles = [on_white(shown)]
    for label, (vertices, faces, colours) in (("pred", (result.vertices, result.faces, result.colors)),
                                              ("gt", (gt_output, gt_faces, None))):
        tiles.append(on_white(renderer.picture(vertices, faces, front, work / f"{name}_{label}_front.png", colours)))
        tiles.append(on_white(renderer.picture(vertices, faces, side, work / f"{name}_{label}_side.png", colours)))
    print(f"{name}: {result.stats['faces']} faces, mask {result.stats['mask_source']}, "
          f"elevation {result.stats['elevation_deg']} deg", flush=True)
    return tiles


def main(argv=None) -> int:
    import importlib.util

    from backend.inputs import load_image
    from backend.pipeline import ReconstructOptions, Reconstructor
    from training.evaluate import focal_35mm, viewer_ground_truth
    from training.meshprep import apply_normalisation, load_mesh
    from training.render import BlenderRenderer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--classic-renders", type=Path, default=ROOT / "out" / "bench_image")
    parser.add_argument("--classic", type=Path, default=ROOT.parent / "shared" / "data" / "meshes" / "classic")
    parser.add_argument("--exclude-from", type=Path, help="a training config whose exclude_shapes to skip")
    args = parser.parse_args(argv)
    exclude = set(json.loads(args.exclude_from.read_text()).get("exclude_shapes", [])) if args.exclude_from else set()
    reconstructor = Reconstructor("cpu")
    renderer = BlenderRenderer(TILE)
    work = Path(tempfile.mkdtemp(prefix="occnet_gallery_"))  # Blender renders to files
    rows = []
    for shape_id in pick_shapes(args.data_dir, args.count, exclude):
        shape_dir = args.data_dir / shape_id
        info = json.loads((shape_dir / "shape.json").read_text())
        with np.load(shape_dir / "cameras.npz") as cameras:
            world_mat, camera_mat = cameras["world_mat"][0].astype(np.float64), cameras["camera_mat"][0].astype(np.float64)
        rgba = load_image(shape_dir / "images" / "000.png")
        options = ReconstructOptions(checkpoint=args.checkpoint, resolution=args.resolution,
                                     focal_length=focal_35mm(camera_mat, *rgba.shape[:2]))
        gt_vertices, gt_faces = load_mesh(info["source"])
        gt_vertices = apply_normalisation(gt_vertices, np.array(info["center"]), info["scale"])
        similarity = viewer_ground_truth(rgba[..., 3], world_mat, camera_mat)
        rows.append(row_tiles(renderer, reconstructor, options, rgba, gt_vertices, gt_faces, similarity, shape_id, work))
    spec = importlib.util.spec_from_file_location("bench_image", ROOT / "bench" / "image.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    world_mats, camera_mats = bench.view_cameras(bench.IMAGE_SIZE)
    options = ReconstructOptions(checkpoint=args.checkpoint, resolution=args.resolution)
    for (name, view), photo in [(row, False) for row in CLASSIC_ROWS] + [(PHOTO_ROW, True)]:
        path = args.classic_renders / f"{name}_{view}.png"
        if not path.is_file():
            print(f"skipped {name}: {path} missing (run bench/image.py first)", file=sys.stderr)
            continue
        rgba = load_image(path)
        similarity = viewer_ground_truth(rgba[..., 3], world_mats[view], camera_mats[view])
        if photo:  # the same picture without transparency, on a plain light background
            background = np.array([0.86, 0.84, 0.8], np.float32)
            rgb = rgba[..., :3] * rgba[..., 3:4] + background * (1 - rgba[..., 3:4])
            rgba = np.concatenate([rgb, np.ones_like(rgba[..., :1])], axis=-1)
        gt_vertices, gt_faces = bench.load_normalised(str(args.classic / f"{name}.obj"))
        rows.append(row_tiles(renderer, reconstructor, options, rgba, gt_vertices, gt_faces, similarity,
                              f"{name}_{view}{'_photo' if photo else ''}", work))
    sheet = Image.new("RGB", (5 * TILE, len(rows) * TILE), "white")
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * TILE, r * TILE))
    sheet.save(args.out)
    print(f"wrote {args.out} (columns: input, result front, result side, truth front, truth side)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
