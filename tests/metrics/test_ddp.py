"""Every metric under DDP: 2 CPU processes (gloo) each update with part of the data; compute() on both ranks must
equal the single-process result. Batches are split unevenly (2 vs 1) so list states of different sizes are gathered."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densediff.metrics import (
    DepthMetrics,
    EdgeMetrics,
    IntrinsicMetrics,
    NormalMetrics,
    SaliencyMetrics,
    SegmentationMetrics,
)

WORLD = 2


def _cases():
    """(name, metric factory, batches) with deterministic data, identical in every process."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    depth = [(rand(2, 8, 10), rand(2, 8, 10) * 5 + 0.1, rand(2, 8, 10) > 0.2) for _ in range(3)]
    normals = []
    for i in range(3):
        target = rand(2, 3, 6, 7) - 0.5
        normals.append((target + 0.3 * (rand(2, 3, 6, 7) - 0.5), target, rand(2, 6, 7) > 0.3 * (i + 1)))
    seg = [((rand(2, 9, 9) * 5).long(), (rand(2, 9, 9) * 6).long()) for _ in range(3)]
    sal = [(rand(2, 9, 9), (rand(2, 9, 9) > 0.6).long()) for _ in range(3)]
    edges = [(rand(1, 24, 24), (rand(1, 24, 24) > 0.85).float()) for _ in range(3)]
    intrinsic = [(rand(2, 3, 5, 5), rand(2, 3, 5, 5)) for _ in range(3)]
    return [
        ("depth", lambda: DepthMetrics(), depth),
        ("normals_pixels", lambda: NormalMetrics("pixels"), normals),
        ("normals_images", lambda: NormalMetrics("images"), normals),
        ("segmentation", lambda: SegmentationMetrics(5), seg),
        ("saliency", lambda: SaliencyMetrics(), sal),
        ("edges", lambda: EdgeMetrics(max_dist=0.05, num_thresholds=9), edges),  # one-to-one (default)
        ("edges_distance", lambda: EdgeMetrics(max_dist=0.05, num_thresholds=9, matching="distance"), edges),
        ("intrinsic", lambda: IntrinsicMetrics(), intrinsic),
    ]


def _compute_all(rank=0, world=1):
    out = {}
    for name, factory, batches in _cases():
        metric = factory()
        for i, batch in enumerate(batches):
            if i % world == rank:
                metric.update(*batch)
        out[name] = {k: v.clone() for k, v in metric.compute().items()}
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(_compute_all(rank, WORLD), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process(tmp_path):
    expected = _compute_all()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, values in expected.items():
            assert got[name].keys() == values.keys(), name
            for key, value in values.items():
                torch.testing.assert_close(got[name][key], value, rtol=1e-6, atol=1e-6, equal_nan=True,
                                           msg=f"{name}/{key} on rank {rank}")
