"""Unpack Sweet Home 3D furniture catalogs (.sh3f) into a folder of GLB meshes for training.prepare.

    python -m training.sweethome3d CATALOG.sh3f [CATALOG.sh3f ...] OUT_DIR

Debian's package `sweethome3d-furniture` holds five catalogs (820 models: tables, chairs, lamps,
sofas, beds, kitchen items, people, vehicles); ../shared/data/README.md says how to fetch it. A
catalog is a zip of multi-part OBJ models plus `PluginFurnitureCatalog.properties`, which names
each model, its category, an optional rotation into Sweet Home 3D's frame and the size the
application stretches it to. Each model is written as OUT_DIR/<catalog>_<model>.glb in that frame
(y up, front towards +z: glTF's convention, which training.meshprep turns into z up), and
OUT_DIR/catalog.json records name, category, creator and licence per model, for the model card's
attributions (four of the five catalogs are CC BY 3.0).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CATALOG_FILE = "PluginFurnitureCatalog.properties"


@dataclass(frozen=True)
class FurnitureModel:
    id: str
    name: str
    category: str
    creator: str
    licence: str
    model_path: str  # inside the catalog zip, without the leading "/"
    rotation: tuple[float, ...]  # row-major 3x3, Sweet Home 3D's modelRotation (identity if absent)
    size: tuple[float, float, float]  # width (x), height (y), depth (z) in cm


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties text -> {key: value} (comments, blank lines and \\uXXXX escapes handled;
    the catalogs here use no line continuations)."""
    entries = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        entries[key.strip()] = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), value.strip())
    return entries


def catalog_field(properties: dict[str, str], index: int, name: str, default: str = "") -> str:
    """The value of `name#index`, the catalog's key for one model's field."""
    return properties.get(f"{name}#{index}", default)


def catalog_models(properties: dict[str, str], catalog_name: str) -> list[FurnitureModel]:
    """The models a catalog's properties list, in index order."""
    indices = sorted(int(key.split("#", 1)[1]) for key in properties if key.startswith("model#"))
    models = []
    for index in indices:
        field = functools.partial(catalog_field, properties, index)
        rotation = tuple(float(v) for v in field("modelRotation", "1 0 0 0 1 0 0 0 1").split())
        if len(rotation) != 9:
            raise ValueError(f"{catalog_name}: modelRotation#{index} has {len(rotation)} numbers, not 9")
        local_id = field("id", str(index)).split("#")[-1]
        models.append(FurnitureModel(
            id=f"{catalog_name}_{re.sub(r'[^0-9A-Za-z]+', '_', local_id)}".lower(),
            name=field("name"),
            category=field("category"),
            creator=field("creator"),
            licence=properties.get("license", ""),
            model_path=field("model").lstrip("/"),
            rotation=rotation,
            size=(float(field("width", "0")), float(field("height", "0")), float(field("depth", "0"))),
        ))
    return models


def placed_vertices(vertices: np.ndarray, rotation: tuple[float, ...], size: tuple[float, float, float]) -> np.ndarray:
    """(V, 3) model vertices -> (V, 3) as Sweet Home 3D shows them: rotated by modelRotation, then
    each axis stretched so the bounding box has the catalog's width : height : depth (a zero size
    leaves that axis's proportion as it is). Units stay arbitrary; training.prepare normalises."""
    rotated = vertices @ np.asarray(rotation, dtype=np.float64).reshape(3, 3).T
    extent = rotated.max(axis=0) - rotated.min(axis=0)
    target = np.asarray(size, dtype=np.float64)
    if np.all(target > 0) and np.all(extent > 0):
        stretch = target / extent
        rotated = rotated * (stretch / stretch.max())
    return rotated


def convert_model(model: FurnitureModel, unpacked: Path, out_dir: Path) -> None:
    """Load one OBJ (all parts, materials skipped: the renderer draws its own looks), place it and
    write OUT_DIR/<id>.glb atomically."""
    import trimesh

    mesh = trimesh.load(str(unpacked / model.model_path), force="mesh", process=False, skip_materials=True)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{model.model_path}: no triangles")
    vertices = placed_vertices(np.asarray(mesh.vertices, dtype=np.float64), model.rotation, model.size)
    placed = trimesh.Trimesh(vertices, np.asarray(mesh.faces), process=False)
    temp = out_dir / f".{model.id}.glb.part"
    temp.write_bytes(placed.export(file_type="glb"))
    temp.replace(out_dir / f"{model.id}.glb")


def unpack_catalog(catalog: Path, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Convert every model of one .sh3f; returns (records, failures). Models already converted
    are kept, so a second run only does what is missing."""
    catalog_name = catalog.stem.lower().replace("-", "_")
    records, failures = [], []
    with tempfile.TemporaryDirectory() as temp_dir, zipfile.ZipFile(catalog) as archive:
        archive.extractall(temp_dir)
        properties = parse_properties((Path(temp_dir) / CATALOG_FILE).read_text(encoding="latin-1"))
        for model in catalog_models(properties, catalog_name):
            record = {**asdict(model), "catalog": catalog.name}
            try:
                if not (out_dir / f"{model.id}.glb").is_file():
                    convert_model(model, Path(temp_dir), out_dir)
                records.append(record)
            except Exception as exc:  # noqa: BLE001  (one broken model must not stop the catalog)
                failures.append({**record, "error": f"{type(exc).__name__}: {exc}"})
    return records, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="CATALOG.sh3f ... OUT_DIR")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give at least one .sh3f catalog and the output folder")
    *catalogs, out_dir = args.paths
    missing = [str(c) for c in catalogs if not c.is_file()]
    if missing:
        parser.error(f"no such catalog: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    records, failures = [], []
    for catalog in catalogs:
        converted, failed = unpack_catalog(catalog, out_dir)
        records += converted
        failures += failed
        print(f"{catalog.name}: {len(converted)} models, {len(failed)} failed", flush=True)
    # A .json, not a mesh suffix, so training.prepare's folder scan ignores it.
    (out_dir / "catalog.json").write_text(json.dumps({"models": records, "failures": failures}, indent=1))
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
