"""Record a model's real forward pass at the aten level.

Why a ``TorchDispatchMode`` and not ``torch.fx`` or the autograd graph:
MMPretrain/MMSegmentation models branch on shapes and data samples (fx cannot
trace them), and the autograd graph loses views, in-place ops and the
identity of parameters used directly. The dispatcher sees every op that
really runs, with its arguments and outputs; module hooks tell which module
ran it. Modules with a handler (:mod:`cpd_mm.comb.handlers`) are traced as
one unit (their inner ops are hidden) unless the handler is transparent;
ops of a construct that no module owns go to its op handler, and every
other op through the rule table (:mod:`cpd_mm.comb.rules`).
"""
import os
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .forward import default_forward
from .handlers import handler_for, op_handler_for, op_handlers
from .records import (Channelwise, Frozen, GateSite, Passenger, Producer,
                      SplitSizes, ViewSize)
from .rules import NO_CHANNEL_OPS, RULES, STOP_OPS
from .space import (TensorInfo, UnionFind, along, channel_axis, collapse,
                    empty_ids)


class CombTracer(TorchDispatchMode):
    """Traces one forward pass and collects channel atoms and members."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.modules = dict(model.named_modules())
        self.uf = UnionFind()
        self.infos: Dict[int, tuple] = {}
        self.names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), n)
        for n, b in model.named_buffers(remove_duplicate=False):
            self.names.setdefault(id(b), n)
        self.stack: List[str] = []      # names of the running modules
        self._frames: List[str] = []    # 'inside' | 'opaque' | 'open'
        self.suppress = 0               # opaque modules running
        self.current_op = ''
        self.batch = 1
        self.records = {}               # module name -> ModuleRecord
        self.producers: List[Producer] = []
        self.channelwise: List[Channelwise] = []
        self.passengers: List[Passenger] = []
        self.frozen: List[Frozen] = []
        self.views: List[ViewSize] = []
        self.split_sizes: List[SplitSizes] = []
        self.sites: List[GateSite] = []
        self.op_records = defaultdict(list)  # op handler key -> records
        self._site_of: Dict[int, int] = {}   # id(gated tensor) -> site
        self._op_counts = defaultdict(int)   # (key, module, call) -> ops
        self.calls = defaultdict(int)
        # (module, 'input' | 'output') -> per call, per tensor: (ids, shape)
        # or None (see CombResult.io_channels)
        self.io = defaultdict(list)
        self.first_module = None        # the first submodule called
        # parameters of modules traced as one unit: used by other ops too,
        # their channels cannot be sliced by the handler alone
        self._owner = {}
        for mname, m in self.modules.items():
            h = handler_for(m)
            if h is not None and not h.transparent:
                for pname, p in m.named_parameters(prefix=mname):
                    self._owner.setdefault(id(p), (mname, pname))
        self._escaped = defaultdict(set)   # module -> 'param by aten.op'
        self.debug = os.environ.get('CPD_MM_DEBUG') == '1'
        self.unhandled_ops = defaultdict(int)

    # ------------------------------------------------------------ helpers
    @property
    def current_module(self) -> str:
        return self.stack[-1] if self.stack else ''

    def per_sample(self, numel: int) -> int:
        return numel // max(self.batch, 1)

    def new_atoms(self, n):
        return self.uf.new(n)

    def tensors_of(self, obj):
        return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]

    def info(self, t) -> TensorInfo:
        hit = self.infos.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        name = self.names.get(id(t))
        if name is not None:
            return TensorInfo(empty_ids(t.dim()), False,
                              {name: tuple(range(t.dim()))})
        return TensorInfo(empty_ids(t.dim()), True)

    def set_info(self, t, info):
        if info.ids.ndim != t.dim():
            info.ids = info.ids.reshape([1] * (t.dim() - info.ids.ndim) +
                                        list(info.ids.shape)) \
                if info.ids.ndim < t.dim() else empty_ids(t.dim())
        self.infos[id(t)] = (t, info)

    def is_param_like(self, t):
        i = self.info(t)
        return bool(i.src) and not i.has_ids

    def freeze(self, atoms, reason):
        atoms = np.asarray(atoms).ravel()
        atoms = np.unique(atoms[atoms >= 0])
        if atoms.size:
            self.frozen.append(Frozen(
                atoms, f'{reason} (in {self.current_module or "<model>"})'))

    def attach_line(self, info, line, axis, kind):
        """A parameter-derived tensor indexed along its ``axis`` by the
        channels ``line``: its parameters become passengers."""
        if not info.src or axis is None:
            self.freeze(line, f'{kind} with a tensor of fixed channel width')
            return
        for pname, amap in info.src.items():
            pax = amap[axis] if axis < len(amap) else None
            if pax is None:
                self.freeze(line, f'parameter {pname} is mixed along a '
                            'channel axis')
            else:
                self.passengers.append(Passenger(pname, pax, line))

    def attach(self, info, ids, ch, width, kind):
        """As :meth:`attach_line` for a tensor aligned with ``ids``."""
        self.attach_line(info, along(ids, ch, width), ch, kind)

    def module_record(self, name, record_type):
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = record_type(name)
        return rec

    def add_producer(self, name, atoms, out):
        self.producers.append(Producer(
            name, atoms,
            self.per_sample(out.numel()) // max(len(atoms), 1)))

    def add_channelwise(self, name, atoms):
        self.channelwise.append(Channelwise(name, atoms))

    def add_op_record(self, handler, record):
        """A typed record of an op handler (``comb.op_records[key]``)."""
        self.op_records[handler.key].append(record)

    def op_index(self, key):
        """Position of this op among the ops counted under ``key`` in the
        current module call (a gating forward counts them the same way)."""
        k = (key, self.current_module, self.calls[self.current_module] - 1)
        self._op_counts[k] += 1
        return self._op_counts[k] - 1

    def record_io(self, name, kind, value, traced=True):
        """Channel atoms of a module's first positional input or output:
        a tensor, or each element of a tuple/list (None where an element is
        not a tensor with channels, or the call ran inside an opaque
        module, where nothing is traced)."""
        if isinstance(value, torch.Tensor):
            value = [value]
        elif not isinstance(value, (tuple, list)):
            value = []
        entries = []
        for t in value:
            info = self.info(t) if traced and \
                isinstance(t, torch.Tensor) else None
            # the ids array is the tracer's own (a reference, collapsed)
            entries.append((collapse(info.ids), tuple(t.shape))
                           if info is not None and info.has_ids else None)
        self.io[(name, kind)].append(entries)

    def record_view(self, out, ids):
        ch = channel_axis(ids)
        if ch is not None and self.stack:
            self.views.append(ViewSize(self.current_module, out.shape[ch],
                                       along(ids, ch, out.shape[ch])))

    # ----------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress:
            return out
        name = func.overloadpacket.__name__
        self.current_op = name
        ins = self.tensors_of((args, kwargs))
        self._use(ins, 'aten.' + name)
        for t in ins:
            owner = self._owner.get(id(t))
            if owner is not None:
                self._escaped[owner[0]].add(f'{owner[1]} by aten.{name}')
        res, failed = None, False
        op_handler = op_handler_for(name)
        rule = op_handler.trace if op_handler is not None else \
            RULES.get(name)
        if rule is not None:
            try:
                res = rule(self, args, kwargs, out)
            except Exception as e:  # a rule that cannot follow: freeze
                if self.debug:
                    raise
                failed = True
                self._unknown(name, ins, f'rule for aten.{name} failed: {e!r}')
        if res is None and not failed and name not in NO_CHANNEL_OPS:
            self._unknown(name, ins)
        outs = self.tensors_of(out)
        if isinstance(res, TensorInfo):
            res = [res] + [None] * (len(outs) - 1)
        for i, t in enumerate(outs):
            r = res[i] if isinstance(res, list) and i < len(res) else None
            if r is None:
                r = TensorInfo(empty_ids(t.dim()), True)
            self.set_info(t, r)
        return out

    def _use(self, tensors, user):
        for t in tensors:
            i = self._site_of.get(id(t))
            if i is not None:
                self.sites[i].users.append(user)

    def _drop_redundant_sites(self):
        """A gate right before a module that absorbs it (a BatchNorm, whose
        own output is gated) is redundant when nothing else reads the
        tensor."""
        ops = {op for h in op_handlers() for op in h.absorbing_ops}

        def redundant(s):
            return any(u.startswith('absorb:') for u in s.users) and all(
                u.startswith('absorb:') or u in ops for u in s.users)
        self.sites = [s for s in self.sites if not redundant(s)]

    def _freeze_escaped(self):
        for mname, uses in self._escaped.items():
            rec = self.records.get(mname)
            if rec is None:
                continue
            self.stack.append(mname)
            for atoms in rec.atom_arrays().values():
                self.freeze(atoms, 'parameter used outside its module: ' +
                            ', '.join(sorted(uses)[:2]))
            self.stack.pop()

    def _unknown(self, name, ins, why=None):
        infos = [self.info(t) for t in ins]
        if name in STOP_OPS:
            params = [n for i in infos for n in i.src]
            why = why or (f'functional {name} with parameter(s) '
                          f'{", ".join(params) or "?"} (not a known module)')
        else:
            self.unhandled_ops[name] += 1
            why = why or f'no channel rule for aten.{name}'
        for i in infos:
            if i.has_ids:
                self.freeze(i.ids, why)

    # -------------------------------------------------------- module hooks
    def _pre(self, name, module):
        handler = handler_for(module)
        opaque = handler is not None and not handler.transparent
        absorbs = handler is not None and handler.absorbs_input_gate(module)

        def hook(mod, args, kwargs):
            self.stack.append(name)
            self.calls[name] += 1
            if self.first_module is None and name:
                self.first_module = name
            self.record_io(name, 'input', args[0] if args else None,
                           traced=not self.suppress)
            if self.suppress:
                self._frames.append('inside')
                return
            kind = 'absorb:' if absorbs else 'module:' if opaque \
                else 'call:'
            self._use(self.tensors_of((args, kwargs)), kind + name)
            if opaque:
                self.suppress += 1
            self._frames.append('opaque' if opaque else 'open')
        return hook

    def _post(self, name, module):
        handler = handler_for(module)
        leaf = not any(True for _ in module.children()) or (
            handler is not None and not handler.transparent)

        def hook(mod, args, kwargs, out):
            frame = self._frames.pop()
            self.stack.pop()
            if frame == 'inside':
                self.record_io(name, 'output', out, traced=False)
                return
            o = out[0] if isinstance(out, (tuple, list)) and out else out
            if frame == 'opaque':
                self.suppress -= 1
                self.stack.append(name)
                try:
                    info = handler.trace(self, name, mod, args, kwargs, o)
                except Exception as e:
                    if self.debug:
                        raise
                    for t in self.tensors_of((args, kwargs)):
                        self.freeze(self.info(t).ids,
                                    f'{name}: handler failed ({e!r})')
                    info = TensorInfo(empty_ids(o.dim()), True)
                finally:
                    self.stack.pop()
                self.set_info(o, info)
            self.record_io(name, 'output', out)
            if leaf and isinstance(out, torch.Tensor):
                info = self.info(out)
                # a gate is only needed where removed channels are not
                # already zero (after a conv or BatchNorm, not after a ReLU
                # that follows a gate)
                if info.has_ids and not info.z:
                    # the gated model multiplies this output by its mask,
                    # which yields a new tensor: mirror that here
                    new = out.detach()  # a new tensor object, no copy
                    self.set_info(new, TensorInfo(info.ids, True,
                                                  lin=info.lin))
                    self._site_of[id(new)] = len(self.sites)
                    self.sites.append(GateSite(name, self.calls[name] - 1,
                                               info.ids))
                    return new
            return None
        return hook

    def run(self, x, forward: Optional[Callable] = None):
        forward = forward or default_forward
        if isinstance(x, torch.Tensor) and x.dim():
            self.batch = x.shape[0]
        handles = []
        for name, m in self.model.named_modules():
            handles.append(m.register_forward_pre_hook(
                self._pre(name, m), with_kwargs=True))
            handles.append(m.register_forward_hook(
                self._post(name, m), with_kwargs=True))
        try:
            with torch.no_grad(), self:
                out = forward(self.model, x)
            for t in self.tensors_of(out):
                self.freeze(self.info(t).ids, 'model output')
                self._use([t], 'output')
            self._drop_redundant_sites()
            self._freeze_escaped()
        finally:
            for h in handles:
                h.remove()
        self.output = out
        return self
