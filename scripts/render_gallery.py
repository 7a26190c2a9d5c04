"""Pictures for the README: input image | reconstruction | ground truth, rendered with Blender.

    python scripts/render_gallery.py DATA_DIR OUT.png [--checkpoint PATH] [--count 6] [--resolution 128]

Takes test-split shapes of DATA_DIR (prepared by training.prepare, with renders), one per class
while classes last, reconstructs each from its first rendered view with the single-image model,
and renders prediction and ground truth from that same camera (the model predicts in the shape's
canonical frame, which is the frame the cameras are given in).
"""

import argparse
import tempfile
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILE = 256


def render_tile(renderer, vertices, faces, world_mat, path: Path) -> Image.Image:
    from mathutils import Matrix

    from training.render import BLENDER_FROM_OPENCV

    renderer.set_mesh(np.asarray(vertices, np.float32), np.asarray(faces, np.int32))
    shading = renderer.scene.display.shading
    shading.single_color = (0.75, 0.75, 0.78)
    shading.show_cavity = True
    renderer.camera.matrix_world = Matrix(np.linalg.inv(BLENDER_FROM_OPENCV @ world_mat).tolist())
    renderer.scene.render.filepath = str(path)
    renderer.bpy.ops.render.render(write_still=True)
    return on_white(Image.open(path))


def on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA").resize((TILE, TILE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


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


def main(argv=None) -> int:
    from backend.pipeline import Reconstructor, ReconstructOptions
    from backend.inputs import load_image
    from training.meshprep import apply_normalisation, load_mesh
    from training.render import BlenderRenderer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--exclude-from", type=Path, help="a training config whose exclude_shapes to skip")
    args = parser.parse_args(argv)
    exclude = set(json.loads(args.exclude_from.read_text()).get("exclude_shapes", [])) if args.exclude_from else set()
    reconstructor = Reconstructor("cpu")
    renderer = BlenderRenderer(TILE)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="occnet_gallery_"))  # Blender renders to files
    for shape_id in pick_shapes(args.data_dir, args.count, exclude):
        shape_dir = args.data_dir / shape_id
        info = json.loads((shape_dir / "shape.json").read_text())
        world_mat = np.load(shape_dir / "cameras.npz")["world_mat"][0]
        image_path = shape_dir / "images" / "000.png"
        result = reconstructor.reconstruct_image(load_image(image_path), ReconstructOptions(
            checkpoint=args.checkpoint, resolution=args.resolution))
        gt_vertices, gt_faces = load_mesh(info["source"])
        gt_vertices = apply_normalisation(gt_vertices, np.array(info["center"]), info["scale"])
        tiles = [on_white(Image.open(image_path)),
                 render_tile(renderer, result.vertices, result.faces, world_mat, work / f"{shape_id}_pred.png"),
                 render_tile(renderer, gt_vertices, gt_faces, world_mat, work / f"{shape_id}_gt.png")]
        rows.append(tiles)
        print(f"{shape_id} ({info['class']}): {result.stats['faces']} faces", flush=True)
    sheet = Image.new("RGB", (3 * TILE, len(rows) * TILE), "white")
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * TILE, r * TILE))
    sheet.save(args.out)
    print(f"wrote {args.out} (columns: input image, reconstruction, ground truth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
