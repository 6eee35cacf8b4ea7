"""Convolutions: plain, grouped, depthwise, and transposed."""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..space import TensorInfo
from .base import (CostTerm, ModuleHandler, ModuleRecord, first_tensor,
                   input_atoms, keep_param, register_handler)


@dataclass
class ConvRecord(ModuleRecord):
    groups: int = 1
    kernel: int = 1
    spatial: int = 0          # output positions per sample, all calls
    depthwise: bool = False
    mult: int = 1             # depthwise: outputs per input channel
    inputs: Optional[np.ndarray] = None
    outputs: Optional[np.ndarray] = None
    atom_fields = ('inputs', 'outputs')


def _spatial(tr, t, channels):
    """Positions per sample that one channel of ``t`` spans."""
    return tr.per_sample(t.numel()) // max(channels, 1)


@register_handler
class ConvHandler(ModuleHandler):
    """``nn.Conv1d/2d/3d``. A plain conv is a stop op. A grouped conv ties
    position j of every conv group together (every group keeps the same
    number of channels). A depthwise conv creates no space: output channel
    ``k*mult + i`` reads input channel ``k`` only."""
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def trace(self, tr, name, m, args, kwargs, out):
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        rec = tr.module_record(name, ConvRecord)
        ins = input_atoms(tr, name, tr.info(first_tensor(args, kwargs)), 1,
                          cin)
        rec.groups, rec.kernel = g, int(np.prod(m.kernel_size))
        rec.spatial += _spatial(tr, out, cout)
        if g > 1 and cin == g:
            rec.depthwise, rec.mult = True, cout // g
            rec.merge(tr, inputs=ins)
            outs = np.repeat(rec.inputs, rec.mult)
            tr.add_channelwise(name, rec.inputs)
        else:
            if g > 1:
                tr.uf.union(np.tile(ins[:cin // g], g), ins)
                new = np.tile(tr.new_atoms(cout // g), g)
            else:
                new = tr.new_atoms(cout)
            rec.merge(tr, inputs=ins, outputs=new)
            outs = rec.outputs
            tr.add_producer(name, outs, out)
        shape = [1] * out.dim()
        shape[1] = cout
        # removed output channels are not zero (weights stay): gate needed
        return TensorInfo(outs.reshape(shape), False, lin=name)

    def site_parameters(self, m, rec):
        return [('weight', 0), ('bias', 0)]

    def cost_terms(self, m, rec):
        k, sp = rec.kernel, rec.spatial
        if rec.depthwise:
            per = k * rec.mult
            terms = [CostTerm('params', per, (rec.inputs, )),
                     CostTerm('flops', per * sp, (rec.inputs, ))]
            if m.bias is not None:
                terms.append(CostTerm('params', rec.mult, (rec.inputs, )))
            return terms
        f = k / rec.groups
        terms = [CostTerm('params', f, (rec.inputs, rec.outputs)),
                 CostTerm('flops', f * sp, (rec.inputs, rec.outputs))]
        if m.bias is not None:
            terms.append(CostTerm('params', 1, (rec.outputs, )))
        return terms

    def prune(self, m, rec, keep):
        kin = keep(rec.inputs)
        if rec.depthwise:
            kout = np.repeat(kin, rec.mult)
            keep_param(m, 'weight', 0, kout)
            keep_param(m, 'bias', 0, kout)
            n = int(kin.sum())
            m.in_channels, m.groups, m.out_channels = n, n, n * rec.mult
            return None
        kout = keep(rec.outputs)
        g = m.groups
        if g == 1:
            keep_param(m, 'weight', 0, kout)
            keep_param(m, 'weight', 1, kin)
        else:
            a, b = m.in_channels // g, m.out_channels // g
            w = m.weight.data
            w = w.reshape(g, b, a, *w.shape[2:])
            ji = torch.as_tensor(np.nonzero(kin[:a])[0], device=w.device)
            jo = torch.as_tensor(np.nonzero(kout[:b])[0], device=w.device)
            w = w[:, jo][:, :, ji].reshape(g * len(jo), len(ji),
                                           *w.shape[3:])
            m.weight = nn.Parameter(w.clone(),
                                    requires_grad=m.weight.requires_grad)
        keep_param(m, 'bias', 0, kout)
        m.in_channels, m.out_channels = int(kin.sum()), int(kout.sum())
        return None


@register_handler
class ConvTransposeHandler(ModuleHandler):
    """``nn.ConvTranspose1d/2d/3d`` with one group: a stop op whose weight
    is ``[in, out, k...]``. Grouped transposed convs are frozen."""
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d)

    def trace(self, tr, name, m, args, kwargs, out):
        x = first_tensor(args, kwargs)
        info = tr.info(x)
        if m.groups != 1:
            tr.freeze(info.ids, f'{name}: grouped transposed convolution')
            return TensorInfo(np.full((1, ) * out.dim(), -1), True)
        rec = tr.module_record(name, ConvRecord)
        ins = input_atoms(tr, name, info, 1, m.in_channels)
        rec.kernel = int(np.prod(m.kernel_size))
        rec.spatial += _spatial(tr, x, m.in_channels)  # MACs per input position
        rec.merge(tr, inputs=ins, outputs=tr.new_atoms(m.out_channels))
        tr.add_producer(name, rec.outputs, out)
        shape = [1] * out.dim()
        shape[1] = m.out_channels
        return TensorInfo(rec.outputs.reshape(shape), False, lin=name)

    def site_parameters(self, m, rec):
        return [('weight', 1), ('bias', 0)]

    def cost_terms(self, m, rec):
        terms = [CostTerm('params', rec.kernel, (rec.inputs, rec.outputs)),
                 CostTerm('flops', rec.kernel * rec.spatial,
                          (rec.inputs, rec.outputs))]
        if m.bias is not None:
            terms.append(CostTerm('params', 1, (rec.outputs, )))
        return terms

    def prune(self, m, rec, keep):
        kin, kout = keep(rec.inputs), keep(rec.outputs)
        keep_param(m, 'weight', 0, kin)
        keep_param(m, 'weight', 1, kout)
        keep_param(m, 'bias', 0, kout)
        m.in_channels, m.out_channels = int(kin.sum()), int(kout.sum())
        return None
