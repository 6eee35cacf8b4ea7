"""Package structure: no import cycles between cpd_mm modules, every
module type with its own channel algebra has exactly one handler, and a
construct's specifics live in its handler's file only."""
import ast
import inspect
import os
import os.path as osp
import re
import sys

import numpy as np
import pytest
import torch.nn as nn

import cpd_mm
from cpd_mm.comb.handlers import (HANDLERS, OP_HANDLERS, ModuleHandler,
                                  op_handlers)

ROOT = osp.dirname(cpd_mm.__file__)


def _module_name(path):
    rel = osp.relpath(path, osp.dirname(ROOT))[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _imports(path, name):
    """cpd_mm modules imported at module level (not inside functions)."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split('.')
                base = base[:len(base) - node.level + 1]
                mod = '.'.join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ''
            if mod.startswith('cpd_mm'):
                for a in node.names:  # `from . import x` imports a module
                    sub = f'{mod}.{a.name}'
                    out.add(sub if osp.exists(osp.join(
                        osp.dirname(ROOT), *sub.split('.'))) or osp.exists(
                            osp.join(osp.dirname(ROOT), *sub.split('.'))
                            + '.py') else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names
                    if a.name.startswith('cpd_mm')}
    return out


def test_no_import_cycles():
    graph = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith('.py'):
                p = osp.join(d, f)
                graph[_module_name(p)] = _imports(p, _module_name(p))

    def parents(m):  # importing a.b.c runs a/__init__ and a/b/__init__
        parts = m.split('.')
        return ['.'.join(parts[:i]) for i in range(1, len(parts))]

    edges = {m: {t for t in deps if t in graph and t != m
                 and t not in parents(m)}
             for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError('import cycle: ' + ' -> '.join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_one_handler_per_module_type():
    kinds = {}
    for t, h in HANDLERS.items():
        assert issubclass(t, nn.Module) and isinstance(h, ModuleHandler)
        kinds.setdefault(type(h), set()).add(t)
    # a module type is served by one handler, and each handler's types are
    # its own declaration
    for cls, types in kinds.items():
        assert types == set(cls.module_types)


# the generic machinery: it must treat every construct through its handler
GENERIC = ('comb', 'prune', osp.join('deploy', 'layer_specs.py'))


def _construct_names():
    """name -> handler file: the aten ops an op handler registers, and the
    public classes and functions defined in its file."""
    names = {op: type(h).__module__ for op, h in OP_HANDLERS.items()}
    for h in op_handlers():
        mod = sys.modules[type(h).__module__]
        for node in ast.parse(inspect.getsource(mod)).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and \
                    not node.name.startswith('_'):
                names[node.name] = mod.__name__
    return names


def misplaced(root=ROOT):
    """``(file, name)`` for every construct name found in a generic file
    under ``root`` (outside ``comb/handlers``)."""
    names = _construct_names()
    pattern = re.compile(r'\b(%s)\b' % '|'.join(map(re.escape, names)))
    found = []
    for part in GENERIC:
        top = osp.join(root, part)
        files = [top] if top.endswith('.py') else [
            osp.join(d, f) for d, _, fs in os.walk(top) for f in fs
            if f.endswith('.py')]
        for path in files:
            if osp.join('comb', 'handlers') in path:
                continue
            found += [(osp.relpath(path, root), n) for n in
                      sorted(set(pattern.findall(open(path).read())))]
    return found


def test_constructs_live_in_their_handler():
    """Norm statistics and fused attention are handled like module types:
    their ops, records and gating are named in their handler's file only
    (tracer, gates, surgery, groups, cost and latency specs call the
    handler contract)."""
    names = _construct_names()
    assert {'native_layer_norm', 'scaled_dot_product_attention',
            'NormSite', 'AttentionScale'} <= set(names)
    assert misplaced() == []


def test_latency_widths_come_from_handlers(tmp_path, monkeypatch):
    """The cost model times a layer at the widths its handler states: a
    handler that says its module is not timed removes it."""
    pytest.importorskip('onnxruntime')
    from cpd_mm.comb import comb_model
    from cpd_mm.comb.handlers.linear import LinearHandler
    from cpd_mm.deploy.latency_table import LatencyTable
    from cpd_mm.prune.cost import CostModel
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    shape = (1, 3, 16, 16)
    table = LatencyTable.build(model, shape, cache_dir=str(tmp_path),
                               samples=2)
    comb = comb_model(model, shape)
    full = np.ones(comb.num_channels, dtype=bool)
    widths = CostModel(model, comb, table)._widths(full)
    assert widths == {'0': (3, 8), '2': (8, ), '4': (8, 8), '7': (8, 4)}
    monkeypatch.setattr(LinearHandler, 'latency_widths',
                        lambda self, m, rec: None, raising=False)
    assert '7' not in CostModel(model, comb, table)._widths(full)
