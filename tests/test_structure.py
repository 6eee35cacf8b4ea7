"""Package structure: no import cycles between cpd_mm modules, and every
module type with its own channel algebra has exactly one handler."""
import ast
import os
import os.path as osp

import torch.nn as nn

import cpd_mm
from cpd_mm.comb.handlers import HANDLERS, ModuleHandler

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
