"""Surface finding along rays and the implicit depth gradient (backend/raymarch.py), checked on
analytic spheres, whose depths and derivatives are known in closed form, and on a small network
against finite differences."""

import pytest
import torch

from backend.raymarch import (MIN_INCIDENCE_COSINE, find_surface, first_entry, ray_box_interval,
                              surface_depth)


def sphere_field(radius, centre=(0.0, 0.0, 0.0), sharpness=10.0):
    """Occupancy logits of a ball: positive inside, zero on its surface."""
    centre_t = torch.tensor(centre, dtype=torch.float64)
    return lambda p: sharpness * (radius - (p - centre_t.to(p)).norm(dim=-1))


def sphere_depth(origins, directions, radius):
    """Analytic distance along unit rays to the first intersection with a ball at the origin;
    nan where the ray misses."""
    b = -(origins * directions).sum(-1)
    disc = b * b - (origins * origins).sum(-1) + radius ** 2
    return b - torch.sqrt(disc)


def targets_within(radius, count, seed):
    """Random points (<= count, 3) closer than radius to the origin."""
    points = radius * torch.randn(count, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return points[points.norm(dim=-1) < radius]


def rays_towards(targets, distance=2.0, seed=0):
    """Unit rays from random points at `distance` from the origin to targets (R, 3)."""
    g = torch.Generator().manual_seed(seed)
    eyes = torch.randn(len(targets), 3, generator=g, dtype=torch.float64)
    eyes = distance * eyes / eyes.norm(dim=-1, keepdim=True)
    directions = targets - eyes
    return eyes, directions / directions.norm(dim=-1, keepdim=True)


def test_ray_box_interval_enters_and_leaves_the_cube():
    origins = torch.tensor([[-2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    near, far, crosses = ray_box_interval(origins, directions, 0.5)
    assert crosses.tolist() == [True, True, False]
    assert near[:2].tolist() == pytest.approx([1.5, 0.0])   # from inside: enters at its origin
    assert far[:2].tolist() == pytest.approx([2.5, 0.5])


def test_first_entry_takes_the_first_outside_to_inside_change():
    logits = torch.tensor([[-1.0, -1.0, 2.0, 3.0, -1.0, 2.0],    # enters between samples 1 and 2
                           [1.0, -1.0, -1.0, 2.0, -1.0, -1.0],   # starts inside, leaves, re-enters
                           [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    index, found = first_entry(logits)
    assert found.tolist() == [True, True, False]
    assert index[:2].tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])   # training marches in float32
def test_finds_an_analytic_sphere_within_1e_3(dtype):
    radius = 0.4
    targets = targets_within(0.35, 500, seed=1)               # every ray hits the ball
    origins, directions = rays_towards(targets)
    hits = find_surface(sphere_field(radius), origins.to(dtype), directions.to(dtype), n_steps=32, secant_steps=8)
    assert hits.hit.all()
    expected = sphere_depth(origins, directions, radius)
    assert (hits.depth.double() - expected).abs().max() < 1e-3


def test_rays_that_miss_give_no_hit():
    # Three rays through the cube passing the ball of radius 0.3 at distance 0.45 (along z, x
    # and a diagonal), and one that misses the cube altogether.
    origins = torch.tensor([[0.45, 0.0, -2.0], [-2.0, 0.0, 0.45], [-2.0, -2.0, 0.45], [3.0, 3.0, 3.0]],
                           dtype=torch.float64)
    directions = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.5 ** 0.5, 0.5 ** 0.5, 0.0], [1.0, 0.0, 0.0]],
                              dtype=torch.float64)
    hits = find_surface(sphere_field(0.3), origins, directions)
    assert not hits.hit.any()
    assert torch.isinf(hits.depth).all()


def test_a_ray_that_misses_knows_where_it_came_closest():
    """`likeliest` is the sampled depth where the field was largest: for rays passing a ball,
    their closest approach to its centre, to within one step; inf for a ray that misses the cube."""
    origins = torch.tensor([[0.45, 0.0, -2.0], [-2.0, 0.0, 0.4], [3.0, 3.0, 3.0]], dtype=torch.float64)
    directions = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    hits = find_surface(sphere_field(0.3), origins, directions, n_steps=64)
    step = 1.1 / 63
    assert not hits.hit.any()
    assert hits.likeliest[:2].tolist() == pytest.approx([2.0, 2.0], abs=step)
    assert torch.isinf(hits.likeliest[2])


def test_the_nearer_of_two_surfaces_is_found():
    near_ball, far_ball = sphere_field(0.1, (0.0, 0.0, -0.3)), sphere_field(0.1, (0.0, 0.0, 0.3))
    field = lambda p: torch.maximum(near_ball(p), far_ball(p))
    origin = torch.tensor([[0.0, 0.0, -2.0]], dtype=torch.float64)
    direction = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    hits = find_surface(field, origin, direction, n_steps=64)
    assert hits.depth.item() == pytest.approx(2.0 - 0.3 - 0.1, abs=1e-4)


def test_chunked_marching_agrees_with_one_batch():
    targets = targets_within(0.25, 64, seed=4)
    origins, directions = rays_towards(targets)
    whole = find_surface(sphere_field(0.3), origins, directions, n_steps=16)
    chunked = find_surface(sphere_field(0.3), origins, directions, n_steps=16, max_points=16 * 5)
    assert torch.equal(whole.hit, chunked.hit)
    assert torch.allclose(whole.depth[whole.hit], chunked.depth[chunked.hit])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_marching_on_cuda_matches_cpu():
    targets = targets_within(0.25, 64, seed=5)
    origins, directions = rays_towards(targets)
    cpu = find_surface(sphere_field(0.3), origins, directions)
    gpu = find_surface(sphere_field(0.3), origins.cuda(), directions.cuda())
    assert torch.equal(cpu.hit, gpu.hit.cpu())
    assert torch.allclose(cpu.depth, gpu.depth.cpu())


# ---------------------------------------------------------------------------------------------
# The implicit depth gradient


def test_depth_gradient_wrt_sphere_radius_is_analytic_and_matches_finite_differences():
    targets = targets_within(0.3, 20, seed=6)
    origins, directions = rays_towards(targets)
    radius = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    surface = surface_depth(sphere_field(radius), origins, directions, n_steps=32, secant_steps=20)
    assert surface.hit.all()
    gradient, = torch.autograd.grad(surface.depth.sum(), radius)

    # d = b - sqrt(b^2 - |o|^2 + r^2)  =>  dd/dr = -r / sqrt(b^2 - |o|^2 + r^2)
    b = -(origins * directions).sum(-1)
    analytic = (-0.4 / torch.sqrt(b * b - (origins * origins).sum(-1) + 0.16)).sum()
    h = 1e-5
    plus = find_surface(sphere_field(0.4 + h), origins, directions, 32, 20).depth.sum()
    minus = find_surface(sphere_field(0.4 - h), origins, directions, 32, 20).depth.sum()
    assert gradient.item() == pytest.approx(analytic.item(), rel=1e-6)
    assert gradient.item() == pytest.approx(((plus - minus) / (2 * h)).item(), rel=1e-4)


class SmallField(torch.nn.Module):
    """A ball plus a smooth random network: a surface that is not a sphere, with weights to
    differentiate. tanh keeps the field smooth, so finite differences are clean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def forward(self, p):
        return 10.0 * (0.35 - p.norm(dim=-1)) + self.net(p).squeeze(-1)


def test_depth_gradient_of_a_network_matches_finite_differences():
    field = SmallField()
    targets = targets_within(0.15, 32, seed=7)
    origins, directions = rays_towards(targets)
    weights = torch.randn(len(targets), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    surface = surface_depth(field, origins, directions, n_steps=64, secant_steps=30)
    assert surface.hit.all()
    params = list(field.parameters())
    gradients = torch.autograd.grad((weights * surface.depth).sum(), params)

    # Directional derivative along a random direction in parameter space.
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    predicted = sum((gr * d).sum() for gr, d in zip(gradients, direction)).item()

    def loss_at(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
            depth = find_surface(field, origins, directions, 64, 30).depth
            for p, d in zip(params, direction):
                p.sub_(step * d)
        return (weights * depth).sum().item()

    h = 1e-6
    assert predicted == pytest.approx((loss_at(h) - loss_at(-h)) / (2 * h), rel=1e-4)


def test_surface_points_carry_the_depth_gradient():
    radius = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    origin = torch.tensor([[0.0, 0.0, -2.0]], dtype=torch.float64)
    direction = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    surface = surface_depth(sphere_field(radius), origin, direction, secant_steps=20)
    gradient, = torch.autograd.grad(surface.points[0, 2], radius)
    assert gradient.item() == pytest.approx(-1.0)        # a larger ball is met earlier along +z


def test_grazing_rays_get_no_gradient():
    radius = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    # Cosine of incidence sqrt(1 - (a / r)^2) for a ray passing the centre at distance a.
    cosine = MIN_INCIDENCE_COSINE / 2
    offset = 0.4 * (1 - cosine ** 2) ** 0.5
    origins = torch.tensor([[offset, 0.0, -2.0], [0.0, 0.0, -2.0]], dtype=torch.float64)
    directions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    surface = surface_depth(sphere_field(radius), origins, directions, n_steps=512, secant_steps=30)
    assert surface.hit.all()
    graze, = torch.autograd.grad(surface.depth[0], radius, retain_graph=True)
    head_on, = torch.autograd.grad(surface.depth[1], radius)
    assert graze.item() == 0.0
    assert head_on.item() == pytest.approx(-1.0)
