"""Configs: Table 3 values, t_warmup, and one-line errors for bad input."""

import os

import pytest

from chainerkfac import config as config_module
from chainerkfac.config import ConfigError
from chainerkfac.config import load_config

# The paper's Table 3 (and Table 1's epochs), written out here:
# BS: (α_mixup, γ(0), γ_target, ρ_BN, t_warmup, p_decay, e_start, e_end,
#      η(0), m(0), epochs)
TABLE3 = {
    4096: (0.4, 2.5e-2, 2.5e-4, 16.0, 313, 11.0, 1, 53, 8.18e-3, 0.997, 35),
    8192: (0.4, 2.5e-2, 2.5e-4, 16.0, 157, 8.0, 1, 53.5, 1.25e-2, 0.993, 35),
    16384: (0.4, 2.5e-2, 2.5e-4, 32.0, 79, 8.0, 1, 53.5, 2.5e-2, 0.985, 35),
    32768: (0.6, 2.0e-2, 2.0e-4, 16.0, 59, 3.5, 1.5, 49.5, 3.0e-2, 0.97, 45),
    65536: (0.6, 1.5e-2, 1.5e-4, 16.0, 40, 2.9, 2, 64.5, 4.0e-2, 0.95, 60),
    131072: (1.0, 1.0e-2, 1.0e-4, 8.0, 30, 2.9, 3, 107.6, 7.0e-2, 0.93, 100),
}
FILES = {4096: 'bs4k', 8192: 'bs8k', 16384: 'bs16k', 32768: 'bs32k',
         65536: 'bs65k', 131072: 'bs131k'}

GOOD = '''
data: {train: /tmp/train, val: /tmp/val}
optimizer: {lr: 0.1, momentum: 0.9, damping: 0.02, damping_target: 0.0002,
            bn_damping_ratio: 16, p_decay: 3.5, e_start: 1, e_end: 10}
train: {batch_size: 64, batch_per_process: 32, epochs: 2, mixup_alpha: 0.4}
'''


def test_every_config_loads():
    names = sorted(f for f in os.listdir(config_module.CONFIG_DIR)
                   if f.endswith('.yaml'))
    assert len(names) == 9, names
    for name in names:
        load_config(name)


@pytest.mark.parametrize('bs', sorted(TABLE3))
def test_table3(bs):
    c = load_config(FILES[bs])
    (alpha, g0, gt, rho, t_warmup, p_decay, e_start, e_end, lr, m,
     epochs) = TABLE3[bs]
    o, t = c.optimizer, c.train
    assert t.batch_size == bs
    assert (t.mixup_alpha, o.damping, o.damping_target, o.bn_damping_ratio,
            o.p_decay, o.e_start, o.e_end, o.lr, o.momentum) == \
        (alpha, g0, gt, rho, p_decay, e_start, e_end, lr, m)
    assert t.epochs == epochs
    assert c.t_warmup() == t_warmup
    assert o.bn_fisher == 'diagonal' and o.stale == 'eq20'
    assert t.batch_per_process == 32 and c.data.n_train == 1281167
    assert c.accumulation_steps(1024) == bs // (32 * 1024)


def test_eq21_config():
    c = load_config('bs32k_eq21.yaml')
    assert c.optimizer.stale == 'eq21' and c.optimizer.bn_fisher == 'diagonal'
    assert c.train.batch_size == 32768 and c.t_warmup() == 59


def test_bare_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config('bs32k.yaml').train.batch_size == 32768
    assert load_config('bs32k').train.batch_size == 32768
    with pytest.raises(ConfigError, match='nope.yaml: config not found'):
        load_config('nope.yaml')


def write(tmp_path, text, name='c.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, GOOD)
    c = load_config(path, ['optimizer.lr=1', 'optimizer.factor_dtype=float16',
                           'train.epochs=3', 'data.train=/data/x'])
    assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)
    assert c.optimizer.factor_dtype == 'float16'
    assert c.train.epochs == 3 and c.data.train == '/data/x'
    assert c.accumulation_steps(2) == 1


BAD = [
    ('extra: 1\n', [], 'extra: unknown key'),
    ('', ['optimizer.lrr=0.1'], 'optimizer.lrr: unknown key'),
    ('', ['nosection.lr=0.1'], 'nosection.lr: unknown key'),
    ('', ['optimizer.lr=fast'], 'optimizer.lr: expected float'),
    ('', ['train.batch_size=64.0'], 'train.batch_size: expected int'),
    ('', ['optimizer.weight_rescaling=1'],
     'optimizer.weight_rescaling: expected bool'),
    ('', ['optimizer.lr=-0.1'], 'optimizer.lr: must be positive'),
    ('', ['optimizer.damping_target=0.05'],
     'optimizer.damping_target: 0.05 > damping 0.02'),
    ('', ['optimizer.e_end=1'], 'optimizer.e_end: 1.0 <= e_start 1.0'),
    ('', ['optimizer.bn_fisher=dense'], "optimizer.bn_fisher: 'dense' is not"),
    ('', ['train.random_erasing=2'], 'train.random_erasing: must be in'),
    ('', ['optimizer.momentum=1'], 'optimizer.momentum: must be < 1'),
]


@pytest.mark.parametrize('extra,sets,message', BAD)
def test_bad_configs_give_one_line(tmp_path, extra, sets, message):
    path = write(tmp_path, GOOD + extra)
    with pytest.raises(ConfigError) as e:
        load_config(path, sets)
    text = str(e.value)
    # a bad --set value is named as such, not blamed on the file
    where = '--set ' + sets[0] if sets else path
    assert '\n' not in text and text.startswith(where + ': '), text
    assert message in text, text


def test_missing_value_and_section(tmp_path):
    path = write(tmp_path, GOOD.replace('damping: 0.02, ', ''))
    with pytest.raises(ConfigError, match='optimizer.damping: missing value'):
        load_config(path)
    path = write(tmp_path, GOOD.split('\ntrain:')[0], 'd.yaml')
    with pytest.raises(ConfigError, match='train: missing section'):
        load_config(path)
    path = write(tmp_path, 'data: {train: [', 'e.yaml')
    with pytest.raises(ConfigError, match='e.yaml: not valid YAML'):
        load_config(path)


def test_batch_not_divisible(tmp_path):
    path = write(tmp_path, GOOD)
    load_config(path, size=2)
    with pytest.raises(ConfigError) as e:
        load_config(path, size=3)
    assert str(e.value) == ('{}: train.batch_size: 64 is not divisible by '
                            'batch_per_process 32 x 3 processes'.format(path))


# -- --set errors name the override -----------------------------------------

@pytest.mark.parametrize('override,line', [
    ('optimizer.lr=abc',
     "--set optimizer.lr=abc: optimizer.lr: expected float, got 'abc'"),
    ('optimizer.momentum=2', '--set optimizer.momentum=2: '
     'optimizer.momentum: must be in [0, 1], got 2.0'),
    ('optimizer.lr', '--set optimizer.lr: expected key=value'),
    ('optimizer.lr=[', "--set optimizer.lr=[: optimizer.lr: cannot parse "
     "'['"),
    ('bogus.lr=1', '--set bogus.lr=1: bogus.lr: unknown key (sections: '
     'data, model, optimizer, train)'),
    ('data.n_class=many', "--set data.n_class=many: data.n_class: expected "
     "int or auto, got 'many'"),
])
def test_set_errors_name_the_override_not_the_packaged_file(override, line):
    with pytest.raises(ConfigError) as e:
        load_config('bs32k.yaml', ['data.train=/x', override])
    assert str(e.value) == line
    assert 'bs32k.yaml' not in str(e.value)


# -- what the config pins against the data found ----------------------------

def data_error(overrides, n_classes, n_images):
    """The config bs32k.yaml with ``overrides`` and the line of its
    check against a training set of ``n_classes`` and ``n_images``."""
    c = load_config('bs32k.yaml', overrides)
    with pytest.raises(ConfigError) as e:
        c.check_data(n_classes, n_images)
    return c, str(e.value)


def test_paper_config_on_a_small_tree_is_one_line_naming_keys_and_numbers():
    c, line = data_error([], 4, 160)
    assert line == (
        '{}: data.n_class 1000, data.n_train 1281167, but the training set '
        'has 4 classes, 160 images: --set data.n_class=4 data.n_train=160 '
        '(or data.n_class=auto data.n_train=auto: what the data has)'
        .format(c.source))


def test_paper_configs_pin_imagenet_and_pass_on_it_silently():
    """Table 3's configs keep ``auto`` off: ImageNet's numbers pinned."""
    for name in FILES.values():
        c = load_config(name)
        assert c.check_data(1000, 1281167) == [], name
        assert (c.n_class(), c.data.n_train) == (1000, 1281167), name


def test_one_mismatch_names_only_its_key():
    c, line = data_error(['data.n_class=4'], 4, 160)
    assert line == (
        '{}: data.n_train 1281167, but the training set has 160 images: '
        '--set data.n_train=160 (or data.n_train=auto: what the data has)'
        .format(c.source))
    _, line = data_error(['model.n_class=2'], 4, 1281167)
    assert line == ('--set model.n_class=2: model.n_class 2, but the '
                    'training set has 4 classes: --set model.n_class=4')


def test_a_mismatch_from_file_and_set_names_the_file_and_marks_the_set():
    c, line = data_error(['data.n_class=2'], 4, 160)
    assert line == (
        '{}: data.n_class 2 (--set), data.n_train 1281167, but the training '
        'set has 4 classes, 160 images: --set data.n_class=4 data.n_train=160 '
        '(or data.n_class=auto data.n_train=auto: what the data has)'
        .format(c.source))


def test_auto_uses_what_the_data_has():
    c = load_config('bs32k.yaml', ['data.n_class=auto', 'data.n_train=auto'])
    assert c.n_class() is None and c.data.n_train is None
    assert c.check_data(4, 160) == []
    assert c.n_class() == 4 and c.data.n_class == 4
    assert c.data.n_train is None  # the schedules count the images found
    assert c.identity(160)['n_class'] == 4
    # null is auto's older spelling for data.n_train
    assert load_config('bs32k.yaml', ['data.n_train=null']).data.n_train \
        is None


def test_auto_in_a_file(tmp_path):
    path = write(tmp_path, GOOD.replace(
        'data: {train: /tmp/train, val: /tmp/val}',
        'data: {train: /tmp/train, val: /tmp/val, n_class: auto, '
        'n_train: auto}'))
    c = load_config(path)
    assert c.check_data(7, 70) == [] and c.n_class() == 7


def test_a_set_value_that_differs_from_the_data_is_taken_and_said():
    c = load_config('bs32k.yaml', ['data.n_class=10', 'data.n_train=16',
                                   'train.batch_size=32',
                                   'optimizer.e_start=10'])
    assert c.check_data(4, 160) == [
        '--set data.n_class=10: the training set has 4 classes; the model '
        'gets 10 outputs',
        '--set data.n_train=16: the training set has 160 images; the '
        'schedules count epochs of 16']
    # fewer classes than the labels need is never taken
    c = load_config('bs32k.yaml', ['data.n_class=2', 'data.n_train=auto'])
    with pytest.raises(ConfigError, match='--set data.n_class=2: '
                       'data.n_class 2, but the training set has 4 classes'):
        c.check_data(4, 160)


def test_a_bound_between_two_keys_is_blamed_on_the_override():
    with pytest.raises(ConfigError) as e:
        load_config('bs32k.yaml', ['optimizer.e_start=100'])
    assert str(e.value) == ('--set optimizer.e_start=100: optimizer.e_end: '
                            '49.5 <= e_start 100.0')


def test_first_update_note_counts_the_accumulation_passes():
    c = load_config('bs32k.yaml')
    assert c.first_update_note(1024) is None
    assert c.first_update_note(2) == (
        'each update accumulates 512 passes of 32 images per process '
        '(BS 32768 = 32 x 2 processes x 512): the first update ends after '
        '512 passes, the first log line after 5120')
