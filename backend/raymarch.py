"""Where camera rays meet an occupancy field's surface, and how that depth moves with the network.

Differentiable Volumetric Rendering (Niemeyer et al. 2020) renders an implicit shape by finding,
for each pixel's ray, the first point where the occupancy logit f crosses the level (0: p = 0.5)
from outside to inside. The search keeps no gradients (`find_surface`); the depth's gradient comes
from implicit differentiation instead (`ImplicitDepth`): f(o + d w; theta) = level holds for every
theta, so

    dd/dtheta = -(grad_p f . w)^-1  df/dtheta,

which needs one network evaluation at the surface point, whatever the number of march steps.

Conventions: occupancy logits, positive inside; rays r = o + d w with unit directions w, so d is
the distance along the ray; points in the frame the field lives in (canonical coordinates for the
project's models, whose query box is [-0.55, 0.55]^3, docs/CONTRACTS.md). Pure torch, no bpy;
everything follows the device of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# points (R, K, 3) -> occupancy logits (R, K), any leading shape kept
Field = Callable[[torch.Tensor], torch.Tensor]

QUERY_HALF_EXTENT = 0.55        # the padded unit cube (docs/CONTRACTS.md, "Coordinates")
# Rays meeting the surface at more than about 87 degrees from its normal get no depth gradient:
# there 1 / (grad f . w) explodes, and a tiny change of the shape moves the hit point anywhere.
MIN_INCIDENCE_COSINE = 0.05


@dataclass
class SurfaceHits:
    """Result of `find_surface` for R rays: hit (R,) bool, depth (R,) distance along the ray to
    the surface (inf where there is no hit), likeliest (R,) the sampled depth where the field was
    largest (inf where the ray misses the cube): where a ray that missed came closest to the
    surface."""
    hit: torch.Tensor
    depth: torch.Tensor
    likeliest: torch.Tensor


@dataclass
class RaySurface:
    """Result of `surface_depth` for R rays, H of which hit: hit (R,) bool; depth (H,), points
    (H, 3) and logits (H,) of the hitting rays, differentiable with respect to the field's
    parameters; slope (H,) = grad_p f . w, detached."""
    hit: torch.Tensor
    depth: torch.Tensor
    points: torch.Tensor
    logits: torch.Tensor
    slope: torch.Tensor
    likeliest: torch.Tensor  # (R,) find_surface's, detached


def ray_box_interval(origins: torch.Tensor, directions: torch.Tensor,
                     half_extent: float = QUERY_HALF_EXTENT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where rays enter and leave the cube [-half_extent, half_extent]^3 (slab method).

    origins, directions (R, 3) -> near (R,), far (R,) distances along the ray (near >= 0: a ray
    that starts inside the cube enters at its origin), crosses (R,) bool: the ray meets the cube
    in front of its origin. near and far are meaningless where crosses is False."""
    # Axis-parallel rays: a tiny direction component gives huge (but correctly signed) slab
    # distances, never a division by zero.
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t0 = (-half_extent - origins) / safe
    t1 = (half_extent - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    return near, far, far > near


def first_entry(logits: torch.Tensor, level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first outside-to-inside change along each ray's samples.

    logits (R, K) at increasing depths -> index (R,) of the last outside sample before the first
    inside sample that follows an outside one, found (R,) bool. A ray that starts inside must first
    leave: its entry is the first crossing back in, as for any other ray."""
    inside = logits >= level
    entering = ~inside[:, :-1] & inside[:, 1:]                      # (R, K - 1)
    found = entering.any(dim=1)
    # argmax returns the first True; the weights make ties resolve to the earliest index.
    steps = torch.arange(entering.shape[1], 0, -1, device=logits.device)
    index = torch.argmax(entering * steps, dim=1)
    return index, found


def secant_refine(field: Field, origins: torch.Tensor, directions: torch.Tensor,
                  d_out: torch.Tensor, d_in: torch.Tensor, f_out: torch.Tensor, f_in: torch.Tensor,
                  steps: int, level: float = 0.0) -> torch.Tensor:
    """Secant steps on the bracket [d_out, d_in] (field below the level at d_out, at or above it
    at d_in), keeping the bracket: (R,) each, origins/directions (R, 3) -> depth (R,)."""
    depth = d_out - (f_out - level) * (d_in - d_out) / (f_in - f_out)
    for _ in range(steps):
        f_mid = field((origins + depth[:, None] * directions)[:, None, :])[:, 0]
        inside = f_mid >= level
        d_in, f_in = torch.where(inside, depth, d_in), torch.where(inside, f_mid, f_in)
        d_out, f_out = torch.where(inside, d_out, depth), torch.where(inside, f_out, f_mid)
        depth = d_out - (f_out - level) * (d_in - d_out) / (f_in - f_out)
    return depth


@torch.no_grad()
def find_surface(field: Field, origins: torch.Tensor, directions: torch.Tensor, n_steps: int = 64,
                 secant_steps: int = 8, half_extent: float = QUERY_HALF_EXTENT, level: float = 0.0,
                 max_points: int = 1 << 18) -> SurfaceHits:
    """First surface crossing of each ray inside the cube, without gradients.

    The field is evaluated at n_steps evenly spaced depths from where each ray enters the cube to
    where it leaves; the first outside-to-inside change of sign is refined by secant steps.
    origins, directions (R, 3), directions of unit length -> SurfaceHits (R,). Rays are marched in
    chunks of at most max_points field evaluations. A surface thinner than the step between
    samples can be missed: that is what the refining schedule of the number of steps is for."""
    count = origins.shape[0]
    depth = torch.full((count,), float("inf"), dtype=origins.dtype, device=origins.device)
    hit = torch.zeros(count, dtype=torch.bool, device=origins.device)
    likeliest = torch.full((count,), float("inf"), dtype=origins.dtype, device=origins.device)
    near, far, crosses = ray_box_interval(origins, directions, half_extent)
    chunk = max(1, max_points // n_steps)
    fractions = torch.linspace(0.0, 1.0, n_steps, dtype=origins.dtype, device=origins.device)
    for start in range(0, count, chunk):
        rays = torch.arange(start, min(start + chunk, count), device=origins.device)
        rays = rays[crosses[rays]]
        if len(rays) == 0:
            continue
        o, w = origins[rays], directions[rays]
        depths = near[rays, None] + (far[rays] - near[rays])[:, None] * fractions   # (r, K)
        logits = field(o[:, None, :] + depths[..., None] * w[:, None, :])
        likeliest[rays] = depths.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
        index, found = first_entry(logits, level)
        rays, o, w, depths, logits, index = rays[found], o[found], w[found], depths[found], logits[found], index[found]
        rows = torch.arange(len(rays), device=origins.device)
        depth[rays] = secant_refine(field, o, w, depths[rows, index], depths[rows, index + 1],
                                    logits[rows, index], logits[rows, index + 1], secant_steps, level)
        hit[rays] = True
    return SurfaceHits(hit, depth, likeliest)


class ImplicitDepth(torch.autograd.Function):
    """Identity on the marched depth; its gradient flows into the logit at the surface point.

    forward(depth (H,) detached, logits (H,) = f(p_hat; theta) with p_hat detached, slope (H,) =
    grad_p f(p_hat) . w detached, grazing (H,) bool) -> depth (H,). backward: dL/dlogits =
    -dL/dd / slope, so autograd carries dd/dtheta = -(grad_p f . w)^-1 df/dtheta on into theta;
    zero where grazing (see MIN_INCIDENCE_COSINE)."""

    @staticmethod
    def forward(ctx, depth, logits, slope, grazing):
        ctx.save_for_backward(slope, grazing)
        return depth.clone()

    @staticmethod
    def backward(ctx, grad_depth):
        slope, grazing = ctx.saved_tensors
        safe_slope = torch.where(grazing, torch.ones_like(slope), slope)
        grad_logits = torch.where(grazing, torch.zeros_like(grad_depth), -grad_depth / safe_slope)
        return None, grad_logits, None, None


def field_gradient(field: Field, points: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N,) at points (N, 3) with their graph kept, and grad_p f (N, 3); the gradient is
    itself differentiable with respect to the parameters when create_graph (normal losses)."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = field(points[:, None, :])[:, 0]
        gradient, = torch.autograd.grad(logits.sum(), points, create_graph=create_graph, retain_graph=True)
    return logits, gradient


def surface_depth(field: Field, origins: torch.Tensor, directions: torch.Tensor, n_steps: int = 64,
                  secant_steps: int = 8, half_extent: float = QUERY_HALF_EXTENT, level: float = 0.0,
                  min_incidence_cosine: float = MIN_INCIDENCE_COSINE) -> RaySurface:
    """`find_surface`, then depths and surface points differentiable with respect to the field's
    parameters by implicit differentiation. origins, directions (R, 3) -> RaySurface."""
    hits = find_surface(field, origins, directions, n_steps, secant_steps, half_extent, level)
    o, w, marched = origins[hits.hit], directions[hits.hit], hits.depth[hits.hit]
    logits, gradient = field_gradient(field, o + marched[:, None] * w)
    slope = (gradient * w).sum(dim=-1)
    # Entering the shape, f rises along the ray (slope > 0); the secant bracket guarantees it up to
    # round-off, so a non-positive slope is a graze as well.
    grazing = slope <= min_incidence_cosine * gradient.norm(dim=-1)
    depth = ImplicitDepth.apply(marched, logits, slope.detach(), grazing)
    return RaySurface(hits.hit, depth, o + depth[:, None] * w, logits, slope.detach(), hits.likeliest)
