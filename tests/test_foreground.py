"""Where the object's mask comes from (backend.foreground): the user's mask, the alpha channel, or
an estimate for a picture of an object on a plain or gradient background, with its confidence."""

import numpy as np
import pytest

from backend.foreground import estimate_foreground, object_mask, user_mask


def gradient_picture(size=160, seed=0, noise=0.01):
    """(H, W, 3) a diagonal colour gradient with noise, a shaded red disc and a blue bar, and the
    true object mask (H, W)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / (size - 1)
    picture = np.stack([0.75 + 0.2 * cols, 0.8 - 0.1 * rows, 0.7 + 0.1 * cols * rows], axis=-1)
    disc = (rows - 0.45) ** 2 + (cols - 0.5) ** 2 < 0.25 ** 2
    bar = (rows > 0.6) & (rows < 0.8) & (cols > 0.2) & (cols < 0.35)
    shade = 0.5 + 0.5 * (1.0 - rows)
    picture[disc] = np.stack([0.8 * shade, 0.15 * shade, 0.1 * shade], axis=-1)[disc]
    picture[bar] = [0.1, 0.2, 0.7]
    picture = np.clip(picture + rng.normal(0, noise, picture.shape), 0, 1)
    return picture, disc | bar


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_an_object_on_a_gradient_background_is_found():
    picture, truth = gradient_picture()
    found = estimate_foreground(picture)
    assert found.source == "estimate"
    assert iou(found.mask, truth) > 0.95
    assert found.confidence > 0.6 and not found.touches_border


def test_a_busy_background_gets_a_low_confidence():
    rng = np.random.default_rng(1)
    picture = rng.uniform(0, 1, (120, 120, 3))
    picture[40:80, 40:80] = [1.0, 0.0, 0.0]
    assert estimate_foreground(picture).confidence < 0.25


def test_an_object_cut_off_by_the_frame_is_reported():
    picture, truth = gradient_picture()
    cropped = picture[:, 40:]          # the disc now runs into the left edge
    found = estimate_foreground(cropped)
    assert found.touches_border


def test_alpha_wins_over_the_estimate_and_the_user_mask_over_both():
    picture, truth = gradient_picture()
    rgba = np.concatenate([picture, truth[..., None].astype(float)], axis=-1)
    assert object_mask(rgba).source == "alpha"
    assert (object_mask(rgba).mask == truth).all()
    user = np.zeros(truth.shape)
    user[10:20, 10:20] = 1.0
    chosen = object_mask(rgba, user)
    assert chosen.source == "user" and chosen.mask.sum() == 100
    opaque = np.concatenate([picture, np.ones(truth.shape + (1,))], axis=-1)
    assert object_mask(opaque).source == "estimate"


def test_a_user_mask_of_other_proportions_is_refused():
    picture, _ = gradient_picture()
    rgba = np.concatenate([picture, np.ones(picture.shape[:2] + (1,))], axis=-1)
    with pytest.raises(ValueError, match="same proportions"):
        object_mask(rgba, np.ones((10, 20)))


def test_a_user_mask_picture_of_the_pictures_proportions_is_scaled_to_it():
    """A mask made at full size for a picture the reader scaled down (or the other way round), as an
    RGBA picture (alpha = object) or as a white-on-black picture: nearest-pixel resampled."""
    opaque = np.ones((40, 60, 4))
    half = np.zeros((20, 30, 4))
    half[5:15, 10:20, 3] = 1.0
    expected = np.zeros((40, 60), bool)
    expected[10:30, 20:40] = True
    assert (user_mask(half, (40, 60)) == expected).all()
    white_on_black = np.zeros((80, 120, 3), np.uint8)
    white_on_black[20:60, 40:80] = 255
    assert (object_mask(opaque, white_on_black).mask == expected).all()


def test_a_photo_on_a_busy_background_gets_its_mask_from_the_salient_object_network():
    """A bright object on a busy photo: the background model gives up (low confidence), U-2-Net-P
    (if onnxruntime is installed, as the test extra installs it) finds the object."""
    pytest.importorskip("onnxruntime", reason="onnxruntime (the foreground extra) is not installed")
    import skimage.data

    from backend.foreground import estimate_object

    gravel = skimage.data.gravel()[::2, ::2].astype(float) / 255.0         # 256 x 256, busy, no object
    photo = np.stack([gravel * 0.9, gravel * 0.8, gravel * 0.7], axis=-1)
    rows, cols = np.mgrid[0:256, 0:256]
    truth = (rows - 140) ** 2 / 60 ** 2 + (cols - 128) ** 2 / 45 ** 2 < 1.0
    shade = (0.6 + 0.4 * (1 - (rows - 80) / 120)).clip(0.3, 1.0)
    photo[truth] = np.stack([0.95 * shade, 0.8 * shade, 0.1 * shade], -1)[truth]
    found = estimate_object(photo)
    assert found.source == "saliency", found
    assert iou(found.mask, truth) > 0.8
