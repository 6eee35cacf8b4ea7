"""cpd_mm registers in mmengine's root registries, visible from every scope.

Runners build objects through the registry of the config's ``default_scope``
(``mmpretrain``, ``mmseg`` or ``mmdet``), which falls back to its parent, the
root. A type registered in one codebase's child registry would be invisible
from the others.
"""
import pytest
import torch.nn as nn
from mmengine import registry as root
from mmengine.hooks import Hook
from mmengine.registry import DefaultScope, Registry

import cpd_mm  # noqa: F401  (registers its types)

SCOPES = ('mmpretrain', 'mmseg', 'mmdet')
OWN_TYPE = dict(mmpretrain='ImageClassifier', mmseg='EncoderDecoder',
                mmdet='RetinaNet')


def _root_registries():
    return {name: reg for name, reg in vars(root).items()
            if isinstance(reg, Registry) and reg.parent is None}


def _cpd_types():
    """(scope searched, registry scope, registry name, type name, type) of
    everything cpd_mm registered, in the root or in a child registry."""
    found = []
    for scope in ('mmengine', ) + SCOPES:
        for name, reg in _root_registries().items():
            with DefaultScope.overwrite_default_scope(scope):
                with reg.switch_scope_and_registry(scope) as scoped:
                    for key, obj in scoped.module_dict.items():
                        if getattr(obj, '__module__', '').startswith('cpd_mm'):
                            found.append((scope, scoped.scope, name, key, obj))
    return found


def test_cpd_types_live_in_root_registries():
    found = _cpd_types()
    # cpd_mm registers at least its pruning hook and distiller.
    assert {'HOOKS', 'MODELS'} <= {f[2] for f in found}
    misplaced = [f[:4] for f in found if f[1] != 'mmengine']
    assert not misplaced, f'registered in a child registry: {misplaced}'


@pytest.mark.parametrize('scope', SCOPES)
def test_cpd_types_found_from_scope(scope):
    regs = _root_registries()
    for _, _, name, key, obj in _cpd_types():
        with DefaultScope.overwrite_default_scope(scope):
            with regs[name].switch_scope_and_registry(scope) as scoped:
                assert scoped.scope == scope  # really looked up via the child
                assert scoped.get(key) is obj, (name, key)


class _TinyNet(nn.Module):
    """Test-only module registered in the root MODELS."""

    def __init__(self, width=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 1)


@pytest.fixture
def tiny_types():
    root.MODELS.register_module(name='_CpdTestTinyNet', module=_TinyNet)
    root.HOOKS.register_module(name='_CpdTestTinyHook',
                               module=type('_TinyHook', (Hook, ), {}))
    yield
    root.MODELS.module_dict.pop('_CpdTestTinyNet')
    root.HOOKS.module_dict.pop('_CpdTestTinyHook')


@pytest.mark.parametrize('scope', SCOPES)
def test_root_type_builds_in_scope(tiny_types, scope):
    with DefaultScope.overwrite_default_scope(scope):
        model = root.MODELS.build(dict(type='_CpdTestTinyNet', width=5))
        hook = root.HOOKS.build(dict(type='_CpdTestTinyHook'))
        # The scope's own types resolve too: the switch really happened.
        with root.MODELS.switch_scope_and_registry(scope) as scoped:
            assert scoped.get(OWN_TYPE[scope]) is not None
    assert model.conv.out_channels == 5
    assert type(hook).__name__ == '_TinyHook'
