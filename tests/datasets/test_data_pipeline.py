"""Data (folder tree, file list, mean image), the classifier, snapshots
and the non-finite guard, against independent computations."""

import os

import numpy
import pytest
from PIL import Image

import chainer
import chainer.links as L

from chainerkfac.datasets import imagenet
from chainerkfac import training
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


def test_mean_image_pass_is_announced_in_one_logged_line(
        tmp_path, monkeypatch, caplog, capsys):
    """The pass says what it reads before it starts (the trainer's logger,
    no terminal control codes); a long one reports its progress."""
    files = make_tree(tmp_path / 'train')
    dataset = imagenet.ImageNetDataset(files, resize=16)
    with caplog.at_level('INFO', logger='chainerkfac.trainer'):
        imagenet.compute_mean(dataset, crop=12)
    assert caplog.messages == [
        'mean image: reading the 6 training images once (6 per process, 1 '
        'processes) before the first update']
    assert capsys.readouterr().err == ''
    caplog.clear()
    monkeypatch.setattr(imagenet, 'PROGRESS_SECONDS', 0.0)
    with caplog.at_level('INFO', logger='chainerkfac.trainer'):
        imagenet.compute_mean(dataset, crop=12)
    assert caplog.messages[1].startswith('mean image: 1 of 6 (')
    assert caplog.messages[-1].startswith('mean image: done in ')


# -- transforms -------------------------------------------------------------


# -- running mixup ----------------------------------------------------------


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
