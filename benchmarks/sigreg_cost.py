"""SIGReg cost: lean (chunked, recomputing backward) vs naive autograd, and its share of a ViT step.

python benchmarks/sigreg_cost.py [--n 4096 --dim 512 --slices 1024 --knots 17 --repeats 5]

Times are medians of forward + backward of SIGReg on (N, K) embeddings (projection included).
Extra peak memory is the peak of live tensors during forward + backward (torch's MemTracker, which
tracks CPU tensors too) minus the embeddings themselves. All numbers come from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from lejepa_scale.method.model import LeJEPAModel
from lejepa_scale.method.objective import LeJEPALoss
from lejepa_scale.method.sigreg import SIGReg


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn) -> int:
    tracker = MemTracker()
    with tracker:
        fn()
    return sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())


def sigreg_lean_vs_naive(args) -> None:
    z = torch.randn(args.n, args.dim, requires_grad=True)
    rows = {}
    for lean in (False, True):
        sigreg = SIGReg(args.slices, knots=args.knots, lean=lean)

        def step(sigreg=sigreg):
            z.grad = None
            sigreg(z, step=0).backward()

        rows[lean] = (median_seconds(step, args.repeats), peak_bytes(step) - z.numel() * 4)
    (t_naive, m_naive), (t_lean, m_lean) = rows[False], rows[True]
    print(
        f"| SIGReg fwd+bwd, N={args.n} K={args.dim} M={args.slices} T={args.knots} | naive | "
        f"{t_naive * 1e3:.0f} ms | {m_naive / 2**20:.0f} MiB |"
    )
    print(f"| | lean | {t_lean * 1e3:.0f} ms | {m_lean / 2**20:.0f} MiB |")
    ratios = f"**{t_lean / t_naive:.2f}x** time | **{m_lean / m_naive:.3f}x** extra peak memory"
    print(f"| | lean / naive | {ratios} |")


def vit_step_share(args) -> None:
    """SIGReg's share of a full ViT-S/16 LeJEPA step (2 x 224 + 6 x 96 views)."""
    torch.manual_seed(0)
    model = LeJEPAModel("vit_small_patch16_224", img_size=224, proj_dim=128)
    loss_fn = LeJEPALoss(0.05, SIGReg(args.slices))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.randn(2, args.vit_batch, 3, 224, 224)
    loc = torch.randn(6, args.vit_batch, 3, 96, 96)

    def train_step():
        out = model(g, loc)
        loss_fn(out.z_global, out.z_local, 0).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    z = torch.randn(8, args.vit_batch, 128, requires_grad=True)

    def sigreg_only():
        z.grad = None
        loss_fn.sigreg(z, step=0).backward()

    t_step = median_seconds(train_step, max(1, args.repeats // 2))
    t_sigreg = median_seconds(sigreg_only, args.repeats)
    print(
        f"| ViT-S/16 step, batch {args.vit_batch}, 2x224 + 6x96 views | full step {t_step:.2f} s | "
        f"SIGReg {t_sigreg * 1e3:.1f} ms | **{100 * t_sigreg / t_step:.2f}%** |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--slices", type=int, default=1024)
    parser.add_argument("--knots", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vit-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sigreg_lean_vs_naive(args)
    if not args.skip_vit:
        vit_step_share(args)


if __name__ == "__main__":
    main()
