"""Crop, flip, normalize, random erasing and running mixup
(chainerkfac.transforms)."""

import numpy

import chainer

from chainerkfac import transforms


def test_crop_flip_normalize_exact():
    img = numpy.arange(3 * 10 * 12, dtype=numpy.float32).reshape(3, 10, 12)
    rng = numpy.random.RandomState(0)
    seen = set()
    for _ in range(500):
        state = rng.get_state()
        out = transforms.random_crop(img, 4, rng)
        probe = numpy.random.RandomState(0)
        probe.set_state(state)
        top, left = probe.randint(0, 7), probe.randint(0, 9)
        numpy.testing.assert_array_equal(out,
                                         img[:, top:top + 4, left:left + 4])
        seen.add((top, left))
    assert len(seen) == 7 * 9  # every position occurs
    numpy.testing.assert_array_equal(transforms.center_crop(img, 4),
                                     img[:, 3:7, 4:8])
    flips = [transforms.random_flip(img, rng) for _ in range(200)]
    flipped = [f for f in flips if not numpy.array_equal(f, img)]
    assert 60 < len(flipped) < 140
    numpy.testing.assert_array_equal(flipped[0], img[:, :, ::-1])
    mean = numpy.full_like(img, 7.)
    numpy.testing.assert_allclose(transforms.normalize(img, mean),
                                  (img - 7.) / 255.)


def test_random_erasing_statistics():
    rng = numpy.random.RandomState(1)
    img = numpy.ones((3, 40, 50), numpy.float32)
    erased, tall, wide = 0, 0, 0
    for _ in range(2000):
        out = transforms.random_erasing(img, rng)
        assert numpy.array_equal(img, numpy.ones_like(img))  # not in place
        zero = out[0] == 0
        if not zero.any():
            assert numpy.array_equal(out, img)
            continue
        erased += 1
        rows, cols = numpy.nonzero(zero)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert zero.sum() == h * w and (out[:, zero] == 0).all()
        assert (out[:, ~zero] == 1).all()
        area = h * w / 2000.
        assert 0.02 * 0.8 <= area <= 0.25 * 1.2, area
        assert 0.3 * 0.7 <= h / w <= 1 / 0.3 * 1.3, (h, w)
        tall += h > w
        wide += w > h
    assert abs(erased / 2000. - 0.5) < 0.03
    assert tall > 100 and wide > 100
    batch = transforms.erase_batch(numpy.ones((64, 3, 40, 50), 'f'), rng)
    patterns = {tuple(numpy.nonzero(x[0] == 0)[0][:1]) for x in batch}
    assert len(patterns) > 5  # each image drawn independently


def test_transformed_dataset_reproducible():
    base = [(numpy.random.RandomState(i).rand(3, 12, 12).astype('f'),
             numpy.int32(i)) for i in range(4)]
    t = transforms.TrainTransform(numpy.zeros((3, 12, 12), 'f'), crop=8)
    a = transforms.TransformedDataset(base, t, seed=3)
    b = transforms.TransformedDataset(base, t, seed=3)
    assert all(numpy.array_equal(a[i][0], b[i][0]) for i in range(4))
    first = [a[i][0] for i in range(4)]
    a.set_epoch(1)
    assert any(not numpy.array_equal(first[i], a[i][0]) for i in range(4))


def test_running_mixup_recurrence():
    alpha, seed = 0.4, 5
    lams = numpy.random.RandomState(seed).beta(alpha, alpha, size=2)
    rng = numpy.random.RandomState(0)
    xs = [rng.rand(4, 3).astype('f') for _ in range(3)]
    ts = [rng.randint(0, 3, 4) for _ in range(3)]
    eye = numpy.eye(3, dtype='f')
    mix = transforms.RunningMixup(alpha, 3, seed=seed)
    x1, y1 = mix(xs[0], ts[0])
    numpy.testing.assert_array_equal(x1, xs[0])
    numpy.testing.assert_array_equal(y1, eye[ts[0]])
    hx, hy = xs[0], eye[ts[0]]
    for step in (1, 2):
        lam = numpy.float32(lams[step - 1])
        hx = lam * xs[step] + (1 - lam) * hx
        hy = lam * eye[ts[step]] + (1 - lam) * hy
        x, y = mix(xs[step], ts[step])
        numpy.testing.assert_allclose(x, hx, rtol=1e-6)
        numpy.testing.assert_allclose(y, hy, rtol=1e-6)
    off = transforms.RunningMixup(0, 3)
    off(xs[0], ts[0])
    x, y = off(xs[1], ts[1])
    assert numpy.array_equal(x, xs[1]) and numpy.array_equal(y, eye[ts[1]])


def test_running_mixup_serialization_continues():
    rng = numpy.random.RandomState(0)
    batches = [(rng.rand(4, 3).astype('f'), rng.randint(0, 3, 4))
               for _ in range(4)]
    a = transforms.RunningMixup(0.6, 3, seed=1)
    for x, t in batches[:2]:
        a(x, t)
    saved = chainer.serializers.DictionarySerializer()
    a.serialize(saved)
    b = transforms.RunningMixup(0.6, 3, seed=99)
    b.serialize(chainer.serializers.NpzDeserializer(saved.target))
    for x, t in batches[2:]:
        xa, ya = a(x, t)
        xb, yb = b(x, t)
        assert numpy.array_equal(xa, xb) and numpy.array_equal(ya, yb)
