"""Torch-Pruning (TP) on OpenMMLab models, and its result as a cpd_mm plan.

Used by ``compare_torch_pruning.py`` and ``latency_vs_torch_pruning.py`` so
that a model pruned by TP is fine-tuned, evaluated, exported and timed by
exactly the code that handles cpd_mm's own pruned checkpoints:

* :func:`tp_prune` runs TP's ``MetaPruner`` (global pruning) on a copy of a
  model, tracing it with :func:`cpd_mm.comb.default_forward` so that a
  segmentor's auxiliary head is in TP's graph and its input shrinks with the
  backbone;
* :func:`plan_from_history` turns ``pruner.pruning_history()`` (layer name,
  output or input channels, removed indices) into a cpd_mm plan: a removed
  index of a conv/linear is an atom of ``comb.records[name]``, and
  ``comb.channels`` maps it to cpd_mm's channel;
* :func:`check_plan` rebuilds the structure from the plan on a fresh model
  (``apply_plan``), loads TP's state dict strictly and compares outputs.

Needs ``pip install torch-pruning`` (``pip install -e .[benchmark]``).
"""
import copy
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from cpd_mm.comb import default_forward
from cpd_mm.prune import apply_plan, make_plan

IMPORTANCES = ('taylor', 'magnitude')


def tp_importance(name: str, p: int = 2):
    """TP's group importance: 'taylor' (GroupTaylorImportance, needs
    ``.grad`` on the weights) or 'magnitude' (GroupMagnitudeImportance with
    norm ``p``), both with TP's defaults otherwise (mean over the group,
    mean-normalised per group)."""
    import torch_pruning as tp
    if name == 'taylor':
        return tp.importance.GroupTaylorImportance()
    if name == 'magnitude':
        return tp.importance.GroupMagnitudeImportance(p=p)
    raise ValueError(f'importance must be one of {IMPORTANCES}, got {name!r}')


def loss_gradients(model: nn.Module, cfg, seed: int,
                   batches: int) -> Dict[str, torch.Tensor]:
    """Summed gradients of the model's training loss over ``batches``
    batches of ``cfg.train_dataloader`` (shuffled with ``seed``).

    The model is put back as it was: weights, BatchNorm statistics (which
    train mode updates) and mode; its ``.grad`` are cleared.
    """
    from mmengine.runner import Runner, set_random_seed
    set_random_seed(seed)
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    loader_cfg.update(num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg, seed=seed)
    state = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()
    model.zero_grad()
    try:
        for _, batch in zip(range(batches), loader):
            data = model.data_preprocessor(batch, True)
            loss, _ = model.parse_losses(model(**data, mode='loss'))
            loss.backward()
        grads = {n: p.grad.detach().clone()
                 for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.load_state_dict(state)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return grads


def output_layers(model: nn.Module) -> List[nn.Module]:
    """The layers that write the model's outputs (classifier, ``conv_seg``
    of every decode and auxiliary head): TP must not prune them."""
    if hasattr(model, 'decode_head'):
        heads = [model.decode_head]
        aux = getattr(model, 'auxiliary_head', None)
        if aux is not None:
            heads += list(aux) if isinstance(aux, nn.ModuleList) else [aux]
        return [h.conv_seg for h in heads]
    head = getattr(model, 'head', None)
    for name in ('fc', 'layers'):
        if head is not None and hasattr(head, name):
            return [getattr(head, name)]
    raise ValueError(f'do not know the output layer of {type(model)}')


def attention_heads(model: nn.Module) -> Dict[nn.Module, int]:
    """``{qkv linear: heads}`` of MMPretrain's fused attention modules, for
    TP's ``num_heads`` (q, k and v are pruned alike in every head)."""
    return {m.qkv: m.num_heads for m in model.modules()
            if hasattr(m, 'qkv') and hasattr(m, 'num_heads')
            and isinstance(m.qkv, nn.Linear)}


def _unbind_attention(self, x):
    """MMPretrain's ``MultiheadAttention.forward`` (same ops, same result)
    with q, k, v split by ``unbind`` and widths taken from the tensors: the
    form TP's attention rules expect (its own ViT examples rewrite timm's
    attention the same way). Used while TP traces and prunes."""
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    drop = self.attn_drop if self.training else 0.
    x = self.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    x = self.proj(x.transpose(1, 2).reshape(B, N, -1))
    x = self.out_drop(self.gamma1(self.proj_drop(x)))
    return v.squeeze(1) + x if self.v_shortcut else x


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, 'qkv')
            and hasattr(m, 'head_dims') and hasattr(m, 'num_heads')]


def fix_attention_attributes(model: nn.Module) -> None:
    """MMPretrain's attention reshapes with ``head_dims`` and
    ``embed_dims``; TP shrinks the layers but not these attributes."""
    for m in _attention_modules(model):
        m.head_dims = m.qkv.out_features // 3 // m.num_heads
        m.embed_dims = m.head_dims * m.num_heads


def tp_prune(model: nn.Module, example: torch.Tensor, importance: str,
             ratio: float, round_to: int = 8,
             grads: Optional[Dict[str, torch.Tensor]] = None,
             forward: Callable = default_forward, check_ties: bool = False,
             magnitude_p: int = 2):
    """Prune a deep copy of ``model`` with TP's MetaPruner, global pruning.

    Args:
        model: the model (not changed).
        example: example input for TP's trace.
        importance: 'taylor' or 'magnitude' (see :func:`tp_importance`).
        ratio: TP's ``pruning_ratio`` (share of all prunable channels).
        round_to: TP's ``round_to``.
        grads: ``{parameter name: gradient}`` for 'taylor'.
        forward: ``forward(model, x)`` for TP's trace.
        check_ties: also report, per TP group, how many importance values
            are equal (``ties``).

    Returns:
        ``(pruned copy, pruning history, ties)``; ``ties`` is a list of
        ``(root layer, channels, distinct scores)`` or None.
    """
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    if importance == 'taylor':
        if not grads:
            raise ValueError("importance='taylor' needs gradients")
        for name, p in m.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    heads = attention_heads(m)
    attention = _attention_modules(m)
    for a in attention:  # instance attribute, removed below
        a.forward = _unbind_attention.__get__(a)
    try:
        pruner = tp.pruner.MetaPruner(
            m, example, importance=tp_importance(importance, magnitude_p),
            pruning_ratio=ratio, global_pruning=True, round_to=round_to,
            ignored_layers=output_layers(m), num_heads=heads,
            forward_fn=lambda mod, x: forward(mod, x))
        ties = _ties(pruner) if check_ties else None
        pruner.step()
    finally:
        for a in attention:
            del a.forward
    fix_attention_attributes(m)
    m.zero_grad(set_to_none=True)
    return m, pruner.pruning_history(), ties


def _ties(pruner) -> List[tuple]:
    """Per TP group: its root layer, channel count and distinct scores."""
    out = []
    for group in pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers,
            root_module_types=pruner.root_module_types):
        if pruner._is_atten_group(group)[0]:  # as MetaPruner scores them
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        imp = pruner.estimate_importance(group)
        if imp is None:
            continue
        name = pruner.DG._module2name[group[0].dep.target.module]
        out.append((name, int(imp.numel()),
                    int(torch.unique(imp.float()).numel())))
    return out


def plan_from_history(comb, history: Sequence, model: nn.Module) -> dict:
    """The cpd_mm plan of TP's ``pruning_history()`` on ``model`` (the
    unpruned model that ``comb`` traced)."""
    kept = np.ones(comb.num_channels, dtype=bool)
    for name, is_out, idxs in history:
        rec = comb.records.get(name)
        atoms = getattr(rec, 'outputs' if is_out else 'inputs', None)
        if atoms is None:
            raise ValueError(f'TP pruned {name} ({"out" if is_out else "in"}'
                             'put channels), which cpd_mm has no record of')
        idx = np.asarray([int(i) for i in idxs], dtype=np.int64)
        chans = comb.channels(atoms.ravel())[idx]
        if (chans < 0).any():
            raise ValueError(f'TP pruned channels of {name} that cpd_mm maps '
                             'to no channel')
        kept[chans] = False
    if (~kept & comb.frozen_channels).any():
        names = sorted({comb.groups[comb.group_of_channel[c]].name
                        for c in np.nonzero(~kept & comb.frozen_channels)[0]})
        raise ValueError(f'TP removed channels that cpd_mm freezes: {names}')
    return make_plan(comb, kept, model)


def check_plan(fresh: nn.Module, plan: dict, pruned: nn.Module,
               example: torch.Tensor,
               forward: Callable = default_forward) -> float:
    """Apply ``plan`` to ``fresh`` (same config, any weights), load
    ``pruned``'s state dict strictly, and return the largest absolute
    output difference to ``pruned`` (eval mode). Raises on any shape or
    key mismatch."""
    apply_plan(fresh, plan)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    fresh.eval()
    pruned.eval()
    with torch.no_grad():
        a, b = forward(fresh, example), forward(pruned, example)
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def group_widths(comb, plan: Optional[dict]) -> List[tuple]:
    """``(group name, kept, size)`` of every prunable group."""
    entries = (plan or {}).get('groups', {})
    return [(g.name, len(entries[g.name]['kept']) if g.name in entries
             else g.size, g.size) for g in comb.groups if g.prunable]


def degenerate(widths: Sequence[tuple], share: float = 0.1) -> List[str]:
    """Groups at one channel or below ``share`` of their width."""
    return [f'{n} {k}/{s}' for n, k, s in widths if k <= 1 or k < share * s]
