"""Writes the example inputs shipped in this folder (our own procedural shapes, no third-party data).

    python examples/make_examples.py
"""

from pathlib import Path

import numpy as np
import trimesh

HERE = Path(__file__).resolve().parent


def chair() -> trimesh.Trimesh:
    """A simple chair made of boxes, 1 unit tall, Z up (Blender's convention)."""
    parts = [trimesh.creation.box((0.5, 0.5, 0.06), trimesh.transformations.translation_matrix((0, 0, 0.45)))]
    parts.append(trimesh.creation.box((0.5, 0.06, 0.5), trimesh.transformations.translation_matrix((0, 0.22, 0.73))))
    for x in (-0.21, 0.21):
        for y in (-0.21, 0.21):
            parts.append(trimesh.creation.box((0.06, 0.06, 0.42), trimesh.transformations.translation_matrix((x, y, 0.21))))
    return trimesh.util.concatenate(parts)


def main() -> None:
    rng = np.random.default_rng(7)
    points, _ = trimesh.sample.sample_surface(chair(), 3000, seed=7)
    points = points + rng.normal(scale=0.005, size=points.shape)
    np.savetxt(HERE / "chair_points.xyz", points, fmt="%.5f")


if __name__ == "__main__":
    main()
