"""Augmentation-aware soft labels: the augmented views a cache stores per image, drawn once and replayed.

Vision KD trains on augmented views, and a teacher's soft label for the whole image is the wrong target
for a crop of it. As in FKD (Shen & Xing 2022) and ReLabel (Yun et al. 2021), the cache holds, per image,
`cache.views` views — each a random-resized crop and a flip, drawn by a seeded generator — with the
teacher's logits for exactly that view; the student replays the same views, so the teacher's cost is paid
once instead of every epoch.

A view is five numbers (`COLUMNS`): the crop's left and top edge and its width and height as fractions of
the image side, and 1.0 when it is mirrored. Crops are rendered by one batched affine resampling
(`torch.nn.functional.grid_sample`, bilinear), the same function for the teacher's pass and the student's
replay, so a view's pixels — and the teacher's logits for them — are reproduced bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

COLUMNS = ("x0", "y0", "width", "height", "flip")
BLOCK = 4096  # views drawn per generator seed: the draw of a row never depends on how rows are split
TRIES = 10  # torchvision's RandomResizedCrop: tries before falling back to the central crop
RENDER_ROWS = 2048  # images rendered per resampling call: bounds the float32 working memory


def draw(n_images: int, views: int, augment: dict) -> np.ndarray:
    """The views of `n_images` images, image-major (row i·V + v is view v of image i).  # (N·V, 5) float32

    RandomResizedCrop as torchvision draws it (area share from `scale`, aspect ratio log-uniform in
    `ratio`, up to 10 tries, else the central crop at the nearest allowed ratio), then a flip with
    probability 1/2 when `flip`; every block of BLOCK rows has its own generator seeded by
    (`seed`, block), so the draw is the same however the rows are later sharded."""
    rows = n_images * views
    out = [_block(augment, b)[:min(BLOCK, rows - b * BLOCK)] for b in range(-(-rows // BLOCK))]
    return np.concatenate(out) if out else np.zeros((0, len(COLUMNS)), np.float32)


def _block(augment: dict, block: int, n: int = BLOCK) -> np.ndarray:
    """BLOCK views (always all of them, so a row's draw never depends on how many follow it)."""
    rng = np.random.default_rng([int(augment["seed"]), block])
    lo, hi = augment["scale"]
    log_ratio = np.log(np.asarray(augment["ratio"], np.float64))
    area = rng.uniform(lo, hi, (n, TRIES))
    ratio = np.exp(rng.uniform(log_ratio[0], log_ratio[1], (n, TRIES)))
    w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)  # fractions of the side
    fits = (w <= 1) & (h <= 1)
    first = np.where(fits.any(axis=1), fits.argmax(axis=1), -1)  # (n,) the first try that fits
    pick = np.maximum(first, 0)
    w, h = w[np.arange(n), pick], h[np.arange(n), pick]
    central = first < 0  # no try fits: the whole image at the nearest allowed ratio
    r0 = np.clip(1.0, *np.exp(log_ratio))
    w[central], h[central] = (1.0, 1.0 / r0) if r0 >= 1 else (r0, 1.0)
    x0, y0 = rng.uniform(0, 1, n) * (1 - w), rng.uniform(0, 1, n) * (1 - h)
    flip = (rng.uniform(0, 1, n) < 0.5) & bool(augment["flip"])
    x0[central], y0[central] = (1 - w[central]) / 2, (1 - h[central]) / 2
    return np.stack([x0, y0, w, h, flip.astype(np.float64)], axis=1).astype(np.float32)


def _theta(params: torch.Tensor) -> torch.Tensor:
    """affine_grid matrices mapping the output square onto each crop (mirrored when flipped).  # (n, 5) -> (n, 2, 3)"""
    x0, y0, w, h, flip = params.unbind(dim=1)
    sx = torch.where(flip > 0.5, -w, w)  # a mirrored crop reads its columns right to left
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([sx, zero, 2 * x0 + w - 1], dim=1),
                        torch.stack([zero, h, 2 * y0 + h - 1], dim=1)], dim=1)


def render(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Each image's views resized back to the image's side.  # (N, C, S, S) uint8, (N·V, 5) -> (N, V, C, S, S) uint8"""
    n, c, s, _ = images.shape
    views = len(params) // max(n, 1)
    if len(params) != n * views:
        raise ValueError(f"{len(params)} views for {n} images: not a whole number per image")
    out = np.empty((n, views, c, s, s), np.uint8)
    step = max(1, RENDER_ROWS // max(views, 1))
    for i in range(0, n, step):
        src = torch.from_numpy(images[i:i + step]).float()  # (b, C, S, S)
        b = len(src)
        theta = _theta(torch.from_numpy(params[i * views:(i + b) * views]).double()).float()  # (b·V, 2, 3)
        grid = F.affine_grid(theta, [b * views, c, s, s], align_corners=False)  # (b·V, S, S, 2)
        src = src.repeat_interleave(views, dim=0)  # (b·V, C, S, S)
        view = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[i:i + b] = view.round().clamp(0, 255).to(torch.uint8).reshape(b, views, c, s, s).numpy()
    return out


def random_views(x: torch.Tensor, augment: dict) -> torch.Tensor:
    """One fresh view of each image, drawn with torch's generator (seeded and checkpointed by the training
    loop): how the teacher and the hard-label twin see the recipe online. One try per crop, clamped to
    the image.  # (B, C, S, S) float -> (B, C, S, S)"""
    b, dev = len(x), x.device
    lo, hi = augment["scale"]
    log_r = torch.log(torch.tensor(augment["ratio"], dtype=torch.float32))
    area = torch.empty(b, device=dev).uniform_(lo, hi)
    ratio = torch.exp(torch.empty(b, device=dev).uniform_(float(log_r[0]), float(log_r[1])))
    w, h = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    x0, y0 = torch.rand(b, device=dev) * (1 - w), torch.rand(b, device=dev) * (1 - h)
    flip = (torch.rand(b, device=dev) < 0.5) & bool(augment["flip"])
    theta = _theta(torch.stack([x0, y0, w, h, flip.float()], dim=1))
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def describe(views: int, augment: dict) -> str:
    """The recipe in words, for summaries and the model card."""
    lo, hi = augment["scale"]
    flip = ", mirrored half the time" if augment["flip"] else ""
    r_lo, r_hi = augment["ratio"]
    return (f"{views} view(s) per image: random-resized crops of {lo:.0%}–{hi:.0%} of the area at aspect "
            f"{r_lo:.2f}–{r_hi:.2f}{flip} (seed {augment['seed']})")

