"""Teacher–student wrapper that trains (and prunes) a student with KD."""
import copy
import inspect
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import CheckpointLoader
from mmengine.utils import import_modules_from_strings

from .checkpoint import STUDENT, student_state_dict
from .presets import build_distill_cfg
from .shrink import BaseKeep, ShrunkSource, follow_item
from .sources import (codebase_of, fetch, head_path, record, resolve_source,
                      source_channels)

_SHORT_NAMES = {'KLDivergence': 'kl', 'ChannelWiseDivergence': 'cwd',
                'CIRKDLoss': 'cirkd', 'BinaryKLDivergence': 'kl'}


def build_teacher(config: Union[str, dict],
                  checkpoint: Optional[str] = None) -> nn.Module:
    """Build a model from a config file (or dict) and load its checkpoint.

    The config's ``custom_imports`` are imported and its ``default_scope``
    is used while building. If the config's model is a CPDDistiller, its
    student is built. The checkpoint may itself be a distillation
    checkpoint (its student is used). Without a checkpoint the model's own
    ``init_weights`` (e.g. a ``Pretrained`` init_cfg) initialises it.
    """
    cfg = Config.fromfile(config) if isinstance(config, str) \
        else Config(config)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    model_cfg = cfg.model
    if model_cfg.get('type') in ('CPDDistiller', CPDDistiller):
        model_cfg = model_cfg.student
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        model = MODELS.build(model_cfg)
    if checkpoint is None:
        model.init_weights()
    else:
        ckpt = CheckpointLoader.load_checkpoint(checkpoint,
                                                map_location='cpu')
        # strict: a teacher with missing weights would teach noise
        model.load_state_dict(student_state_dict(ckpt), strict=True)
    return model


def _shapes(preds) -> str:
    if isinstance(preds, (list, tuple)):
        return f'{len(preds)} levels ' + ', '.join(
            str(tuple(p.shape)) for p in preds)
    return str(tuple(preds.shape))


def _apply_loss(loss_fn, preds_S, preds_T, labels):
    """One distillation loss on a pair of sources.

    Multi-level sources (lists of per-level maps) go whole to losses that
    declare ``multi_level = True``; other losses run per level and their
    values (or dict entries) are summed over levels, as one loss item per
    FPN level would be.
    """
    multi = [isinstance(p, (list, tuple)) for p in (preds_S, preds_T)]
    if not any(multi):
        return loss_fn(preds_S, preds_T, labels)
    if not all(multi) or len(preds_S) != len(preds_T):
        raise ValueError('a multi-level source must be paired with one of '
                         'as many levels')
    if getattr(loss_fn, 'multi_level', False):
        return loss_fn(list(preds_S), list(preds_T), labels)
    outs = [loss_fn(s, t, labels) for s, t in zip(preds_S, preds_T)]
    if isinstance(outs[0], dict):
        return {k: sum(o[k] for o in outs) for k in outs[0]}
    return sum(outs)


@MODELS.register_module()
class CPDDistiller(BaseModel):
    """Train a student with its own losses plus distillation from a teacher.

    ``loss`` (hence ``train_step``, also under DDP) runs the student's
    ordinary ``loss(inputs, data_samples)`` once, with forward hooks
    capturing the student sources, then the teacher's
    ``forward(mode='tensor')`` in eval mode under ``no_grad`` with hooks on
    the teacher sources, and adds each distillation loss as
    ``loss_kd_<name>`` (or ``loss_kd_<name>_<term>`` for losses returning a
    dict) to the student's losses. The student therefore runs once per step
    and its task losses are exactly those of the plain model.
    ``val_step``, ``test_step`` and ``forward`` in the ``'predict'`` and
    ``'tensor'`` modes delegate to the student, so upstream evaluators work.

    Args:
        student (dict | nn.Module): the student model config, built with
            mmengine ``MODELS.build`` in the current default scope (so
            MMPretrain, MMSegmentation and MMDetection configs work). Its
            ``data_preprocessor`` is the distiller's. Available as
            ``self.student`` (the pruning hook finds it there).
        teacher (str | dict | nn.Module): ``'self'`` (default): a frozen
            deep copy of the student made at construction, i.e. before
            pruning changes the student; its weights follow the student's
            initialisation (see Note). ``dict(config=<path or dict>,
            checkpoint=<path>)``: any model, e.g. a larger sibling, built by
            :func:`build_teacher`. The teacher gets the student's
            preprocessed inputs, so both must expect the same normalisation.
        distill (str | list[dict]): a preset name, ``'kl'``, ``'cwd'``,
            ``'cirkd'`` or ``'none'`` (see :func:`build_distill_cfg`), or a
            list of ``dict(type=<loss>, student=<source>, teacher=<source>,
            name=<log name, optional>, **loss args)``; sources are described
            in :mod:`cpd_mm.distill.sources`; a multi-level source (FPN
            levels) goes whole to a loss with ``multi_level = True``, other
            losses run per level and are summed. Loss arguments
            ``num_classes``, ``student_channels`` and ``teacher_channels``
            (and ``ignore_index`` for losses that need labels, i.e. CIRKD)
            are read from the models when a loss takes them and the item
            does not give them. Defaults to ``'kl'``.
        init_cfg (dict, optional): unused (the student has its own).
        data_preprocessor (dict, optional): the config's top-level
            ``data_preprocessor`` that training tools inject into the model
            dict; it goes to the student unless the student has its own.

    Note:
        - State dict layout: ``student.*``, ``teacher.*``,
          ``distill_losses.<i>.*``. Resuming restores all three, including
          the teacher='self' snapshot and CIRKD's memories. To use a
          checkpoint as a plain student see :mod:`cpd_mm.distill.checkpoint`
          (``student_state_dict`` or the ``student://`` prefix).
        - Loading a *plain* student state dict into the distiller (e.g.
          ``load_from`` a trained model) maps it onto ``student.*`` and, for
          teacher='self', onto ``teacher.*`` as well.
        - ``init_weights`` initialises the student and then, for
          teacher='self', copies the student's weights into the teacher, so
          a student ``init_cfg=dict(type='Pretrained', ...)`` also sets the
          teacher. An external teacher is never re-initialised.
        - With ``distill='none'`` no teacher is built or run.
        - When pruning removes student channels physically mid-run, call
          :meth:`follow_student_shrink` (docs/distill_shrink.md).
    """

    def __init__(self,
                 student: Union[dict, nn.Module],
                 teacher: Union[str, dict, nn.Module] = 'self',
                 distill: Union[str, List[dict]] = 'kl',
                 init_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        if isinstance(student, dict) and data_preprocessor is not None:
            # the runner injects the config's top-level data_preprocessor
            # into the model dict: it belongs to the student
            student = dict(student)
            student.setdefault('data_preprocessor', data_preprocessor)
        self.student = student if isinstance(student, nn.Module) \
            else MODELS.build(student)
        self.data_preprocessor = self.student.data_preprocessor
        items = build_distill_cfg(distill, codebase_of(self.student)) \
            if isinstance(distill, str) else [dict(d) for d in distill]

        self.teacher_is_self = False
        self.teacher: Optional[nn.Module] = None
        if items:
            if teacher == 'self':
                self.teacher_is_self = True
                self.teacher = copy.deepcopy(self.student)
            elif isinstance(teacher, dict):
                if 'config' not in teacher:
                    raise ValueError('`teacher` dict needs a `config` key, '
                                     f'but got keys {sorted(teacher)}')
                self.teacher = build_teacher(**teacher)
            elif isinstance(teacher, nn.Module):
                self.teacher = teacher
            else:
                raise ValueError("`teacher` must be 'self', a dict(config="
                                 f'..., checkpoint=...) or a module, but got '
                                 f'{teacher!r}')
            self.teacher.requires_grad_(False)
            self.teacher.eval()

        self.distill_losses = nn.ModuleList()
        self.distill_specs: List[dict] = []
        # item index -> channels left in its student source (plain data,
        # outside the state dict: see follow_student_shrink)
        self._shrunk: Dict[int, ShrunkSource] = {}
        self._student_shrunk = False  # the teacher keeps the original size
        for index, item in enumerate(items):
            self._add_item(index, item)
        # a plain student checkpoint must land on student.* (and teacher.*)
        self._register_load_state_dict_pre_hook(self._load_plain_student)

    def _add_item(self, index: int, item: dict) -> None:
        """Validate one ``distill`` item, complete it and build its loss."""
        for key in ('type', 'student', 'teacher'):
            if key not in item:
                raise ValueError(f'distill item {index} needs a `{key}` '
                                 f'key, but got {item}')
        spec = dict(student=item.pop('student'), teacher=item.pop('teacher'))
        resolve_source(self.student, spec['student'])
        resolve_source(self.teacher, spec['teacher'])
        loss_type = item['type']
        loss_cls = loss_type if inspect.isclass(loss_type) \
            else MODELS.get(loss_type)
        if loss_cls is None:
            raise ValueError(f'distill item {index}: unknown loss type '
                             f'{loss_type!r}')
        params = inspect.signature(loss_cls).parameters
        inferred = dict(
            num_classes=lambda: getattr(
                self.student.get_submodule(head_path(self.student)),
                'num_classes', None),
            ignore_index=lambda: getattr(
                self.student.get_submodule(head_path(self.student)),
                'ignore_index', None),
            student_channels=lambda: source_channels(self.student,
                                                     spec['student']),
            teacher_channels=lambda: source_channels(self.teacher,
                                                     spec['teacher']))
        if not getattr(loss_cls, 'requires_labels', False):
            # e.g. KLDivergence distils every pixel unless told otherwise
            inferred.pop('ignore_index')
        for arg, infer in inferred.items():
            if arg in params and arg not in item:
                value = infer()
                if value is None and params[arg].default is \
                        inspect.Parameter.empty:
                    raise ValueError(f'distill item {index} '
                                     f'({loss_cls.__name__}): cannot read '
                                     f'`{arg}` from the models; give it')
                if value is not None:
                    item[arg] = value
        name = item.pop('name', None) or _SHORT_NAMES.get(
            loss_cls.__name__, loss_cls.__name__.lower())
        if name in [s['name'] for s in self.distill_specs]:
            name = f'{name}{index}'
        spec['name'] = name
        self.distill_specs.append(spec)
        self.distill_losses.append(MODELS.build(item))

    # ---------------------------------------------------------------- train
    def loss(self, inputs: torch.Tensor, data_samples: list) -> Dict:
        """Student losses plus ``loss_kd_*`` distillation losses."""
        specs = self.distill_specs
        with record(self.student, [s['student'] for s in specs]) as s_out:
            losses = self.student.loss(inputs, data_samples)
        if not specs:
            return losses
        with torch.no_grad(), record(self.teacher,
                                     [s['teacher'] for s in specs]) as t_out:
            self.teacher(inputs, data_samples, mode='tensor')
        labels = self._label_map(data_samples, inputs.device)
        for index, (spec, loss_fn) in enumerate(zip(specs,
                                                    self.distill_losses)):
            preds_S = fetch(s_out, self.student, spec['student'], 'student')
            preds_T = fetch(t_out, self.teacher, spec['teacher'], 'teacher')
            shrunk = self._shrunk.get(index)
            try:
                if shrunk is not None and not shrunk.connector:
                    preds_T = shrunk.select_teacher(preds_S, preds_T)
                out = _apply_loss(loss_fn, preds_S, preds_T, labels)
            except ValueError as err:
                raise ValueError(
                    f"distill '{spec['name']}': student '{spec['student']}' "
                    f"{_shapes(preds_S)}, teacher '{spec['teacher']}' "
                    f'{_shapes(preds_T)}: {err}') from err
            if isinstance(out, dict):
                for term, value in out.items():
                    losses[f"loss_kd_{spec['name']}_{term}"] = value
            else:
                losses[f"loss_kd_{spec['name']}"] = out
        return losses

    def follow_student_shrink(self, base_keep: BaseKeep) -> None:
        """Adapt the distillation to a student whose channels were removed.

        Call it right after the student was physically shrunk (and, on
        resume, on the freshly built distiller once its student is pruned to
        the plan, before the checkpoint's weights are loaded). The distiller
        must have been built on the unpruned student (so a ``'self'``
        teacher and the loss widths are the original ones).

        Args:
            base_keep: ``base_keep(path, kind)`` for a module path and kind
                (``'output'`` / ``'input'``, as :func:`~cpd_mm.distill.
                sources.resolve_source` gives them) returns, per call of the
                module and per tensor (one tensor, or the tensors of a tuple
                output), a bool mask over that tensor's channels *in the
                original student* (True: still present), or None where
                nothing was removed. Masks are absolute, so calling again
                with the same masks changes nothing and later calls may only
                remove more. :func:`~cpd_mm.distill.shrink.
                base_keep_from_comb` builds it from a comb and a keep mask.

        For every item whose student source lost channels: a loss with
        ``shrink_student_channels(keep)`` (a connector from the student's
        width: :class:`CIRKDLoss`'s projection head) gets the mask relative
        to its current width and slices the connector alike (same value:
        removed channels were zero in the gated student); for any other
        loss (channel c against channel c: CWD, KL on features) the
        teacher's source is from then on indexed by the kept positions
        along the channel axis, i.e. the gated loss recomputed on the kept
        channels (normalisers count the kept channels: CWD divides by N·C'
        instead of N·C; see :mod:`cpd_mm.distill.shrink`). The state is
        plain data outside the ``state_dict``; the 'self' teacher keeps the
        original width (``init_weights`` no longer copies the student).

        Raises:
            ValueError: a mask removes channels of the ``'logits'`` source
                (model outputs are never pruned), brings back channels that
                were removed, or a connector loss's levels lost different
                channels.
        """
        # check every item first: a bad mask leaves the distiller as it was
        found = [follow_item(self.student, spec, loss_fn, base_keep,
                             self._shrunk.get(index))
                 for index, (spec, loss_fn) in enumerate(
                     zip(self.distill_specs, self.distill_losses))]
        # new containers, never written in place: a structural copy of the
        # distiller (the shrink's probes) shares them with the original
        state = dict(self._shrunk)
        for index, (shrunk, connector_keep) in enumerate(found):
            if connector_keep is not None:
                self.distill_losses[index].shrink_student_channels(
                    connector_keep)
            if shrunk is not None:
                state[index] = shrunk
        self._shrunk = state
        self._student_shrunk = True

    @staticmethod
    def _label_map(data_samples, device) -> Optional[torch.Tensor]:
        """(N, H, W) segmentation labels, or None for other tasks."""
        if not data_samples or not all(
                hasattr(ds, 'gt_sem_seg') for ds in data_samples):
            return None
        return torch.stack([ds.gt_sem_seg.data[0] for ds in data_samples
                            ]).to(device)

    # ----------------------------------------------------- student delegates
    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        """``'loss'`` distils; ``'predict'`` and ``'tensor'`` are the
        student's."""
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        return self.student(inputs, data_samples, mode=mode)

    def val_step(self, data):
        """The student's ``val_step``."""
        return self.student.val_step(data)

    def test_step(self, data):
        """The student's ``test_step``."""
        return self.student.test_step(data)

    def train(self, mode: bool = True) -> 'CPDDistiller':
        """Set the mode of the student; the teacher always stays in eval."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --------------------------------------------------- weights and loading
    def init_weights(self) -> None:
        """Initialise the student; a 'self' teacher then copies it, unless
        the student was shrunk (:meth:`follow_student_shrink`): the teacher
        keeps the unpruned weights (a resumed run loads them)."""
        self.student.init_weights()
        if self.teacher_is_self and not self._student_shrunk:
            self.sync_teacher()
        self._is_init = True

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Copy the student's current weights into the 'self' teacher.

        Student entries the teacher lacks (e.g. pruning gates added after
        construction) are skipped; a teacher entry the student lacks is an
        error, since the teacher would keep its old values.
        """
        if self._student_shrunk:
            raise RuntimeError(
                'cannot copy the student into the teacher: the student was '
                'shrunk (follow_student_shrink) and the teacher keeps the '
                'original width; copy before pruning starts')
        result = self.teacher.load_state_dict(self.student.state_dict(),
                                              strict=False)
        if result.missing_keys:
            raise RuntimeError(
                'cannot copy the student into the teacher: the student has '
                f'no {result.missing_keys[:5]} any more; call sync_teacher '
                'before modules are replaced')

    def _load_plain_student(self, state_dict, prefix, *args) -> None:
        own = [k for k in state_dict if k.startswith(prefix)]
        if not own or any(k.startswith(prefix + STUDENT) for k in own):
            return
        for key in own:
            value = state_dict.pop(key)
            rest = key[len(prefix):]
            state_dict[prefix + STUDENT + rest] = value
            if self.teacher_is_self:
                state_dict[prefix + 'teacher.' + rest] = value
        if not self.teacher_is_self and self.teacher is not None:
            # an external teacher keeps the weights of its own checkpoint:
            # not "missing" from a plain student checkpoint
            for k, v in self.teacher.state_dict().items():
                state_dict.setdefault(prefix + 'teacher.' + k, v)
