"""Training gets cheaper as it prunes: the student shrinks physically at
every pruning step, and what training holds on it follows (gradients of an
open accumulation window, SGD momentum, AdamW moments, per-parameter
groups, EMA copies). The check: a run that shrinks ends with the weights of
a run that only masks (``shrink='never'``), pruned at the end; a step that
lost momentum, sliced a moment wrongly or left the EMA behind would not."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpd_mm  # noqa: F401
from cpd_mm.comb import comb_model, prune_model
from cpd_mm.prune import CPDRunner, PruningSession, TrainingState
from cpd_mm.prune.shrink import map_channels, param_maps, shrink_student
from test_prune_hook import CPDPruningHook, HookToyNet  # noqa: F401

OPTIMS = {
    'sgd': dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9,
                               weight_decay=1e-3)),
    'adamw': dict(optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.05),
                  paramwise_cfg=dict(norm_decay_mult=0.0,
                                     bias_decay_mult=0.0)),
    # an accumulation window of 3 is open at the steps of iters 4 and 8
    'sgd_accumulate': dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9),
                           accumulative_counts=3),
}


def _run(work_dir, shrink, optim):
    runner = CPDRunner(
        model=dict(type='HookToyNet'), work_dir=work_dir,
        train_dataloader=dict(
            dataset=dict(type='HookToyData'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4, num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=OPTIMS[optim],
        train_cfg=dict(by_epoch=False, max_iters=12),
        custom_hooks=[
            dict(type='CPDPruningHook', target_sparsity=0.5, interval=2,
                 begin_iter=2, end_iter=10, input_shape=(1, 3, 8, 8),
                 shrink=shrink),
            dict(type='EMAHook', momentum=0.1, priority='ABOVE_NORMAL')],
        default_hooks=dict(checkpoint=None),
        randomness=dict(seed=0), default_scope='mmengine')
    runner.train()
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    ema = [h for h in runner.hooks if hasattr(h, 'ema_model')][0].ema_model
    return runner, hook, ema.module


@pytest.mark.parametrize('optim,shrink', [(o, 'step') for o in OPTIMS] +
                         [('sgd', 'end')])
def test_shrunk_training_ends_where_masked_training_does(tmp_path, optim,
                                                         shrink):
    r_mask, h_mask, ema_mask = _run(str(tmp_path / 'mask'), 'never', optim)
    r_cut, h_cut, ema_cut = _run(str(tmp_path / 'cut'), shrink, optim)
    assert np.array_equal(h_mask.kept, h_cut.kept)  # the same selection
    assert (~h_cut.kept).any() and h_cut.physical
    assert h_cut.gates is None and not h_cut.scorer.active  # nothing left
    # the shrunk student is the masked one, pruned: same weights
    plan = h_mask.plan()
    h_mask.gates.remove()
    from cpd_mm.prune import apply_plan
    small = apply_plan(r_mask.model, plan).state_dict()
    cut = r_cut.model.state_dict()
    assert small.keys() == cut.keys()
    # a conv bias before BatchNorm has a gradient of zero up to rounding,
    # which Adam's normalisation turns into lr-sized steps in either run
    # (measured: 1e-2 there, <= 6e-8 everywhere else)
    noise = {'conv1.bias', 'conv2.bias', 'bn1.running_mean',
             'bn2.running_mean'} if optim == 'adamw' else set()
    for k, v in cut.items():
        assert v.shape == small[k].shape, k
        if k in noise:
            continue
        torch.testing.assert_close(v, small[k], rtol=2e-5, atol=2e-6,
                                   msg=k)
    # so is the EMA copy (it averaged the masked weights alike)
    ema_small = apply_plan(ema_mask, plan).state_dict()
    for k, v in ema_cut.state_dict().items():
        if k in noise:
            continue
        torch.testing.assert_close(v, ema_small[k], rtol=2e-5, atol=2e-6,
                                   msg=f'ema {k}')
    # the optimizer holds exactly the student's parameters
    opt = r_cut.optim_wrapper.optimizer
    held = [p for g in opt.param_groups for p in g['params']]
    assert {id(p) for p in held} == {id(p) for p in r_cut.model.parameters()}
    assert all(opt.state[p] for p in held)  # state carried, not restarted
    if optim == 'adamw':  # per-parameter groups kept their multipliers
        decay = {id(p): g['weight_decay'] for g in opt.param_groups
                 for p in g['params']}
        assert decay[id(r_cut.model.bn1.weight)] == 0.0
        assert decay[id(r_cut.model.conv2.weight)] == 0.05


def test_optimizer_state_is_sliced_with_the_weights():
    """One shrink by hand: momentum entries follow their weights."""
    torch.manual_seed(0)
    model = HookToyNet()
    comb = comb_model(model, input_shape=(1, 3, 8, 8), verify=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4, ))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    F.cross_entropy(model(x), y).backward()  # an open window: grads held
    kept = np.ones(comb.num_channels, bool)
    g = comb.group('conv2')
    kept[g.channels[[1, 5, 6]]] = False
    old_w = model.conv2.weight.detach().clone()
    old_m = opt.state[model.conv2.weight]['momentum_buffer'].clone()
    old_g = model.conv2.weight.grad.clone()
    shrink_student(model, lambda m: prune_model(m, comb, kept), '', [opt])
    rows = [i for i in range(32) if i not in (1, 5, 6)]
    w = model.conv2.weight
    assert w.shape[0] == 29
    assert torch.equal(w, old_w[rows])
    assert torch.equal(opt.state[w]['momentum_buffer'], old_m[rows])
    assert torch.equal(w.grad, old_g[rows])
    # the consumer's input columns too (fc reads the residual stream)
    assert model.fc.weight.shape == (4, 29)
    small = comb_model(model, input_shape=(1, 3, 8, 8), verify=False)
    to_base = map_channels(comb, kept, small)
    assert np.array_equal(np.sort(to_base), np.nonzero(kept)[0])


def test_param_maps_see_a_rescaled_parameter():
    """A handler that folds a scale into weights (fused attention when head
    dims shrink) is traced as a scaled selection, not mistaken for one."""
    lin = nn.Linear(4, 6)

    def surgery(m):
        m.weight = nn.Parameter(m.weight.data[[0, 2, 3]] * 0.5)
        m.bias = nn.Parameter(m.bias.data[[0, 2, 3]] + 1.0)  # not a slice
    maps = param_maps(lin, surgery)
    assert maps['weight'].source == 'weight'
    assert torch.equal(maps['weight'].index,
                       torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14,
                                     15]))
    assert torch.allclose(maps['weight'].scale, torch.tensor(0.5))
    assert maps['bias'] is None


def test_plain_pytorch_loop():
    """The session without a runner, as README shows it."""
    torch.manual_seed(0)
    model = HookToyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session = PruningSession(model, target_sparsity=0.5, interval=2,
                             begin_iter=2, end_iter=10,
                             input_shape=(1, 3, 8, 8))
    session.setup()
    g = torch.Generator().manual_seed(0)
    full = sum(p.numel() for p in model.parameters())
    for it in range(12):
        x = torch.randn(4, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (4, ), generator=g)
        loss = model(x, y, mode='loss')['loss']
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.after_iter(it + 1, TrainingState(optimizers=[optimizer]))
    assert session.finished and session.physical
    assert abs(session.sparsity() - 0.5) < 0.05
    small = sum(p.numel() for p in model.parameters())
    assert small == session.cost.params(session.kept) < 0.55 * full
    # the plan rebuilds the model from scratch
    from cpd_mm.prune import apply_plan
    twin = apply_plan(HookToyNet(), session.plan())
    twin.load_state_dict(model.state_dict())
