"""Sweet Home 3D catalogs become GLB meshes that training.prepare reads upright, with provenance."""

import json
import zipfile

import numpy as np

from training import meshprep, sweethome3d

# A 2 x 1 x 4 box (x, y, z) as OBJ: in Sweet Home 3D's y-up frame it lies on its back until the
# catalog's modelRotation (x stays, y -> -z, z -> y) stands it up.
BOX_OBJ = "\n".join(
    [f"v {x} {y} {z}" for x in (0, 2) for y in (0, 1) for z in (0, 4)]
    + ["f 1 3 4 2", "f 5 6 8 7", "f 1 2 6 5", "f 3 7 8 4", "f 1 5 7 3", "f 2 4 8 6"]
) + "\n"

PROPERTIES = """\
# PluginFurnitureCatalog.properties
id=Test#Catalog
license=Creative Commons Attribution 3.0 Unported
id#1=Test#tall_box
name#1=Tall box \\u00e9
category#1=Office
creator#1=Someone
model#1=/test/box.obj
modelRotation#1=1 0 0 0 0 1 0 -1 0
id#2=Test#broken
name#2=Broken
category#2=Kitchen
model#2=/test/missing.obj
"""


def make_catalog(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("PluginFurnitureCatalog.properties", PROPERTIES.encode("latin-1"))
        archive.writestr("test/box.obj", BOX_OBJ)
    return path


def test_catalog_models_become_upright_glb_with_provenance(tmp_path):
    catalog = make_catalog(tmp_path / "My-Catalog.sh3f")
    out = tmp_path / "furniture"

    assert sweethome3d.main([str(catalog), str(out)]) == 0

    vertices, faces = meshprep.load_mesh(out / "my_catalog_tall_box.glb")
    extent = vertices.max(axis=0) - vertices.min(axis=0)
    # Blender's frame after the loader: width along x, depth along y, height along z.
    np.testing.assert_allclose(extent / extent.max(), [0.5, 0.25, 1.0], atol=1e-6)
    assert len(faces) == 12
    record = json.loads((out / "catalog.json").read_text())
    [model] = record["models"]
    assert (model["name"], model["category"], model["creator"]) == ("Tall box \u00e9", "Office", "Someone")
    assert model["licence"].startswith("Creative Commons Attribution 3.0")
    [failure] = record["failures"]
    assert failure["id"] == "my_catalog_broken" and "missing.obj" in failure["error"]
    assert sorted(p.name for p in out.iterdir()) == ["catalog.json", "my_catalog_tall_box.glb"]


def test_catalog_size_stretches_each_axis_to_its_proportion():
    unit_cube = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=float)
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)

    placed = sweethome3d.placed_vertices(unit_cube, identity, (30.0, 60.0, 15.0))

    np.testing.assert_allclose(placed.max(axis=0) - placed.min(axis=0), [0.5, 1.0, 0.25])
    unsized = sweethome3d.placed_vertices(unit_cube, identity, (0.0, 0.0, 0.0))
    np.testing.assert_allclose(unsized, unit_cube)
