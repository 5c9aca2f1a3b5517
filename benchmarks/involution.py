"""Involution forward+backward against its yardstick, on every involution shape of RedNet-26.

For each shape (224 px at batch 32, and 32 px with ``small_input`` at batch 128; fp32; NCHW inputs):

- ``portable``: the K*K-pass operator (``kdkit_plugins.involution._Involution``), the one kdkit had first;
- ``fused``: the compiled one-pass kernels: C++ on the CPU (``kdkit_plugins.involution_fused``),
  Triton on CUDA (``kdkit_plugins.involution_triton``);
- ``unfold``: the textbook form, ``F.unfold`` then a weighted sum (49 copies of the input for K=7);
- ``yardstick``: the same layer's kernel generation plus a KxK depthwise ``nn.Conv2d`` on the same
  tensor: the same multiply-adds in the aggregation with far less memory traffic.

Each variant times the whole ``Involution2d`` layer (kernel generation + aggregation), forward and
backward; variants take turns within every repeat and the medians are reported. ``roofline`` is the
aggregation's lower bound on this machine: max(bytes it must move / measured copy bandwidth,
multiply-adds / measured matmul rate), for the forward and both gradients. ``MB`` is what the layer
allocates in a forward+backward (on the CPU torch's profiler: an upper bound of its peak; on CUDA
the peak of the caching allocator above what was allocated before).

    python benchmarks/involution.py --threads 2 --repeats 5
    python benchmarks/involution.py --device cuda --repeats 20
"""
from __future__ import annotations

import argparse
import math
import os
import statistics

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (memory figures) would log every start and stop
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from kdkit_plugins import involution_fused, involution_triton  # noqa: E402
from kdkit_plugins.involution import Involution2d, _Involution  # noqa: E402
from _machine import alone  # noqa: E402
from _timing import seconds  # noqa: E402

# (label, batch, channels, size, kernel, stride): RedNet-26's involutions (stem, then stages 1-4).
SHAPES_224 = [("stem", 32, 32, 112, 3, 1), ("s1", 32, 64, 56, 7, 1), ("s2 first", 32, 128, 56, 7, 2),
              ("s2", 32, 128, 28, 7, 1), ("s3 first", 32, 256, 28, 7, 2), ("s3", 32, 256, 14, 7, 1),
              ("s4 first", 32, 512, 14, 7, 2)]
SHAPES_32 = [("stem", 128, 32, 32, 3, 1), ("s1", 128, 64, 32, 7, 1), ("s2 first", 128, 128, 32, 7, 2),
             ("s2", 128, 128, 16, 7, 1), ("s3 first", 128, 256, 16, 7, 2), ("s3", 128, 256, 8, 7, 1),
             ("s4 first", 128, 512, 8, 7, 2)]


def unfold_involution(x, kernel, kernel_size, stride):
    b, c = x.shape[:2]
    _, groups, _, h_out, w_out = kernel.shape
    patches = F.unfold(x, kernel_size, padding=(kernel_size - 1) // 2, stride=stride)
    patches = patches.view(b, groups, c // groups, kernel_size**2, h_out, w_out)
    return (patches * kernel.unsqueeze(2)).sum(3).view(b, c, h_out, w_out)


class Yardstick(nn.Module):
    """The layer's kernel generation and a depthwise convolution of the same size on the same tensor."""

    def __init__(self, layer: Involution2d, channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.layer = layer
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, stride, (kernel_size - 1) // 2, groups=channels,
                                   bias=False)

    def forward(self, x):
        return self.layer.generate_kernel(x).sum() + self.depthwise(x).sum()


def layer_with(op, layer: Involution2d):
    def forward(x):
        return op(x, layer.generate_kernel(x), layer.kernel_size, layer.stride).sum()
    return forward


def step(fn, x) -> float:
    x.grad = None
    return seconds(lambda: fn(x).backward(), x.device)


def allocated_mb(fn, x) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x).backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x).backward()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()) / 2**20


def machine_rates(device: torch.device) -> tuple[float, float]:
    """Copy bandwidth (bytes/s: read + write) and fp32 matmul rate (multiply-adds/s), best of 5."""
    size = 1024 if device.type == "cpu" else 8192
    a = torch.empty((256 if device.type == "cuda" else 64) * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    copy = min(seconds(lambda: b.copy_(a), device) for _ in range(5))
    m = torch.randn(size, size, device=device)
    matmul = min(seconds(lambda: m @ m, device) for _ in range(5))
    return 2 * a.numel() * 4 / copy, size**3 / matmul


def roofline_s(b, c, size, k, s, bandwidth, macs_per_s) -> float:
    out = math.ceil(size / s)
    x, out_elems, kernel = b * c * size * size, b * c * out * out, b * (c // 16) * k * k * out * out
    # forward: read x, kernel, write out; backward: read x, kernel, grad, write grad_x, grad_kernel
    moved = 4 * (x + kernel + out_elems + x + kernel + out_elems + x + kernel)
    macs = 3 * b * c * k * k * out * out
    return max(moved / bandwidth, macs / macs_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-unfold", action="store_true", help="leave out the (slow, memory-hungry) unfold form")
    parser.add_argument("--device", default="cpu", help="cpu (fused = the C++ kernels) or cuda (fused = Triton)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        if involution_triton.kernels() is None:
            raise SystemExit("Triton is not installed here: nothing to compare")
        fused, where = involution_triton.TritonInvolution, f"Triton on {torch.cuda.get_device_name()}"
    else:
        if involution_fused.load() is None:
            raise SystemExit("the fused involution could not be built here: nothing to compare")
        built = involution_fused.compile_seconds
        fused, where = involution_fused.FusedInvolution, f"C++, build {'%.1f s' % built if built else 'cached'}"
    bandwidth, macs_per_s = machine_rates(device)
    print(f"threads {args.threads}; fused: {where}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; fp32 matmul "
          f"{macs_per_s / 1e9:.1f} G multiply-adds/s; medians of {args.repeats}, variants interleaved; NCHW fp32")
    header = (f"{'shape':>28} | {'portable':>8} {'fused':>7} {'unfold':>7} {'yard':>7} {'roofl':>6} | "
              f"{'fused/yard':>10} {'portable/yard':>13} {'fused/roofl':>11} | MB port/fused")
    for title, shapes in (("224 px, batch 32", SHAPES_224), ("32 px small_input, batch 128", SHAPES_32)):
        print(f"\n{title}\n{header}")
        for label, b, c, size, k, s in shapes:
            layer = Involution2d(c, k, s).to(device)
            variants = {"portable": layer_with(_Involution.apply, layer), "fused": layer_with(fused.apply, layer),
                        "unfold": layer_with(unfold_involution, layer), "yard": Yardstick(layer, c, k, s)}
            if args.no_unfold:
                del variants["unfold"]
            variants["yard"].to(device)
            x = torch.randn(b, c, size, size, device=device, requires_grad=True)
            for fn in variants.values():
                step(fn, x)  # warm-up
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(step(fn, x))
            med = {name: statistics.median(t) for name, t in times.items()}
            roof = roofline_s(b, c, size, k, s, bandwidth, macs_per_s)
            memory = [allocated_mb(variants[name], x) for name in ("portable", "fused")]
            name = f"{label} {c}x{size}x{size} K{k} s{s}"
            print(f"{name:>28} | {med['portable'] * 1e3:8.1f} {med['fused'] * 1e3:7.1f} "
                  f"{med.get('unfold', math.nan) * 1e3:7.1f} {med['yard'] * 1e3:7.1f} {roof * 1e3:6.1f} | "
                  f"{med['fused'] / med['yard']:10.2f} {med['portable'] / med['yard']:13.2f} "
                  f"{med['fused'] / roof:11.1f} | {memory[0]:.0f}/{memory[1]:.0f}")
    print("\ntimes in ms for the whole layer (kernel generation + aggregation), forward + backward; "
          "roofline: the aggregation alone")


if __name__ == "__main__":
    with alone():
        main()
