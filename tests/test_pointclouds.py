"""backend.pointclouds: files written by each format's own library read back with the same points,
colours and normals; layouts of text and NumPy clouds; missing libraries named; the encoder's
subsample covers the whole scan."""

import sys

import laspy
import numpy as np
import pye57
import pypcd4
import pytest
import trimesh

from backend.errors import InputError, MissingPackageError
from backend.pointclouds import POINT_SUFFIXES, READERS, load_point_cloud
from backend.preprocess import subsample_points

# A survey sits far from the origin: 10^5 m east, 5 * 10^6 m north (UTM), millimetre detail.
SURVEY_OFFSET = np.array([412_345.678, 5_312_345.678, 231.5])


def scan(n=500, seed=0):
    """points (n, 3) float64 at the survey offset, colours (n, 3) uint8, unit normals (n, 3)."""
    rng = np.random.default_rng(seed)
    points = SURVEY_OFFSET + np.round(rng.uniform(0, 20, (n, 3)), 3)
    colours = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    normals = rng.normal(size=(n, 3))
    return points, colours, normals / np.linalg.norm(normals, axis=1, keepdims=True)


def test_every_suffix_has_a_reader():
    assert set(POINT_SUFFIXES) == set(READERS)


@pytest.mark.parametrize("suffix,point_format", [(".las", 3), (".laz", 3), (".las", 7), (".laz", 1)])
def test_las_and_laz_round_trip_points_and_16_bit_colours(tmp_path, suffix, point_format):
    points, colours, _ = scan()
    header = laspy.LasHeader(point_format=point_format, version="1.4" if point_format > 5 else "1.2")
    header.scales, header.offsets = [0.001] * 3, points.min(axis=0)
    las = laspy.LasData(header)
    las.x, las.y, las.z = points.T
    has_colour = "red" in header.point_format.dimension_names
    if has_colour:
        las.red, las.green, las.blue = (colours.astype(np.uint16) * 257).T  # full 16-bit range
    las.write(tmp_path / f"scan{suffix}")
    cloud = load_point_cloud(tmp_path / f"scan{suffix}")
    assert cloud.points.dtype == np.float64
    assert np.abs(cloud.points - points).max() < 1e-6  # millimetres at 5 * 10^6 m: exact
    if has_colour:
        assert np.abs(cloud.colors * 255 - colours).max() < 1e-3
    else:
        assert cloud.colors is None


def test_las_with_8_bit_values_in_its_16_bit_colours(tmp_path):
    """Many writers put 0..255 in LAS's 16-bit colour fields: the values decide the scale."""
    points, colours, _ = scan()
    las = laspy.LasData(laspy.LasHeader(point_format=2, version="1.2"))
    las.x, las.y, las.z = points.T
    las.red, las.green, las.blue = colours.astype(np.uint16).T
    las.write(tmp_path / "scan.las")
    assert np.abs(load_point_cloud(tmp_path / "scan.las").colors * 255 - colours).max() < 1e-3


def test_e57_round_trips_points_and_colours_of_every_scan(tmp_path):
    points, colours, _ = scan(600)
    e57 = pye57.E57(str(tmp_path / "scan.e57"), mode="w")
    for part in (slice(0, 400), slice(400, 600)):
        e57.write_scan_raw({"cartesianX": points[part, 0], "cartesianY": points[part, 1],
                            "cartesianZ": points[part, 2], "colorRed": colours[part, 0],
                            "colorGreen": colours[part, 1], "colorBlue": colours[part, 2]})
    e57.close()
    cloud = load_point_cloud(tmp_path / "scan.e57")
    # pye57 writes coordinates in single precision: compare with what float32 keeps
    assert np.allclose(cloud.points, points.astype(np.float32), rtol=0, atol=1.0)
    assert np.abs(cloud.points - points).max() <= np.spacing(np.float32(SURVEY_OFFSET.max()))
    assert np.abs(cloud.colors * 255 - colours).max() < 1e-3


@pytest.mark.parametrize("encoding,rgb_type", [("ascii", np.uint32), ("binary", np.float32),
                                               ("binary_compressed", np.float32)])
def test_pcd_round_trips_points_colours_and_normals(tmp_path, encoding, rgb_type):
    """PCL packs rgb into a float32's bits (binary) or writes it as a whole number (ascii)."""
    points, colours, normals = scan()
    local = points - SURVEY_OFFSET  # PCD stores float32: a sensor frame, not survey coordinates
    packed = pypcd4.PointCloud.encode_rgb(colours).view(np.uint32)
    fields = ("x", "y", "z", "normal_x", "normal_y", "normal_z", "rgb")
    types = (np.float32,) * 6 + (rgb_type,)
    data = [local.astype(np.float32), normals.astype(np.float32), packed.view(rgb_type).reshape(-1, 1)]
    columns = [column for block in data for column in block.T]
    pypcd4.PointCloud.from_points(columns, fields, types).save(tmp_path / "scan.pcd",
                                                              encoding=pypcd4.Encoding(encoding))
    cloud = load_point_cloud(tmp_path / "scan.pcd")
    assert np.allclose(cloud.points, local, atol=1e-5)
    assert np.abs(cloud.colors * 255 - colours).max() < 1e-3
    assert np.allclose(cloud.normals, normals, atol=1e-6)


def test_pcd_leaves_out_the_nan_points_of_an_organised_cloud(tmp_path):
    points = np.random.default_rng(0).uniform(-1, 1, (12, 3)).astype(np.float32)
    points[[2, 7]] = np.nan  # a depth camera's pixels without a measurement
    pypcd4.PointCloud.from_xyz_points(points).save(tmp_path / "depth.pcd")
    cloud = load_point_cloud(tmp_path / "depth.pcd")
    assert np.array_equal(cloud.points, np.delete(points, [2, 7], axis=0).astype(np.float64))


@pytest.mark.parametrize("encoding", ["ascii", "binary"])
def test_ply_round_trips_points_colours_and_normals(tmp_path, encoding):
    points, colours, normals = scan(200)
    local = points - SURVEY_OFFSET
    mesh = trimesh.Trimesh(local, np.array([[0, 1, 2], [2, 3, 4]]), vertex_normals=normals, process=False)
    mesh.visual.vertex_colors = np.column_stack([colours, np.full(len(colours), 255, np.uint8)])
    (tmp_path / "scan.ply").write_bytes(trimesh.exchange.ply.export_ply(mesh, encoding=encoding, vertex_normal=True))
    cloud = load_point_cloud(tmp_path / "scan.ply")
    assert np.allclose(cloud.points, local, atol=1e-5)  # trimesh writes float32
    assert np.abs(cloud.colors * 255 - colours).max() < 1e-3
    assert np.allclose(cloud.normals, normals, atol=1e-6)


def test_ply_point_cloud_without_colours(tmp_path):
    points, _, _ = scan(100)
    trimesh.PointCloud(points - SURVEY_OFFSET).export(tmp_path / "bare.ply")
    cloud = load_point_cloud(tmp_path / "bare.ply")
    assert cloud.colors is None and cloud.normals is None and len(cloud.points) == 100


def text_table(points, colours, normals, layout):
    columns = {"xyz": points, "rgb": colours.astype(np.float64), "rgb01": colours / 255.0, "n": normals,
               "i": np.full((len(points), 1), 7.0)}
    return np.column_stack([columns[name] for name in layout])


TEXT_LAYOUTS = [
    (("xyz", "rgb"), None, True, False),
    (("xyz", "rgb01"), None, True, False),
    (("xyz", "n"), None, False, True),
    (("xyz", "rgb", "n"), None, True, True),             # CloudCompare's order
    (("xyz", "n", "rgb"), None, True, True),
    (("xyz", "i", "rgb"), None, True, False),            # Leica PTS: x y z intensity r g b
    (("xyz", "n", "rgb01"), "x y z nx ny nz red green blue", True, True),
    (("xyz", "rgb"), "//X,Y,Z,R,G,B", True, False),
]


@pytest.mark.parametrize("layout,header,has_colours,has_normals", TEXT_LAYOUTS,
                         ids=["-".join(t[0]) + ("-header" if t[1] else "") for t in TEXT_LAYOUTS])
def test_text_clouds_with_colour_and_normal_columns(tmp_path, layout, header, has_colours, has_normals):
    points, colours, normals = scan()
    table = text_table(points, colours, normals, layout)
    delimiter = "," if header and "," in header else " "
    np.savetxt(tmp_path / "scan.txt", table, fmt="%.12g", delimiter=delimiter,
               header=header or "", comments="")
    cloud = load_point_cloud(tmp_path / "scan.txt")
    assert np.abs(cloud.points - points).max() < 1e-6
    assert (cloud.colors is not None) == has_colours and (cloud.normals is not None) == has_normals
    if has_colours:
        assert np.abs(cloud.colors * 255 - colours).max() < 1e-3
    if has_normals:
        assert np.allclose(cloud.normals, normals, atol=1e-6)


def test_numpy_clouds_with_colours_and_normals(tmp_path):
    points, colours, normals = scan()
    np.save(tmp_path / "scan.npy", np.column_stack([points, colours, normals]))
    cloud = load_point_cloud(tmp_path / "scan.npy")
    assert np.array_equal(cloud.points, points) and np.abs(cloud.colors * 255 - colours).max() < 1e-3
    np.savez(tmp_path / "scan.npz", points=points, colours=colours, normals=normals)
    cloud = load_point_cloud(tmp_path / "scan.npz")
    assert np.array_equal(cloud.points, points) and np.allclose(cloud.normals, normals, atol=1e-6)
    assert np.abs(cloud.colors * 255 - colours).max() < 1e-3


def test_colours_that_do_not_match_the_points_are_named(tmp_path):
    np.savez(tmp_path / "bad.npz", points=np.eye(3), colors=np.ones((2, 3)))
    with pytest.raises(InputError, match=r"bad.npz: expected colours as a \(3, 3\) array"):
        load_point_cloud(tmp_path / "bad.npz")


@pytest.mark.parametrize("module,suffix,package", [("laspy", ".las", "laspy[lazrs]"), ("laspy", ".laz", "laspy[lazrs]"),
                                                   ("pye57", ".e57", "pye57"), ("pypcd4", ".pcd", "pypcd4")])
def test_a_missing_reader_library_is_named(tmp_path, monkeypatch, module, suffix, package):
    (tmp_path / f"scan{suffix}").write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingPackageError, match=rf"reading {suffix} files needs the .* package \(pip install"):
        load_point_cloud(tmp_path / f"scan{suffix}")
    assert MissingPackageError("x", package).package == package


def test_laz_without_a_decompressor_names_lazrs(tmp_path, monkeypatch):
    points, _, _ = scan()
    las = laspy.LasData(laspy.LasHeader(point_format=1, version="1.2"))
    las.x, las.y, las.z = points.T
    las.write(tmp_path / "scan.laz")
    monkeypatch.setattr(laspy.LazBackend, "is_available", lambda self: False)
    with pytest.raises(MissingPackageError, match=r"reading .laz files needs the laspy\[lazrs\] package"):
        load_point_cloud(tmp_path / "scan.laz")


def test_a_parser_that_panics_on_a_damaged_file_is_an_input_error(tmp_path, monkeypatch):
    """lazrs (Rust) panics on some damaged LAZ files: pyo3 raises that as PanicException, a
    BaseException. It is the file's fault; a real interrupt still goes through."""
    panic = type("PanicException", (BaseException,), {})
    (tmp_path / "scan.laz").write_bytes(b"LASF" + b"\0" * 400)

    def panicking(path):
        raise panic("capacity overflow")

    monkeypatch.setitem(READERS, ".laz", panicking)
    with pytest.raises(InputError, match=r"scan\.laz: cannot read points .*capacity overflow"):
        load_point_cloud(tmp_path / "scan.laz")

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setitem(READERS, ".laz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_point_cloud(tmp_path / "scan.laz")


def test_damaged_scan_files_are_input_errors(tmp_path):
    for suffix in (".las", ".laz", ".e57", ".pcd", ".ply"):
        (tmp_path / f"junk{suffix}").write_bytes(b"\x00garbage" * 50)
        with pytest.raises(InputError, match=f"junk{suffix}"):
            load_point_cloud(tmp_path / f"junk{suffix}")


def test_subsample_covers_a_scan_whose_density_varies():
    """A scan 1000 times denser near the scanner: a random subset would leave the far half with
    about 2 of 2000 points; the covering subsample gives it nearly every one of its 200."""
    rng = np.random.default_rng(0)
    near = rng.uniform([0, 0, 0], [1, 1, 0.01], (200_000, 3))
    far = rng.uniform([1, 0, 0], [2, 1, 0.01], (200, 3))
    cloud = np.concatenate([near, far])
    subset = subsample_points(cloud, 2000)
    assert len(subset) == 2000 and len(np.unique(subset, axis=0)) == 2000
    assert (subset[:, 0] > 1).sum() >= 150
    assert np.array_equal(subset, subsample_points(cloud, 2000))  # deterministic


def test_first_of_each_is_numpys_unique_whether_it_sorts_or_tables_the_keys():
    """The covering subsample's cells: the distinct keys and where each first occurs, the same from
    the table a large scan uses as from np.unique's sort."""
    from backend import preprocess

    keys = np.random.default_rng(0).integers(0, 5000, 40_000)
    expected = np.unique(keys, return_index=True)
    for size in (5000, 10 ** 9):    # 40,000 keys in a range of 5,000: a table; of 10^9: a sort
        distinct, first = preprocess.first_of_each(keys, size)
        assert np.array_equal(distinct, expected[0]) and np.array_equal(first, expected[1])


def test_bounding_box_is_the_columns_min_and_max():
    from backend.preprocess import bounding_box

    points = np.random.default_rng(0).normal(size=(1000, 3)) * [1, 10, 100]
    lowest, highest = bounding_box(points)
    assert np.array_equal(lowest, points.min(axis=0)) and np.array_equal(highest, points.max(axis=0))


def test_the_addon_offers_every_format_the_backend_reads():
    from blender_occnet import filetypes

    assert set(filetypes.POINT_EXTENSIONS) == set(POINT_SUFFIXES)


def test_float_colours_outside_0_1_are_refused_not_guessed():
    """Arrays handed to the pipeline say their scale by their dtype (uint8, uint16, floats in [0, 1]):
    1.0 in a float array is white, never 1/255."""
    from backend.pointclouds import checked_cloud

    points = np.eye(3)
    assert np.array_equal(checked_cloud(points, np.eye(3)).colors, np.eye(3))
    assert np.allclose(checked_cloud(points, np.eye(3, dtype=np.uint8) * 255).colors, np.eye(3))
    with pytest.raises(InputError, match=r"colours as floats must lie in \[0, 1\]"):
        checked_cloud(points, np.eye(3) * 255)


def test_lying_headers_are_refused_before_anything_big_is_allocated(tmp_path):
    """One flipped field in a header must not cost gigabytes (or hours): a LAS claiming 4 billion
    VLRs or points, a PCD claiming more decompressed bytes than LZF can make."""
    import struct

    points, _, _ = scan(100)
    las = laspy.LasData(laspy.LasHeader(point_format=1, version="1.2"))
    las.x, las.y, las.z = points.T
    las.write(tmp_path / "good.las")
    data = bytearray((tmp_path / "good.las").read_bytes())
    for name, offset in (("vlrs", 100), ("points", 107)):
        forged = bytearray(data)
        struct.pack_into("<I", forged, offset, 0xFFFFFFF0)
        (tmp_path / f"{name}.las").write_bytes(forged)
        with pytest.raises(InputError, match=f"{name}.las: (damaged LAS header|the LAS header declares)"):
            load_point_cloud(tmp_path / f"{name}.las")
    pypcd4.PointCloud.from_xyz_points(points.astype(np.float32)).save(tmp_path / "good.pcd",
                                                                       encoding=pypcd4.Encoding.BINARY_COMPRESSED)
    data = (tmp_path / "good.pcd").read_bytes()
    at = data.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n")
    forged = bytearray(data)
    struct.pack_into("<I", forged, at + 4, 0xFFFFFFF0)  # the uncompressed size
    (tmp_path / "bomb.pcd").write_bytes(forged)
    with pytest.raises(InputError, match="bomb.pcd: damaged PCD"):
        load_point_cloud(tmp_path / "bomb.pcd")


def test_a_laz_chunk_table_that_lies_is_refused_not_a_crash(tmp_path):
    """lazrs aborts the whole process when an allocation fails: a flipped byte in the chunk count
    asked for 48 GB. Run in a child, so that a regression shows as a crash, not a dead test run."""
    import struct
    import subprocess

    points, _, _ = scan(100)
    las = laspy.LasData(laspy.LasHeader(point_format=2, version="1.2"))
    las.x, las.y, las.z = points.T
    las.write(tmp_path / "good.laz")
    data = bytearray((tmp_path / "good.laz").read_bytes())
    offset = struct.unpack_from("<I", data, 96)[0]
    table = struct.unpack_from("<q", data, offset)[0]
    data[table + 7] = 0xB4  # the high byte of the chunk count
    (tmp_path / "chunks.laz").write_bytes(data)
    probe = ("from backend.pointclouds import load_point_cloud\nfrom backend.errors import InputError\n"
             f"try:\n    load_point_cloud({str(tmp_path / 'chunks.laz')!r})\nexcept InputError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "chunks.laz: damaged LAZ file" in out.stdout, out.stderr[-500:]
