"""The random appearance of a training render, as data: drawn, applied by training.render, and
evaluated anywhere on the surface.

A look's albedo is a function of the surface point (and, for per-face patches, of the face), so
the colour of surface the picture does not show is known too: the target a texture head needs.
`draw_look` consumes the generator exactly as the renders of training.prepare always have, so the
looks of renders made before looks were recorded are recovered by replaying their seed.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

LIGHTINGS = ("STUDIO", "MATCAP", "FLAT")
LIGHTING_ODDS = (0.65, 0.3, 0.05)
PATTERNS = ("stripes", "blobs", "faces")
BLOB_CENTRES = 6


@dataclass(frozen=True)
class Pattern:
    """Two colours painted in object space (see `pattern_weights`)."""
    kind: str                   # one of PATTERNS
    palette: tuple              # two linear RGB triples
    direction: tuple = ()       # stripes: unit axis across them
    frequency: float = 0.0      # stripes: radians per canonical unit along the axis
    centres: tuple = ()         # blobs: BLOB_CENTRES points; a point takes its nearest one's parity
    face_seed: int = 0          # faces: the generator seed of each face's coin toss


@dataclass(frozen=True)
class Look:
    """One render's appearance (Blender Workbench)."""
    lighting: str               # one of LIGHTINGS
    light: int                  # index into the studio lights or matcaps; -1 for FLAT
    light_rotation: float       # studio light rotation about z (radians); 0 otherwise
    colour: tuple               # linear RGB of a single-coloured surface
    pattern: Pattern | None     # painted colours instead of the single colour
    specular: bool
    cavity: bool
    shadows: bool
    shadow_intensity: float


def hsv_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> tuple:
    hue = rng.random()
    return colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value))


def draw_pattern(rng: np.random.Generator) -> Pattern:
    palette = tuple(hsv_colour(rng, (0.0, 0.9), (0.2, 1.0)) for _ in range(2))
    kind = PATTERNS[int(rng.integers(3))]
    if kind == "stripes":
        direction = rng.normal(size=3)
        return Pattern(kind, palette, direction=tuple(direction / np.linalg.norm(direction)),
                       frequency=float(rng.uniform(6, 40)))
    if kind == "blobs":
        return Pattern(kind, palette, centres=tuple(map(tuple, rng.uniform(-0.5, 0.5, size=(BLOB_CENTRES, 3)))))
    return Pattern(kind, palette, face_seed=int(rng.integers(1 << 31)))


def draw_look(rng: np.random.Generator, studio_lights: int, matcaps: int) -> Look:
    """A random look: studio light or matcap (glossy, metallic looks), flat colour or a pattern,
    specular highlights, cavity and shadows, each switched at random. studio_lights and matcaps:
    how many of each the renderer's Blender offers (a lighting with none falls back)."""
    lighting = str(rng.choice(list(LIGHTINGS), p=list(LIGHTING_ODDS)))
    count = matcaps if lighting == "MATCAP" else studio_lights
    if lighting != "FLAT" and not count:
        lighting, count = ("STUDIO", studio_lights) if studio_lights else ("FLAT", 0)
    light = int(rng.integers(count)) if lighting != "FLAT" else -1
    rotation = float(rng.uniform(-np.pi, np.pi)) if lighting == "STUDIO" else 0.0
    colour = hsv_colour(rng, (0.0, 0.8), (0.35, 0.95))
    painted = rng.random() < 0.5
    pattern = draw_pattern(rng) if painted and lighting != "MATCAP" else None
    specular, cavity, shadows = (bool(rng.random() < odds) for odds in (0.6, 0.4, 0.3))
    return Look(lighting, light, rotation, colour, pattern, specular, cavity, shadows,
                float(rng.uniform(0.3, 0.8)))


def pattern_weights(pattern: Pattern, points: np.ndarray, faces: np.ndarray, face_count: int) -> np.ndarray:
    """(N,) 0 or 1: which palette colour the pattern paints at points (N, 3) lying on faces (N,)
    of a mesh with face_count faces (Blender's polygon numbering)."""
    if pattern.kind == "stripes":
        return (np.sin(points @ np.asarray(pattern.direction) * pattern.frequency) > 0).astype(float)
    if pattern.kind == "blobs":
        centres = np.asarray(pattern.centres)
        return (np.linalg.norm(points[:, None] - centres[None], axis=2).argmin(axis=1) % 2).astype(float)
    return (np.random.default_rng(pattern.face_seed).random(face_count) < 0.5)[faces].astype(float)


def painted(pattern: Pattern, weight: np.ndarray) -> np.ndarray:
    """(N, 3) linear RGB of the pattern's palette blended by weight (N,) (0: first, 1: second)."""
    low, high = (np.asarray(c, dtype=np.float64) for c in pattern.palette)
    return low * (1.0 - weight[:, None]) + high * weight[:, None]


def srgb(linear: np.ndarray) -> np.ndarray:
    """Linear RGB (..., 3) -> sRGB, the encoding of the renders' Standard view transform."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def barycentric(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """(N, 3) barycentric coordinates of points (N, 3) in their triangles corners (N, 3, 3)."""
    edge1, edge2, offset = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], points - corners[:, 0]
    d11, d12, d22 = (edge1 * edge1).sum(1), (edge1 * edge2).sum(1), (edge2 * edge2).sum(1)
    o1, o2 = (offset * edge1).sum(1), (offset * edge2).sum(1)
    det = np.maximum(d11 * d22 - d12 * d12, 1e-30)
    v, w = (d22 * o1 - d12 * o2) / det, (d11 * o2 - d12 * o1) / det
    return np.stack([1.0 - v - w, v, w], axis=1)


def albedo(look: Look, points: np.ndarray, corners: np.ndarray, faces: np.ndarray, face_count: int) -> np.ndarray:
    """(N, 3) the surface colour at points (N, 3) under the look, in [0, 1] sRGB: what a flat-lit
    render shows there, and the space of the pictures' own pixels. corners (N, 3, 3): each point's
    triangle, faces (N,): its index among face_count (Blender's numbering). A pattern is painted on
    the triangles' corners and blended across each triangle, as Blender draws corner colours."""
    if look.pattern is None:
        linear = np.broadcast_to(np.asarray(look.colour, dtype=np.float64), (len(points), 3))
    else:
        at_corners = pattern_weights(look.pattern, corners.reshape(-1, 3), np.repeat(faces, 3), face_count)
        linear = painted(look.pattern, (barycentric(points, corners) * at_corners.reshape(-1, 3)).sum(axis=1))
    return srgb(linear)
