"""Binary-boundary helpers for EdgeMetrics, in torch (CPU or GPU, batched):
- `thin`: MATLAB `bwmorph(x, 'thin', Inf)` (Guo-Hall two-subiteration thinning, the algorithm bwmorph documents
  via Lam, Lee & Suen 1992 p. 879; same lookup tables as skimage.morphology.thin and pyEdgeEval's bwmorph_thin).
- `edge_nms`: Piotr Dollar's `edgesNmsMex(E, O, r=1, s=5, m=1.01)` with the orientation SEISM's
  `read_one_cont_png.m` computes: O = mod(atan(Oyy*sign(-Oxy)/(Oxx+1e-5)), pi) from gradient2(convTri(E, 4)).
- `disk_offsets`: integer (dy, dx) with dy^2 + dx^2 <= radius^2 (BSDS `matchEdgeMaps`: d <= maxDist).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Neighbour k of a pixel, as (dy, dx) with y pointing down: E, NE, N, NW, W, SW, S, SE (bit k of the code).
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thin_luts() -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion tables of the two subiterations, indexed by the 8-neighbour code (Guo & Hall 1989, conditions
    G1: exactly one 4-connected 0->1 transition; G2: 2 <= min(n1, n2) <= 3; G3 / G3' pick the side)."""
    first, second = [], []
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)] + [code & 1]  # x[8] wraps to x[0]
        g1 = sum(1 for i in (0, 2, 4, 6) if not x[i] and (x[i + 1] or x[i + 2])) == 1
        n1 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[k - 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[k + 1])
        g2 = 2 <= min(n1, n2) <= 3
        g3 = not ((x[1] or x[2] or not x[7]) and x[0])
        g3p = not ((x[5] or x[6] or not x[3]) and x[4])
        first.append(g1 and g2 and g3)
        second.append(g1 and g2 and g3p)
    return torch.tensor(first), torch.tensor(second)


_LUTS = _thin_luts()


def _codes(buf: torch.Tensor, cand: torch.Tensor, offs: list[int]) -> torch.Tensor:
    """8-neighbour codes of the flat indices `cand` in the flat padded uint8 image `buf`."""
    if cand.numel() * 16 > buf.numel():  # many candidates: one dense pass is cheaper than 8 gathers
        code = torch.zeros_like(buf)
        core = slice(max(offs), buf.numel() - max(offs))
        for k, off in enumerate(offs):
            code[core] += buf[core.start + off: core.stop + off] << k
        return code[cand]
    code = torch.zeros_like(cand, dtype=torch.uint8)
    for k, off in enumerate(offs):
        code += buf[cand + off] << k
    return code


def thin_padded(buf: torch.Tensor, width: int, cand: torch.Tensor | None = None) -> None:
    """In-place bwmorph 'thin' of a flat uint8 {0,1} buffer holding images of row length `width` (= W + 2) that
    each have a zero border of one pixel (so neighbour lookups need no bounds checks). `cand`: flat indices of the
    pixels that are 1 (computed if None).

    Event driven: a pixel is (re)examined by a subiteration only if that subiteration has not examined it yet or
    one of its neighbours was deleted since. A pixel whose neighbourhood did not change cannot change its
    decision, so the result equals bwmorph's dense sweeps, while the work scales with the number of 1-pixels and
    deletions instead of (iterations x image area).
    """
    offs = [dy * width + dx for dy, dx in _NEIGHBOURS]
    offs_t = torch.tensor(offs, device=buf.device)
    luts = [lut.to(buf.device) for lut in _LUTS]
    cand = buf.nonzero()[:, 0] if cand is None else cand
    # pending candidates of subiteration 0 and 1; the first pass of subiteration 0 sees every 1-pixel and tells
    # which of them subiteration 1 would delete as things stand (the rest wait until a neighbour changes)
    todo = [cand, cand.new_zeros(0)]
    step = 0
    while todo[0].numel() or todo[1].numel():
        k = step % 2
        cand = todo[k]
        cand = cand[buf[cand] == 1]  # drop pixels deleted meanwhile
        code = _codes(buf, cand, offs).long()
        delete = luts[k][code]
        deleted = cand[delete]
        buf[deleted] = 0  # every decision above saw the state before this subiteration (parallel update)
        touched = (deleted[:, None] + offs_t).flatten()
        touched = touched[buf[touched] == 1]
        todo[k] = torch.unique(touched)
        todo[1 - k] = torch.unique(torch.cat([todo[1 - k], touched, cand[~delete & luts[1 - k][code]]]))
        step += 1


def thin(x: torch.Tensor) -> torch.Tensor:
    """Thin binary images (..., H, W) to convergence, exactly like bwmorph(x, 'thin', Inf)."""
    shape, (h, w) = x.shape, x.shape[-2:]
    buf = F.pad(x.reshape(-1, h, w).to(torch.uint8), (1, 1, 1, 1)).flatten()
    thin_padded(buf, w + 2)
    return buf.view(-1, h + 2, w + 2)[:, 1:-1, 1:-1].reshape(shape).bool()


def _symmetric_index(n: int, r: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by r on both sides, mirrored with the border repeated (period 2n)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _conv_tri(x: torch.Tensor, r: int) -> torch.Tensor:
    """Piotr's convTri(I, r) for integer r > 1: separable [1 .. r+1 .. 1]/(r+1)^2 filter with 'symmetric' padding
    (border pixel repeated: MATLAB padarray 'symmetric', the mex's mirrored indices). The triangle is applied as
    two box filters of width r+1 (avg_pool), which is the same filter and much faster than a 1-channel conv."""
    h, w = x.shape[-2:]
    xp = x[:, _symmetric_index(h, r, x.device)][:, :, _symmetric_index(w, r, x.device)][:, None]
    for kernel in ((r + 1, 1), (r + 1, 1), (1, r + 1), (1, r + 1)):
        xp = F.avg_pool2d(xp, kernel, stride=1)
    return xp[:, 0]


def _gradient2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Piotr's gradient2: central differences inside, one-sided at the border (= torch.gradient). Returns
    (d/dx along columns, d/dy along rows)."""
    gy, gx = torch.gradient(x, dim=(-2, -1))
    return gx, gy


def edge_nms(e: torch.Tensor, r: int = 1, s: int = 5, m: float = 1.01) -> torch.Tensor:
    """Non-maximum suppression of (B, H, W) edge strengths in [0, 1], as SEISM `read_one_cont_png.m` does it
    before thresholding (BDET's copy; no convTri(E, 1) pre-smoothing there, unlike some HED/RCF scripts).
    Float32 like the mex; matches pyEdgeEval's Cython port of edgesNmsMex except for rare float ties."""
    e = e.float()
    b, h, w = e.shape
    ox, oy = _gradient2(_conv_tri(e, 4))
    oxx, _ = _gradient2(ox)
    oxy, oyy = _gradient2(oy)
    o = torch.remainder(torch.atan(oyy * torch.sign(-oxy) / (oxx + 1e-5)), math.pi)
    undefined = torch.isnan(o)  # 0/0: in C every comparison with NaN is false, so the pixel is kept
    o = torch.where(undefined, 0.0, o)
    cos_o, sin_o = torch.cos(o), torch.sin(o)
    ys = torch.arange(h, device=e.device, dtype=e.dtype)[:, None]
    xs = torch.arange(w, device=e.device, dtype=e.dtype)[None, :]
    scaled = e * m
    suppressed = torch.zeros_like(e, dtype=torch.bool)
    for d in [d for d in range(-r, r + 1) if d]:
        # bilinear sample at (x + d cos o, y + d sin o) with the mex's coordinate clamp [0, size - 1.001];
        # grid_sample(align_corners=True) maps -1..1 onto pixel centres 0..size-1
        gx = (xs + d * cos_o).clamp_(0, w - 1.001).mul_(2 / max(w - 1, 1)).sub_(1)
        gy = (ys + d * sin_o).clamp_(0, h - 1.001).mul_(2 / max(h - 1, 1)).sub_(1)
        e0 = F.grid_sample(e[:, None], torch.stack([gx, gy], -1), mode="bilinear", align_corners=True)[:, 0]
        suppressed |= scaled < e0
    out = torch.where(suppressed & ~undefined, 0.0, e)
    # fade out the s-pixel frame: columns x < s scaled by x/s (both sides), then rows likewise
    s = min(s, w // 2, h // 2)
    if s > 0:
        wx = (torch.minimum(xs, w - 1 - xs) / s).clamp(max=1)
        wy = (torch.minimum(ys, h - 1 - ys) / s).clamp(max=1)
        out = out * wx * wy
    return out


def disk_offsets(radius: float, device=None) -> torch.Tensor:
    """(K, 2) integer offsets (dy, dx) within Euclidean distance `radius` (inclusive)."""
    r = int(math.ceil(radius))
    d = torch.arange(-r, r + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    inside = dy**2 + dx**2 <= radius**2
    return torch.stack([dy[inside], dx[inside]], 1)
