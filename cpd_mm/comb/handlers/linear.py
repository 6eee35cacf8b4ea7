"""Linear layers and embeddings: stop ops over the last axis."""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch.nn as nn

from ..space import TensorInfo
from .base import (CostTerm, ModuleHandler, ModuleRecord, first_tensor,
                   input_atoms, keep_param, register_handler)


@dataclass
class LinearRecord(ModuleRecord):
    tokens: int = 0           # rows per sample, all calls
    inputs: Optional[np.ndarray] = None
    outputs: Optional[np.ndarray] = None
    atom_fields = ('inputs', 'outputs')


def _last_axis(out, atoms):
    return atoms.reshape((1, ) * (out.dim() - 1) + (-1, ))


@register_handler
class LinearHandler(ModuleHandler):
    module_types = (nn.Linear, )

    def trace(self, tr, name, m, args, kwargs, out):
        rec = tr.module_record(name, LinearRecord)
        ins = input_atoms(tr, name, tr.info(first_tensor(args, kwargs)), -1,
                          m.in_features)
        rec.tokens += tr.per_sample(out.numel()) // max(m.out_features, 1)
        rec.merge(tr, inputs=ins, outputs=tr.new_atoms(m.out_features))
        tr.add_producer(name, rec.outputs, out)
        return TensorInfo(_last_axis(out, rec.outputs), False, lin=name)

    def site_parameters(self, m, rec):
        return [('weight', 0), ('bias', 0)]

    def cost_terms(self, m, rec):
        terms = [CostTerm('params', 1, (rec.inputs, rec.outputs)),
                 CostTerm('flops', rec.tokens, (rec.inputs, rec.outputs))]
        if m.bias is not None:
            terms.append(CostTerm('params', 1, (rec.outputs, )))
        return terms

    def latency_widths(self, m, rec):
        return [rec.inputs, rec.outputs]

    def prune(self, m, rec, keep):
        kin, kout = keep(rec.inputs), keep(rec.outputs)
        keep_param(m, 'weight', 0, kout)
        keep_param(m, 'weight', 1, kin)
        keep_param(m, 'bias', 0, kout)
        m.in_features, m.out_features = int(kin.sum()), int(kout.sum())
        return None


@register_handler
class EmbeddingHandler(ModuleHandler):
    """``nn.Embedding``: a producer of ``embedding_dim`` channels from
    indices (its input carries no channels)."""
    module_types = (nn.Embedding, )

    def trace(self, tr, name, m, args, kwargs, out):
        rec = tr.module_record(name, LinearRecord)
        rec.merge(tr, outputs=tr.new_atoms(m.embedding_dim))
        tr.add_producer(name, rec.outputs, out)
        return TensorInfo(_last_axis(out, rec.outputs), False, lin=name)

    def site_parameters(self, m, rec):
        return [('weight', 1)]

    def cost_terms(self, m, rec):
        return [CostTerm('params', m.num_embeddings, (rec.outputs, ))]

    def prune(self, m, rec, keep):
        kout = keep(rec.outputs)
        keep_param(m, 'weight', 1, kout)
        m.embedding_dim = int(kout.sum())
        return None
