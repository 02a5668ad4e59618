"""Data (folder tree, file list, mean image), transforms, running mixup,
snapshots and the non-finite guard, against independent computations."""

import os

import numpy
import pytest
from PIL import Image

import chainer
import chainer.links as L

from chainerkfac.datasets import imagenet
from chainerkfac import training
from chainerkfac import transforms
from chainerkfac import random_state


def make_tree(root, sizes=((30, 60), (20, 20), (41, 17)), classes=2):
    rng = numpy.random.RandomState(0)
    files = []
    for k in range(classes):
        folder = root / 'n{:02d}'.format(k)
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            path = folder / 'img{}.JPEG'.format(i)
            Image.fromarray(rng.randint(0, 255, (h, w, 3)).astype(
                numpy.uint8)).save(str(path))
            files.append((str(path), k))
    return files


# -- dataset ----------------------------------------------------------------

def test_tree_and_list_agree(tmp_path):
    files = make_tree(tmp_path / 'train')
    pairs, classes = imagenet.find_images(str(tmp_path / 'train'))
    assert classes == ['n00', 'n01'] and sorted(pairs) == sorted(files)
    listing = tmp_path / 'train.txt'
    listing.write_text(''.join('{} {}\n'.format(
        os.path.relpath(p, str(tmp_path)), k) for p, k in files))
    pairs2, _ = imagenet.find_images(str(listing))
    assert pairs2 == files


def test_dataset_errors_are_one_line(tmp_path):
    (tmp_path / 'empty').mkdir()
    bad = tmp_path / 'bad.txt'
    bad.write_text('a.jpg 1\nb.jpg\n')
    (tmp_path / 'a.jpg').write_bytes(b'')  # listed files must exist
    for path, message in [(tmp_path / 'none', 'no such file or directory'),
                          (tmp_path / 'empty', 'no images found'),
                          (bad, 'bad.txt:2: expected "path label"')]:
        with pytest.raises(imagenet.DatasetError) as e:
            imagenet.find_images(str(path))
        assert message in str(e.value) and '\n' not in str(e.value)


def test_resize_ignores_aspect_and_mean(tmp_path):
    files = make_tree(tmp_path / 'train')
    dataset = imagenet.ImageNetDataset(files, resize=16)
    img, label = dataset[0]
    assert img.shape == (3, 16, 16) and img.dtype == numpy.float32
    assert label == 0
    expected = numpy.zeros((3, 12, 12))
    for path, _ in files:  # independent: PIL directly
        with Image.open(path) as im:
            a = numpy.asarray(im.convert('RGB').resize((16, 16),
                                                       Image.BILINEAR))
        expected += a[:12, :12].transpose(2, 0, 1)
    expected /= len(files)
    mean = imagenet.compute_mean(dataset, crop=12, progress=False)
    numpy.testing.assert_allclose(mean, expected, rtol=1e-5)


def test_mean_cache_reused_and_invalidated(tmp_path, monkeypatch):
    files = make_tree(tmp_path / 'train')
    dataset = imagenet.ImageNetDataset(files, resize=16)
    calls = []
    original = imagenet.compute_mean

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, progress=False)
    monkeypatch.setattr(imagenet, 'compute_mean', counting)
    cache = str(tmp_path / 'out')
    a = imagenet.load_or_compute_mean(dataset, files, cache, crop=12)
    b = imagenet.load_or_compute_mean(dataset, files, cache, crop=12)
    assert len(calls) == 1 and numpy.array_equal(a, b)
    os.utime(files[0][0], ns=(1, 1))
    imagenet.load_or_compute_mean(dataset, files, cache, crop=12)
    assert len(calls) == 2


# -- transforms -------------------------------------------------------------

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


# -- running mixup ----------------------------------------------------------

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


def test_soft_cross_entropy_and_classifier():
    rng = numpy.random.RandomState(0)
    y = rng.randn(5, 3)
    t = rng.dirichlet(numpy.ones(3), 5)
    logp = y - numpy.log(numpy.exp(y).sum(1, keepdims=True))
    expected = -(t * logp).sum() / 5
    got = training.soft_cross_entropy(chainer.Variable(y), t)
    assert float(got.array) == pytest.approx(expected, rel=1e-12)
    clf = training.MixupClassifier(L.Linear(3, 3))
    x = rng.randn(5, 3).astype('f')
    raw = numpy.argmax(clf.predictor(x).array, axis=1).astype('i')
    reporter = chainer.reporter.Reporter()
    reporter.add_observer('main', clf)
    for labels, accuracy in ((raw, 1.0), ((raw + 1) % 3, 0.0)):
        observation = {}
        with reporter.scope(observation):
            loss = clf(x, t.astype('f'), labels)  # soft targets t
        assert float(observation['main/accuracy'].array) == accuracy
        expected = training.soft_cross_entropy(clf.predictor(x), t)
        assert float(loss.array) == pytest.approx(float(expected.array))


# -- snapshots and guard ----------------------------------------------------

def small_trainer(out, stop, seed=0):
    rng = numpy.random.RandomState(seed)
    model = chainer.links.Classifier(L.Linear(3, 2))
    model.predictor.W.array[...] = rng.randn(2, 3)
    opt = chainer.optimizers.SGD().setup(model)
    data = chainer.datasets.TupleDataset(
        numpy.arange(12, dtype='f').reshape(4, 3), numpy.zeros(4, 'i'))
    updater = chainer.training.updaters.StandardUpdater(
        chainer.iterators.SerialIterator(data, 2), opt)
    trainer = chainer.training.Trainer(updater, (stop, 'iteration'),
                                       out=str(out))
    trainer.extend(training.AtomicSnapshot(keep=2), trigger=(1, 'iteration'))
    return trainer


def test_snapshot_atomic_when_killed_mid_write(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path, 2)
    weights = {}

    def record(trainer):
        weights[trainer.updater.iteration] = \
            trainer.updater.get_optimizer('main').target.predictor.W.array \
            .copy()
        if trainer.updater.iteration == 2:  # killed while writing
            def dying_savez(f, **arrays):
                f.write(b'PK\x03\x04 partial')
                raise KeyboardInterrupt('killed')
            monkeypatch.setattr(numpy, 'savez', dying_savez)
    trainer.extend(record, trigger=(1, 'iteration'))
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    first = str(tmp_path / 'snapshot_iter_1')
    names = sorted(os.listdir(str(tmp_path)))
    assert names[1:] == ['snapshot_iter_1'], names
    assert names[0].startswith('.snapshot_iter_2.tmp-'), names
    assert sorted(os.listdir(first)) == ['manifest.json', 'rank_0.npz']
    # a snapshot folder whose rank file is cut short (e.g. copied half) is
    # skipped
    (tmp_path / 'snapshot_iter_3').mkdir()
    (tmp_path / 'snapshot_iter_3' / 'manifest.json').write_text(
        (tmp_path / 'snapshot_iter_1' / 'manifest.json').read_text())
    (tmp_path / 'snapshot_iter_3' / 'rank_0.npz').write_bytes(
        b'PK\x03\x04 truncated')
    assert training.find_latest_snapshot(str(tmp_path)) == first
    fresh = small_trainer(tmp_path, 4, seed=1)
    training.load_snapshot(first, fresh)
    assert fresh.updater.iteration == 1
    numpy.testing.assert_array_equal(
        fresh.updater.get_optimizer('main').target.predictor.W.array,
        weights[1])
    # the next complete snapshots remove what the killed write left
    fresh.run()
    assert sorted(os.listdir(str(tmp_path))) == [
        'snapshot_iter_3', 'snapshot_iter_4'], os.listdir(str(tmp_path))


def test_nonfinite_guard_one_line(tmp_path):
    model = chainer.links.Classifier(L.Linear(3, 2))
    opt = chainer.optimizers.SGD().setup(model)
    it = chainer.iterators.SerialIterator(
        chainer.datasets.TupleDataset(numpy.ones((4, 3), 'f'),
                                      numpy.zeros(4, 'i')), 2)
    trainer = chainer.training.Trainer(
        chainer.training.updaters.StandardUpdater(it, opt), (3, 'iteration'),
        out=str(tmp_path))
    trainer.extend(training.NonFiniteGuard())

    def poison(trainer):
        if trainer.updater.iteration == 2:
            model.predictor.b.array[1] = numpy.nan
    trainer.extend(poison, priority=10 ** 6)
    with pytest.raises(training.NonFiniteError) as e:
        trainer.run()
    assert str(e.value) == \
        'non-finite parameter /predictor/b at iteration 2'


def test_random_state_round_trip():
    rng = numpy.random.RandomState(3)
    rng.normal()
    saved = chainer.serializers.DictionarySerializer()
    random_state.serialize_random_state(saved, rng)
    expected = rng.rand(5)
    other = numpy.random.RandomState(0)
    random_state.serialize_random_state(
        chainer.serializers.NpzDeserializer(saved.target), other)
    numpy.testing.assert_array_equal(other.rand(5), expected)
