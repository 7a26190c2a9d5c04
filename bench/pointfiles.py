"""Load time and peak memory of backend.pointclouds.load_point_cloud, per format and size; with
--scale, whole reconstructions of large scans of a real mesh.

    python bench/pointfiles.py [--sizes 1000000 10000000] [--formats las laz ...] [--folder DIR]
    python bench/pointfiles.py --scale [--sizes 30000 300000 3000000] [--resolutions 128 256]
                               [--mesh ../shared/data/meshes/classic/stanford-bunny.obj] [--poisson]

--scale: points sampled on a classic mesh scaled to 2 m in a room (with 1 mm noise and colours
from a procedural texture), written as PLY and LAS; each file loaded in a fresh process (seconds,
peak RSS); then, from the PLY, one fresh process per resolution that loads the file and
reconstructs it with the default model and options, its colours and normals passed as the CLI
passes them (coloured result): seconds per stage, wall and CPU seconds (all threads) and peak RSS
of the whole request. Default sizes
take minutes on 2 idle cores (more when they are shared); add 10000000 to --sizes for the slow
variant. --poisson (slow) adds screened Poisson (bench/pointcloud.py's, normals estimated and
oriented as there) on the same PLY in a fresh process, and scores both results against the mesh
(IoU, Chamfer-L1 x10, normal consistency, F-score@1%, in the mesh's unit box).

Each file holds a coloured scan (x y z, 8-bit colours; the PLY and text files also normals),
written by the format's own library (laspy, pye57, pypcd4, trimesh, numpy). Each load runs in a
fresh process: seconds for load_point_cloud alone, the process's peak RSS, and its peak after
importing the readers (the baseline; imports free some of what they used, so the difference
understates the load's own share). Prints one JSON line per file, then a Markdown table.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FORMATS = ("ply", "las", "laz", "e57", "pcd", "xyz", "npy")

PROBE = """
import json, sys, time
from backend.pointclouds import load_point_cloud
import laspy, pye57, pypcd4, trimesh  # the readers' own imports are not the cloud's memory


def peak_rss_mb():  # this process's own high-water mark (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


before = peak_rss_mb()
start = time.perf_counter()
cloud = load_point_cloud(sys.argv[1])
seconds = time.perf_counter() - start
print(json.dumps({"points": len(cloud.points), "colours": cloud.colors is not None, "seconds": seconds,
                  "baseline_mb": before, "peak_rss_mb": peak_rss_mb()}))
"""


RECONSTRUCT_PROBE = """
import json, sys, time
from backend.pipeline import Reconstructor, ReconstructOptions
from backend.pointclouds import load_point_cloud


def peak_rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


reconstructor = Reconstructor("cpu")
reconstructor.model_for("points", ReconstructOptions())  # a warm backend: the model is loaded
start, cpu = time.perf_counter(), time.process_time()
cloud = load_point_cloud(sys.argv[1])
loaded = time.perf_counter() - start
result = reconstructor.reconstruct_points(cloud.points, ReconstructOptions(resolution=int(sys.argv[2])),
                                          colors=cloud.colors, normals=cloud.normals)  # as the CLI reads a file
seconds = time.perf_counter() - start
if len(sys.argv) > 3:
    import numpy as np
    np.savez(sys.argv[3], vertices=result.vertices, faces=result.faces)
print(json.dumps({"points": len(cloud.points), "load_s": loaded, "total_s": seconds,
                  "cpu_s": time.process_time() - cpu,
                  "stages": result.stats["seconds"], "faces": len(result.faces), "coloured": result.colors is not None,
                  "peak_rss_mb": peak_rss_mb()}))
"""


POISSON_PROBE = """
import json, sys, time
import numpy as np
from bench.pointcloud import poisson_mesh
from backend.pointclouds import load_point_cloud


def peak_rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


start, cpu = time.perf_counter(), time.process_time()
cloud = load_point_cloud(sys.argv[1])
loaded = time.perf_counter() - start
vertices, faces = poisson_mesh(cloud.points)
seconds = time.perf_counter() - start
np.savez(sys.argv[2], vertices=vertices, faces=faces)
print(json.dumps({"points": len(cloud.points), "load_s": loaded, "total_s": seconds,
                  "cpu_s": time.process_time() - cpu, "faces": len(faces), "peak_rss_mb": peak_rss_mb()}))
"""
# Where mesh_scan puts the mesh's unit box: points = ROOM_OFFSET + unit-box points x ROOM_SCALE.
ROOM_OFFSET, ROOM_SCALE = np.array([12.0, 34.0, 1.5]), 2.0


def mesh_scan(mesh: Path, n: int, seed: int = 0):
    """points (n, 3) float64 on the mesh, scaled to a 2 m longest edge and placed in a room (tens
    of metres from the origin: a PLY written by trimesh holds float32, which a survey's 10^5 m
    would round to centimetres), 1 mm noise; colours (n, 3) uint8 from a procedural texture
    (stripes and checks in space); normals (n, 3) of the faces they lie on."""
    from training.meshprep import apply_normalisation, load_mesh, normalisation, sample_surface

    rng = np.random.default_rng(seed)
    vertices, faces = load_mesh(mesh)
    surface, normals = sample_surface(rng, apply_normalisation(vertices, *normalisation(vertices)), faces, n)
    texture = np.stack([np.sin(surface[:, 0] * 40.0), np.cos(surface[:, 1] * 25.0),
                        np.sign(np.sin(surface[:, 2] * 30.0) * np.sin(surface[:, 0] * 30.0))], axis=1)
    colours = np.round((texture * 0.5 + 0.5) * 255).astype(np.uint8)
    points = ROOM_OFFSET + surface * ROOM_SCALE + rng.normal(scale=0.001, size=(n, 3))
    return points, colours, np.asarray(normals, np.float32)


def run_probe(probe: str, *arguments) -> dict:
    out = subprocess.run([sys.executable, "-c", probe, *map(str, arguments)], cwd=REPO,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, arguments))} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reconstruct_file(path: Path, resolution: int, mesh_out: Path | None = None) -> dict:
    return run_probe(RECONSTRUCT_PROBE, path, resolution, *([mesh_out] if mesh_out else []))


def truth(mesh: Path, seed: int = 1):
    """What a result is scored against (bench/pointcloud.py's score): the mesh's surface samples,
    their normals, uniform queries and their occupancy, in its unit box."""
    from training.meshprep import apply_normalisation, inside, load_mesh, normalisation, sample_surface

    from pointcloud import EVAL_POINTS

    rng = np.random.default_rng(seed)
    vertices, faces = load_mesh(mesh)
    vertices = apply_normalisation(vertices, *normalisation(vertices))
    surface, normals = sample_surface(rng, vertices, faces, EVAL_POINTS)
    queries = rng.uniform(-0.55, 0.55, size=(EVAL_POINTS, 3))
    return surface, normals, queries, inside(vertices, faces, queries)


def quality(result_npz: Path, reference) -> dict:
    """Metrics of a result mesh written in the room's coordinates, mapped back to the unit box."""
    from pointcloud import score

    with np.load(result_npz) as mesh:
        vertices, faces = (mesh["vertices"].astype(np.float64) - ROOM_OFFSET) / ROOM_SCALE, mesh["faces"]
    metrics = score(vertices, faces, *reference, np.random.default_rng(2))
    return {k: metrics[k] for k in ("iou", "chamfer_l1_x10", "normal_consistency", "fscore")}


def scale_table(mesh: Path, sizes: list[int], resolutions: list[int], folder: Path, poisson: bool = False) -> None:
    """bench --scale: one JSON line per load and per reconstruction, then Markdown tables."""
    loads, runs, compared = [], [], []
    reference = truth(mesh) if poisson else None
    for size in sizes:
        points, colours, normals = mesh_scan(mesh, size)
        for fmt in ("ply", "las"):
            path = folder / f"scan_{size}.{fmt}"
            write(fmt, path, points, colours, normals)
            row = {"format": fmt, "points": size, "file_mb": path.stat().st_size / 2**20, **measure(path)}
            print(json.dumps({"bench": "scale_load", **row}), flush=True)
            loads.append(row)
        del points, colours, normals
        for resolution in resolutions:
            result = folder / "result.npz"
            row = {"points": size, "resolution": resolution,
                   **reconstruct_file(folder / f"scan_{size}.ply", resolution, result if poisson else None)}
            print(json.dumps({"bench": "scale_reconstruct", **row}), flush=True)
            runs.append(row)
            if poisson:
                compared.append({"method": f"ours {resolution}^3", "points": size, "seconds": row["total_s"],
                                 "peak_rss_mb": row["peak_rss_mb"], "faces": row["faces"], **quality(result, reference)})
                print(json.dumps({"bench": "scale_quality", **compared[-1]}), flush=True)
        if poisson:
            row = run_probe(POISSON_PROBE, folder / f"scan_{size}.ply", folder / "result.npz")
            compared.append({"method": "screened Poisson", "points": size, "seconds": row["total_s"],
                             "peak_rss_mb": row["peak_rss_mb"], "faces": row["faces"],
                             **quality(folder / "result.npz", reference)})
            print(json.dumps({"bench": "scale_quality", **compared[-1]}), flush=True)
        for fmt in ("ply", "las"):
            (folder / f"scan_{size}.{fmt}").unlink()
    print("\n| format | points | file MB | load s | peak RSS MB |\n|---|---|---|---|---|")
    for r in loads:
        print(f"| {r['format']} | {r['points']:,} | {r['file_mb']:.0f} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    stages = list(dict.fromkeys(k for r in runs for k in r["stages"] if k not in ("total", "load")))  # load: the model
    print("\n| points | grid | load s | " + " | ".join(f"{k} s" for k in stages) +
          " | request s | file to mesh s | file to mesh CPU s | faces | peak RSS MB |\n" + "|---" * (len(stages) + 8) + "|")
    for r in runs:
        print(f"| {r['points']:,} | {r['resolution']}^3 | {r['load_s']:.2f} | " +
              " | ".join(f"{r['stages'].get(k, 0.0):.2f}" for k in stages) +
              f" | {r['stages']['total']:.2f} | {r['total_s']:.2f} | {r['cpu_s']:.2f} | {r['faces']:,} | {r['peak_rss_mb']:.0f} |")
    if compared:
        print("\n| points | method | file to mesh s | peak RSS MB | faces | IoU | Chamfer-L1 x10 | NC | F@1% |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for r in compared:
            print(f"| {r['points']:,} | {r['method']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['faces']:,} | "
                  f"{r['iou']:.3f} | {r['chamfer_l1_x10']:.3f} | {r['normal_consistency']:.3f} | {r['fscore']:.3f} |")


def scan(n: int, seed: int = 0):
    """points (n, 3) float64 a survey's distance from the origin, colours (n, 3) uint8, normals (n, 3)."""
    rng = np.random.default_rng(seed)
    points = np.array([412_345.0, 5_312_345.0, 230.0]) + np.round(rng.uniform(0, 50, (n, 3)), 3)
    colours = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    normals = rng.normal(size=(n, 3)).astype(np.float32)
    return points, colours, normals / np.linalg.norm(normals, axis=1, keepdims=True)


def write(fmt: str, path: Path, points, colours, normals) -> None:
    if fmt in ("las", "laz"):
        import laspy

        header = laspy.LasHeader(point_format=3, version="1.2")
        header.scales, header.offsets = [0.001] * 3, points.min(axis=0)
        las = laspy.LasData(header)
        las.x, las.y, las.z = points.T
        las.red, las.green, las.blue = (colours.astype(np.uint16) * 257).T
        las.write(path)
    elif fmt == "e57":
        import pye57

        e57 = pye57.E57(str(path), mode="w")
        e57.write_scan_raw({"cartesianX": points[:, 0], "cartesianY": points[:, 1], "cartesianZ": points[:, 2],
                            "colorRed": colours[:, 0], "colorGreen": colours[:, 1], "colorBlue": colours[:, 2]})
        e57.close()
    elif fmt == "pcd":
        import pypcd4

        local = (points - points.min(axis=0)).astype(np.float32)
        rgb = pypcd4.PointCloud.encode_rgb(colours)
        pypcd4.PointCloud.from_points([*local.T, rgb], ("x", "y", "z", "rgb"), (np.float32,) * 4).save(path)
    elif fmt == "ply":
        import trimesh

        cloud = trimesh.PointCloud(points, colors=np.column_stack([colours, np.full(len(colours), 255, np.uint8)]))
        cloud.export(path)
    elif fmt == "xyz":
        table = np.column_stack([points, colours, normals])
        np.savetxt(path, table, fmt="%.3f %.3f %.3f %d %d %d %.5f %.5f %.5f")
    else:
        np.save(path, np.column_stack([points, colours, normals]))


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="points per file (default: 1M and 10M; with --scale 30k, 300k and 3M)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--folder", help="where the files go (default: a temporary folder)")
    parser.add_argument("--scale", action="store_true", help="whole reconstructions of scans of a real mesh")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--poisson", action="store_true",
                        help="with --scale: screened Poisson on the same files, and both scored against the mesh")
    parser.add_argument("--mesh", type=Path,
                        default=REPO.parent / "shared" / "data" / "meshes" / "classic" / "stanford-bunny.obj")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.folder or temporary)
        if args.scale:
            if not args.mesh.is_file():
                print(f"skipped: {args.mesh} not found (the shared data folder is absent)")
                return 0
            scale_table(args.mesh, args.sizes or [30_000, 300_000, 3_000_000], args.resolutions, folder, args.poisson)
            return 0
        for size in args.sizes or [1_000_000, 10_000_000]:
            points, colours, normals = scan(size)
            for fmt in args.formats:
                path = folder / f"scan_{size}.{fmt}"
                start = time.perf_counter()
                write(fmt, path, points, colours, normals)
                written = time.perf_counter() - start
                row = {"format": fmt, "points": size, "file_mb": path.stat().st_size / 2**20,
                       "write_s": written, **measure(path)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                path.unlink()
    print("\n| format | points | file MB | load s | peak RSS MB | baseline MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['points']:,} | {r['file_mb']:.0f} | {r['seconds']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['baseline_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
