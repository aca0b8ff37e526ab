"""The view cache's augmentations: drawn reproducibly whatever the sharding, inside the image, rendered
exactly (an identity view is the image, a flipped one its mirror), and the online draws the teacher trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_core.config_sections import AugmentParams
from kd_core.tasks.image import views

AUGMENT = AugmentParams().model_dump(mode="json")


def test_draw_is_seeded_image_major_and_independent_of_how_many_images() -> None:
    a = views.draw(5000, 3, AUGMENT)
    assert a.shape == (15_000, 5) and a.dtype == np.float32
    np.testing.assert_array_equal(a, views.draw(5000, 3, AUGMENT))
    np.testing.assert_array_equal(a[:6000], views.draw(2000, 3, AUGMENT))  # a prefix draws the same rows
    assert not np.array_equal(a, views.draw(5000, 3, {**AUGMENT, "seed": 1}))


def test_drawn_crops_lie_inside_the_image_within_the_recipe() -> None:
    aug = {**AUGMENT, "scale": [0.35, 1.0], "ratio": [0.75, 1.3333]}
    v = views.draw(4000, 2, aug)
    x0, y0, w, h, flip = v.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.35 - 1e-4 and area.max() <= 1 + 1e-6
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.34
    assert 0.45 < flip.mean() < 0.55 and set(np.unique(flip)) <= {0.0, 1.0}
    assert (views.draw(100, 2, {**aug, "flip": False})[:, 4] == 0).all()


def test_identity_and_mirror_views_render_the_pixels_exactly() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 17, 17), dtype=np.uint8)
    params = np.tile(np.array([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], np.float32), (4, 1))
    out = views.render(images, params)
    assert out.shape == (4, 2, 3, 17, 17) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0], images)
    np.testing.assert_array_equal(out[:, 1], images[..., ::-1])


def test_a_crop_shows_the_region_it_names() -> None:
    """Each quarter of an image whose quarters are four flat colours is that colour (bilinear sampling
    blends the neighbour's colour into the outermost row and column only)."""
    img = np.zeros((1, 1, 16, 16), np.uint8)
    img[..., :8, :8], img[..., :8, 8:], img[..., 8:, :8], img[..., 8:, 8:] = 10, 80, 160, 240
    quarters = np.array([[0, 0, 0.5, 0.5, 0], [0.5, 0, 0.5, 0.5, 0], [0, 0.5, 0.5, 0.5, 0],
                         [0.5, 0.5, 0.5, 0.5, 0]], np.float32)
    out = views.render(img, quarters)[0, :, 0]  # (4, 16, 16)
    for got, want in zip(out, (10, 80, 160, 240), strict=True):
        assert (got[1:-1, 1:-1] == want).all()


def test_rendering_in_chunks_equals_rendering_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 1, 12, 12), dtype=np.uint8)
    params = views.draw(50, 4, AUGMENT)
    whole = views.render(images, params)
    monkeypatch.setattr(views, "RENDER_ROWS", 8)
    np.testing.assert_array_equal(views.render(images, params), whole)


def test_online_views_follow_torch_s_seed_and_keep_the_shape() -> None:
    x = torch.rand(6, 3, 20, 20) * 255
    torch.manual_seed(3)
    a = views.random_views(x, AUGMENT)
    torch.manual_seed(3)
    b = views.random_views(x, AUGMENT)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    whole = {**AUGMENT, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip": False}
    torch.testing.assert_close(views.random_views(x, whole), x, atol=1e-3, rtol=0)


def test_describe_names_the_recipe() -> None:
    assert views.describe(4, AUGMENT).startswith("4 view(s) per image: random-resized crops of 35%–100%")
