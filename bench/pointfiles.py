"""Load time and peak memory of backend.pointclouds.load_point_cloud, per format and size.

    python bench/pointfiles.py [--sizes 1000000 10000000] [--formats las laz ...] [--folder DIR]

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
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--folder", help="where the files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.folder or temporary)
        for size in args.sizes:
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
