"""The validated configuration of the ImageNet trainer.

A config is a YAML file (read with ``yaml.safe_load``) with the sections
``data``, ``model`` (optional), ``optimizer`` and ``train``, each checked
against a dataclass schema below: an unknown key, a value of the wrong type,
a missing required value or a value out of range stops with a
:class:`ConfigError` whose message is one line, ``<file>: <dotted key>:
<problem>``, before any work starts.  ``--set key=value`` overrides go
through the same schema (the value is parsed as YAML); a bad one is named
as such: ``--set optimizer.lr=abc: optimizer.lr: expected float, got
'abc'``.

What the config pins about the data (``data.n_class`` or ``model.n_class``,
``data.n_train``) is checked against the data found
(:meth:`Config.check_data`): a number that differs from the data's stops
with one line naming both numbers and the key to change, unless the value
was given with ``--set`` (then taken as meant, and said in one line).
``data.n_class: auto`` and ``data.n_train: auto`` (or ``null``) use what the
data has; the paper's configs pin ImageNet's 1000 classes and 1,281,167
images.
"""

import dataclasses
import importlib.resources
import math
import os
import re
import typing

import yaml

from chainerkfac import errors
from chainerkfac import options
from chainerkfac import schedules

#: The packaged configs (Table 3's and ``synthetic.yaml``): package data of
#: ``chainerkfac``, found through :mod:`importlib.resources` in a checkout,
#: an editable install and a wheel alike.
CONFIGS = importlib.resources.files('chainerkfac').joinpath('configs')
CONFIG_DIR = str(CONFIGS)


class Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads YAML 1.2 floats: ``1e-3``,
    ``1e8`` and ``5E-4`` (YAML 1.1 wants a dot and a signed exponent, and
    reads them as strings)."""


Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)'
               r'[eE][-+]?[0-9]+$'),
    list('-+0123456789.'))


def load_yaml(stream: typing.Union[str, typing.TextIO]) -> typing.Any:
    return yaml.load(stream, Loader=Loader)


class ConfigError(ValueError):
    """A bad config: one line naming the file, the key and the problem."""


@dataclasses.dataclass
class DataConfig:
    train: str                     # folder tree or file list
    val: str
    root: typing.Optional[str] = None    # base of relative list paths
    # N of the epoch formula and of t_warmup = ceil(e_start N / BS): an
    # int (checked against the training images found), or auto / null: the
    # number of training images found
    n_train: typing.Optional[int] = None
    # classes (the model's outputs unless model.n_class): an int (checked
    # against the classes found), or auto: the number of classes found
    n_class: typing.Union[int, str] = 1000
    resize: int = 256
    crop: int = 224
    loaderjobs: int = 4


@dataclasses.dataclass
class ModelConfig:
    arch: str = 'resnet50'
    n_class: typing.Optional[int] = None  # None: data.n_class
    width: float = 1.0                    # ResNet50(width=...)


@dataclasses.dataclass
class OptimizerConfig:
    lr: float                      # η(0)
    momentum: float                # m(0)
    damping: float                 # γ(0)
    damping_target: float          # γ_target
    bn_damping_ratio: float        # ρ_BN
    p_decay: float
    e_start: float
    e_end: float
    weight_rescaling: bool = True
    # the paper's text, or the authors' published code (docs/optimizer.md)
    momentum_schedule: str = 'eq16'
    weight_rescaling_variant: str = 'paper'
    bn_fisher: str = 'diagonal'
    factor_dtype: str = 'float32'
    stale: str = 'eq20'
    # SP-NGD's options (docs/optimizer.md): adaptive refresh (stale is then
    # ignored) and the Fisher at sampled labels
    refresh: str = 'fixed'
    refresh_tolerance: float = 0.1
    max_interval: int = 20
    fisher: str = 'empirical'
    communicator: str = 'auto'     # auto: pure_nccl on GPUs, naive on CPU


@dataclasses.dataclass
class TrainConfig:
    batch_size: int                # global BS
    epochs: float
    mixup_alpha: float             # α_mixup (0: no mixup)
    batch_per_process: int = 32
    random_erasing: float = 0.5    # probability p
    seed: int = 0
    snapshot_interval: int = 1000  # updates
    keep_snapshots: int = 3
    val_interval: float = 1.0      # epochs
    log_interval: int = 10         # updates
    fisher_diff: bool = False      # log Diff(t) of every factor (Figure 5)
    accuracy_target: typing.Optional[float] = None
    device: str = 'auto'           # auto (GPU when CuPy sees one), cpu, gpu
    dtype: str = 'float32'         # float32, or mixed16 (Chainer's mixed
    loss_scale: float = 256.0      # precision; static loss scale)


SECTIONS = (('data', DataConfig), ('model', ModelConfig),
            ('optimizer', OptimizerConfig), ('train', TrainConfig))
CHOICES = {
    'model.arch': ('resnet50',),
    'optimizer.bn_fisher': options.BN_FISHER,
    'optimizer.momentum_schedule': options.MOMENTUM_SCHEDULES,
    'optimizer.weight_rescaling_variant': options.WEIGHT_RESCALING_VARIANTS,
    'optimizer.factor_dtype': options.FACTOR_DTYPES,
    'optimizer.stale': ('eq20', 'eq21', 'none'),
    'optimizer.refresh': options.REFRESH,
    'optimizer.fisher': options.FISHER,
    'optimizer.communicator': ('auto', 'naive', 'flat', 'non_cuda_aware',
                               'pure_nccl'),
    'train.device': ('auto', 'cpu', 'gpu'),
    'train.dtype': ('float32', 'mixed16'),
}
POSITIVE = ('data.n_train', 'data.n_class', 'data.resize', 'data.crop',
            'model.n_class', 'model.width', 'optimizer.lr',
            'optimizer.damping', 'optimizer.damping_target',
            'optimizer.bn_damping_ratio', 'optimizer.p_decay',
            'optimizer.refresh_tolerance', 'optimizer.max_interval',
            'train.batch_size', 'train.batch_per_process', 'train.epochs',
            'train.snapshot_interval', 'train.keep_snapshots',
            'train.val_interval', 'train.log_interval', 'train.loss_scale')
UNIT_INTERVAL = ('optimizer.momentum', 'train.random_erasing',
                 'train.accuracy_target')
#: Keys that also take ``auto``: use what the data has (see
#: :meth:`Config.check_data`); ``data.n_train: auto`` is stored as None.
AUTO = ('data.n_class', 'data.n_train')
NON_NEGATIVE = ('data.loaderjobs', 'optimizer.e_start', 'train.mixup_alpha',
                'train.seed')
#: Keys that may differ between a run and the snapshot it resumes from:
#: where the data and the output live, how the run is spread over processes
#: and devices, how long it runs and what it reports.  Every other key
#: defines the run (model, data, global batch BS, optimizer, schedules,
#: schemes, seeds, dtypes) and must match: see :meth:`Config.identity`.
MAY_DIFFER_ON_RESUME = (
    'data.train', 'data.val', 'data.root', 'data.loaderjobs',
    'optimizer.communicator', 'train.batch_per_process', 'train.epochs',
    'train.snapshot_interval', 'train.keep_snapshots', 'train.val_interval',
    'train.log_interval', 'train.fisher_diff', 'train.accuracy_target',
    'train.device')


@dataclasses.dataclass
class Config:
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    source: str = ''
    #: ``{dotted key: 'key=value'}`` of the ``--set`` overrides applied
    overrides: dict = dataclasses.field(default_factory=dict)

    def where(self, dotted: str) -> str:
        """Where the value of ``dotted`` came from: ``--set key=value`` or
        the config file."""
        return _where(self.source, self.overrides, dotted)

    def accumulation_steps(self, size: int) -> int:
        """BS / (per-process batch × processes)."""
        return self.train.batch_size // (self.train.batch_per_process * size)

    def t_warmup(self, n_train: typing.Optional[int] = None) -> int:
        """⌈e_start·N/BS⌉ (Table 3's column)."""
        n = n_train or self.data.n_train or schedules.IMAGENET_TRAIN_SIZE
        return schedules.warmup_iterations(
            self.optimizer.e_start, self.train.batch_size, n)

    def check_warmup(self, n_train: typing.Optional[int] = None) -> int:
        """t_warmup for ``n_train`` examples, refused with one line naming
        the keys when eq. 13-14 would leave the positive range."""
        o = self.optimizer
        t = self.t_warmup(n_train)
        bound = schedules.warmup_bound(o.damping, o.damping_target)
        if t < bound:
            raise ConfigError(
                '{}: optimizer.e_start, train.batch_size, optimizer.damping, '
                'optimizer.damping_target: the damping warmup is {} '
                'iterations (e_start {} epochs of {} examples at batch {}), '
                'but eq. 13 needs at least 2*log10(damping/damping_target) = '
                '{:.3g}, or damping turns negative: raise e_start or lower '
                'the batch or damping/damping_target'.format(
                    self.source, t, o.e_start,
                    n_train or self.data.n_train or
                    schedules.IMAGENET_TRAIN_SIZE, self.train.batch_size,
                    bound))
        return t

    def n_class(self) -> typing.Optional[int]:
        """The number of classes (the model's outputs); None while
        ``data.n_class`` is ``auto`` and not yet resolved by
        :meth:`check_data`."""
        if self.model.n_class:
            return self.model.n_class
        return self.data.n_class if isinstance(self.data.n_class, int) \
            else None

    def check_data(self, n_classes: int, n_images: int) -> typing.List[str]:
        """Checks what the config pins against the training set found:
        ``n_classes`` classes, ``n_images`` images; resolves
        ``data.n_class: auto`` to ``n_classes``.

        A pinned number of classes or of training images that differs from
        the data's raises :class:`ConfigError`, one line naming the numbers
        and the keys to change, e.g. ``.../bs32k.yaml: data.n_class 1000,
        data.n_train 1281167, but the training set has 4 classes, 160
        images: --set data.n_class=4 data.n_train=160 (or data.n_class=auto
        data.n_train=auto: what the data has)``.  A value given with
        ``--set`` is taken as meant (more classes than the data's, not
        fewer) and returned as a line to log.  Returns those lines.
        """
        notes = []
        wrong = []  # (key, pinned, found, what)
        key = 'model.n_class' if self.model.n_class else 'data.n_class'
        n_class = self.n_class()
        if n_class is None:
            self.data.n_class = n_classes
        elif n_class != n_classes:
            if key in self.overrides and n_class > n_classes:
                notes.append(
                    '{}: the training set has {} classes; the model gets {} '
                    'outputs'.format(self.where(key), n_classes, n_class))
            else:
                wrong.append((key, n_class, n_classes, 'classes'))
        n_train = self.data.n_train
        if n_train is not None and n_train != n_images:
            if 'data.n_train' in self.overrides:
                notes.append(
                    '{}: the training set has {} images; the schedules '
                    'count epochs of {}'.format(
                        self.where('data.n_train'), n_images, n_train))
            else:
                wrong.append(('data.n_train', n_train, n_images, 'images'))
        if wrong:
            keys = [k for k, _, _, _ in wrong]
            from_set = [k in self.overrides for k in keys]
            where = '--set ' + ' '.join(self.overrides[k] for k in keys) \
                if all(from_set) else self.source
            auto = [k + '=auto' for k in keys if k.startswith('data.')]
            raise ConfigError(
                '{}: {}, but the training set has {}: --set {}{}'.format(
                    where,
                    ', '.join('{} {}{}'.format(
                        k, pinned, ' (--set)' if s and not all(from_set)
                        else '')
                        for (k, pinned, _, _), s in zip(wrong, from_set)),
                    ', '.join('{} {}'.format(n, what)
                              for _, _, n, what in wrong),
                    ' '.join('{}={}'.format(k, n) for k, _, n, _ in wrong),
                    ' (or {}: what the data has)'.format(' '.join(auto))
                    if auto else ''))
        return notes

    def first_update_note(self, size: int) -> typing.Optional[str]:
        """One line saying how many passes one update takes on ``size``
        processes, when it takes more than one (None otherwise)."""
        k = self.accumulation_steps(size)
        if k <= 1:
            return None
        t = self.train
        return ('each update accumulates {} passes of {} images per process '
                '(BS {} = {} x {} processes x {}): the first update ends '
                'after {} passes, the first log line after {}'.format(
                    k, t.batch_per_process, t.batch_size,
                    t.batch_per_process, size, k, k, k * t.log_interval))

    def identity(self, n_examples: int) -> dict:
        """What a snapshot must share with this config to be resumed by it:
        ``{dotted key: value}`` of every key not in
        :data:`MAY_DIFFER_ON_RESUME` (``data.n_class`` and ``model.n_class``
        as the one number of classes ``n_class``) and ``data.examples``, the
        number of training examples found (the data may move, not
        change)."""
        out = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                dotted = '{}.{}'.format(section, key)
                if dotted not in MAY_DIFFER_ON_RESUME:
                    out[dotted] = value
        del out['data.n_class'], out['model.n_class']
        out['n_class'] = self.n_class()
        out['data.examples'] = int(n_examples)
        return out

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out['source'], out['overrides']
        return out


def config_names() -> typing.List[str]:
    """The file names of the packaged configs, sorted."""
    return sorted(entry.name for entry in CONFIGS.iterdir()
                  if entry.name.endswith(('.yaml', '.yml')))


def find_config(name: str) -> str:
    """``name`` if it is a file, else the packaged ``configs/<name>[.yaml]``.
    """
    if os.path.isfile(name):
        return name
    candidates = [name]
    if not name.endswith(('.yaml', '.yml')):
        candidates.append(name + '.yaml')
    for candidate in candidates:
        entry = CONFIGS.joinpath(candidate)
        if entry.is_file():
            return str(entry)
    raise ConfigError('{}: config not found (looked in . and {})'.format(
        name, CONFIG_DIR))


def _type_name(tp):
    args = typing.get_args(tp)
    if args:
        return ' or '.join(_type_name(a) for a in args
                           if a is not type(None)) + ' or null'
    return tp.__name__


def _coerce(value, tp):
    """``value`` as ``tp`` (int accepted for float), or raise TypeError."""
    args = typing.get_args(tp)
    if args:  # Optional[x]
        if value is None:
            return None
        return _coerce(value, args[0])
    if tp is float and isinstance(value, int) and \
            not isinstance(value, bool):
        value = float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise TypeError('expected {}, got {!r}'.format(_type_name(tp), value))
    if tp is float and not math.isfinite(value):
        raise TypeError('expected a finite number, got {!r}'.format(value))
    return value


def _where(source, overrides, dotted):
    """``--set key=value`` when ``dotted`` was overridden, else the file."""
    if dotted in overrides:
        return '--set ' + overrides[dotted]
    return source


def _section(source, name, cls, values, overrides=None):
    overrides = overrides or {}
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError('{}: {}: expected a mapping, got {!r}'.format(
            source, name, values))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            dotted = '{}.{}'.format(name, key)
            raise ConfigError('{}: {}: unknown key (known: {})'.format(
                _where(source, overrides, dotted), dotted,
                ', '.join(fields)))
    kwargs = {}
    for key, field in fields.items():
        dotted = '{}.{}'.format(name, key)
        if key not in values:
            if field.default is dataclasses.MISSING:
                raise ConfigError('{}: {}: missing value'.format(
                    source, dotted))
            continue
        value, tp = values[key], field.type
        if dotted in AUTO:
            if value == 'auto':
                kwargs[key] = None if key == 'n_train' else 'auto'
                continue
            tp = typing.Optional[int] if key == 'n_train' else int
        try:
            kwargs[key] = _coerce(value, tp)
        except TypeError as e:
            problem = 'expected int or auto, got {!r}'.format(value) \
                if dotted in AUTO else str(e)
            raise ConfigError('{}: {}: {}'.format(
                _where(source, overrides, dotted), dotted, problem))
    return cls(**kwargs)


def _set(raw, override, overrides):
    """Applies one ``dotted.key=value`` override to the raw mapping and
    records it in ``overrides``; a bad one is a :class:`ConfigError`
    naming it."""
    if '=' not in override:
        raise ConfigError('--set {}: expected key=value'.format(override))
    key, text = override.split('=', 1)
    key = key.strip()
    parts = key.split('.')
    sections = dict(SECTIONS)
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError('--set {}: {}: unknown key (sections: {})'.format(
            override, key, ', '.join(sections)))
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        raise ConfigError('--set {}: {}: cannot parse {!r}'.format(
            override, key, text))
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError('--set {}: {}: expected a mapping'.format(
            override, parts[0]))
    section[parts[1]] = value
    overrides[key] = override


def _check_ranges(config, size):
    def value(dotted):
        section, key = dotted.split('.')
        return getattr(getattr(config, section), key)

    def fail(dotted, problem, other=None):
        # a bound between two keys: blamed on the one given with --set
        where = config.where(dotted)
        if other is not None and where == config.source:
            where = config.where(other)
        raise ConfigError('{}: {}: {}'.format(where, dotted, problem))

    for dotted, choices in CHOICES.items():
        if value(dotted) not in choices:
            fail(dotted, '{!r} is not one of {}'.format(
                value(dotted), ', '.join(choices)))
    for dotted in POSITIVE:
        v = value(dotted)
        if v is not None and v != 'auto' and not v > 0:
            fail(dotted, 'must be positive, got {}'.format(v))
    for dotted in UNIT_INTERVAL:
        v = value(dotted)
        if v is not None and not 0 <= v <= 1:
            fail(dotted, 'must be in [0, 1], got {}'.format(v))
    for dotted in NON_NEGATIVE:
        if value(dotted) < 0:
            fail(dotted, 'must be >= 0, got {}'.format(value(dotted)))
    o, t, d = config.optimizer, config.train, config.data
    if o.momentum >= 1:
        fail('optimizer.momentum', 'must be < 1, got {}'.format(o.momentum))
    if o.damping_target > o.damping:
        fail('optimizer.damping_target', '{} > damping {}'.format(
            o.damping_target, o.damping), 'optimizer.damping')
    if o.e_end <= o.e_start:
        fail('optimizer.e_end', '{} <= e_start {}'.format(
            o.e_end, o.e_start), 'optimizer.e_start')
    if d.crop > d.resize:
        fail('data.crop', '{} > resize {}'.format(d.crop, d.resize),
             'data.resize')
    per_update = t.batch_per_process * size
    if t.batch_size % per_update:
        fail('train.batch_size', '{} is not divisible by batch_per_process '
             '{} x {} processes'.format(t.batch_size, t.batch_per_process,
                                        size))


def load_config(name: str, overrides: typing.Iterable[str] = (),
                size: int = 1) -> Config:
    """The :class:`Config` of file ``name`` with ``overrides`` applied.

    Args:
        name: a path, or the name of a packaged config
            (:func:`config_names`).
        overrides: ``'section.key=value'`` strings (``--set``).
        size (int): number of processes (the batch must divide).
    """
    source = find_config(name)
    try:
        with open(source) as f:
            raw = load_yaml(f)
    except yaml.YAMLError as e:
        raise ConfigError('{}: not valid YAML: {}'.format(
            source, errors.one_line(e)))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError('{}: expected a mapping of sections'.format(source))
    overridden = {}
    for override in overrides:
        _set(raw, override, overridden)
    sections = dict(SECTIONS)
    for key in raw:
        if key not in sections:
            raise ConfigError('{}: {}: unknown key (known: {})'.format(
                source, key, ', '.join(sections)))
    parts = {}
    for name_, cls in SECTIONS:
        if name_ not in raw and name_ != 'model':
            raise ConfigError('{}: {}: missing section'.format(source, name_))
        parts[name_] = _section(source, name_, cls, raw.get(name_),
                                overridden)
    config = Config(source=source, overrides=overridden, **parts)
    _check_ranges(config, size)
    if config.data.n_train:
        config.check_warmup()
    return config
