"""Label smoothing, Mixup and CutMix (`s2mlp/mixup.py`): exact targets, and CutMix's λ equal to the pasted area."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2mlp.mixup import mix_batch, smooth_labels


def _batch(height=7, width=5):
    """Two images of constant value 0 and 1 (so every output pixel says whose it is) and one-hot targets."""
    images = jnp.stack([jnp.zeros((height, width, 3)), jnp.ones((height, width, 3))])
    return images, jnp.eye(2, dtype=jnp.float32)


def test_smooth_labels_exact():
    targets = np.asarray(smooth_labels(jnp.array([0, 2]), 4, 0.1))
    np.testing.assert_allclose(targets, [[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(smooth_labels(jnp.array([1]), 3, 0.0)), [[0.0, 1.0, 0.0]])


def test_no_mixing_is_the_identity():
    images, targets = _batch()
    out_images, out_targets = mix_batch(jax.random.key(0), images, targets, mixup=0.0, cutmix=0.0)
    assert out_images is images and out_targets is targets


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_weight_is_the_exact_kept_area(seed):
    # Boxes centred anywhere, clipped at the border: the target weight of an image's own label must equal the
    # fraction of its pixels that stayed its own, exactly (timm's λ correction).
    images, targets = _batch()
    mixed, mixed_targets = mix_batch(jax.random.key(seed), images, targets, mixup=0.0, cutmix=1.0)
    mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
    assert set(np.unique(mixed)) <= {0.0, 1.0}  # pasted, not blended
    own = (mixed[0] == 0.0).all(-1).mean()  # image 0's pixels that are still image 0's
    assert (mixed[1] == 1.0).all(-1).mean() == own  # the same box on every image
    np.testing.assert_allclose(mixed_targets[0], [own, 1.0 - own], atol=1e-6)
    np.testing.assert_allclose(mixed_targets[1], [1.0 - own, own], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_blends_images_and_targets_with_one_lambda(seed):
    images, targets = _batch()
    mixed, mixed_targets = mix_batch(jax.random.key(seed), images, targets, mixup=0.8, cutmix=0.0)
    mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
    lam = 1.0 - mixed[0, 0, 0, 0]  # image 0 is lam * 0 + (1 - lam) * 1 everywhere
    np.testing.assert_allclose(mixed[0], 1.0 - lam, atol=1e-6)
    np.testing.assert_allclose(mixed[1], lam, atol=1e-6)
    np.testing.assert_allclose(mixed_targets, [[lam, 1 - lam], [1 - lam, lam]], atol=1e-6)
    assert 0.0 < lam < 1.0


@pytest.mark.parametrize("switch_prob, cutmix_chosen", [(0.0, False), (1.0, True)])
def test_switch_prob_picks_cutmix_or_mixup(switch_prob, cutmix_chosen):
    images, targets = _batch()
    for seed in range(5):
        mixed, _ = mix_batch(jax.random.key(seed), images, targets, mixup=0.8, cutmix=1.0, switch_prob=switch_prob)
        assert (set(np.unique(np.asarray(mixed))) <= {0.0, 1.0}) == cutmix_chosen


def test_cutmix_box_sides_are_sqrt_one_minus_lambda():
    """CutMix (Yun et al., 2019, §3.1): a box of W√(1-λ) × H√(1-λ) at a uniform random centre, clipped at the
    border. α = 10⁵ pins λ at 0.5 (std 0.0011), so every box that stays inside is 0.707 H tall and 0.707 W wide
    (timm's rand_bbox: an integer cut, ±⌊cut/2⌋ around the centre: within 2 pixels)."""
    height, width = 64, 48
    images, targets = _batch(height, width)
    cutmix = jax.jit(lambda key: mix_batch(key, images, targets, mixup=0.0, cutmix=1e5)[0])
    sides = []
    for seed in range(24):
        mixed = cutmix(jax.random.key(seed))
        pasted = np.asarray(mixed)[0, :, :, 0] == 1.0  # image 0 is all 0: its 1s came from image 1
        sides.append((pasted.any(axis=1).sum(), pasted.any(axis=0).sum()))
    assert max(h for h, _ in sides) == pytest.approx(height * np.sqrt(0.5), abs=2)
    assert max(w for _, w in sides) == pytest.approx(width * np.sqrt(0.5), abs=2)
    assert min(h * w for h, w in sides) > 0  # a box every time


def test_mixup_lambda_is_beta_alpha_alpha():
    """Mixup (Zhang et al., 2018): λ ~ Beta(α, α), symmetric about 1/2; α = 10⁵ pins it at 0.5 (std 0.0011)."""
    images, targets = _batch()
    mixup = jax.jit(lambda key: mix_batch(key, images, targets, mixup=1e5, cutmix=0.0)[0])
    lams = [1.0 - float(mixup(jax.random.key(seed))[0, 0, 0, 0]) for seed in range(8)]
    np.testing.assert_allclose(lams, 0.5, atol=0.01)


@pytest.mark.parametrize("cutmix", [False, True])
def test_each_example_mixes_images_and_targets_with_the_same_partner(cutmix):
    """Partner B-1-k (the mirrored position) for the images and the targets alike, on a batch of 5 whose image k is
    the constant k: image k's pixels are λ·k + (1-λ)·(4-k) (Mixup) or k and 4-k in the kept area's proportions
    (CutMix, on a non-square 12×20 image), and its target puts the same weights on classes k and 4-k; the middle
    example mixes with itself and keeps its one-hot target. (A batch of 2 cannot tell a mirror from a roll.)"""
    images = jnp.broadcast_to(jnp.arange(5.0)[:, None, None, None], (5, 12, 20, 1))
    alphas = {"mixup": 0.0, "cutmix": 1.0} if cutmix else {"mixup": 0.8, "cutmix": 0.0}
    out, targets = mix_batch(jax.random.key(3), images, jnp.eye(5), **alphas)
    out, targets = np.asarray(out), np.asarray(targets)
    assert 0.05 < targets[0, 0] < 0.95  # this key mixes
    for k in range(5):
        own = (out[k] == k).mean() if cutmix else None
        weight = own if cutmix else (out[k].mean() - (4 - k)) / (2 * k - 4) if k != 2 else 1.0
        expected = np.zeros(5)
        expected[k] += weight
        expected[4 - k] += 1 - weight
        np.testing.assert_allclose(targets[k], expected, atol=1e-6, err_msg=str(k))
