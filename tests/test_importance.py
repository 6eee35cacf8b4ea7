"""Scores against autograd: the accumulated hessian and taylor scores equal
(dL/dm)^2 and |dL/dm| of explicit gate tensors, per backward (gradient
accumulation), unscaled (AMP), and memory-normalised as documented."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cpd_mm.comb import comb_model
from cpd_mm.comb.handlers import handler_for
from cpd_mm.prune.importance import (ImportanceAccumulator,
                                     normalise_by_memory)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 12, 1)      # no norm: its weights score it
        self.up = nn.Sigmoid()              # a parameter-free gate site
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = y + F.relu(self.b2(self.c2(y)))
        y = self.up(self.c3(y)) * 2
        return self.fc(y.mean((2, 3)))


def _vit_block():
    from mmpretrain.models.backbones.vision_transformer import \
        TransformerEncoderLayer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.block = TransformerEncoderLayer(16, 4, 32)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):  # x: N, 6, 4, 4 -> tokens
            t = self.embed(x.flatten(2).transpose(1, 2))
            t = self.block(t)
            t = t + self.attn(t, t, t)[0]
            return self.head(t.mean(1))
    return Net()


def explicit_gate_gradients(model, comb, x, target):
    """dL/dm of a gate tensor ``m`` at every gate site and inside handlers,
    by autograd (the definition the hook estimates)."""
    n = comb.num_channels
    m = torch.ones(n + 1, requires_grad=True)
    modules = dict(model.named_modules())
    handles, calls = [], {}
    sites = {}
    for s in comb.sites:
        sites.setdefault(s.module, {})[s.call] = s.ids

    def index(atoms):
        c = comb.channels(atoms)
        return torch.as_tensor(np.where(c >= 0, c, n))

    for name, per_call in sites.items():
        def hook(mod, args, out, name=name, per_call=per_call):
            i = calls.get(name, 0)
            calls[name] = i + 1
            return out * m[index(per_call[i % (max(per_call) + 1)])]
        handles.append(modules[name].register_forward_hook(hook))
    patched = []
    for name, rec in comb.records.items():
        fwd = handler_for(modules[name]).gate_forward(
            modules[name], rec, lambda atoms: m[index(atoms)])
        if fwd is not None:
            modules[name].forward = fwd
            patched.append(modules[name])
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    for h in handles:
        h.remove()
    for mod in patched:
        del mod.forward
    model.zero_grad()
    return m.grad[:-1].double().numpy()


def _setup(net, kind='hessian'):
    torch.manual_seed(0)
    model = net().train()
    comb = comb_model(model, input_shape=(2, 3 if net is ConvBN else 6, 4, 4))
    return model, comb, ImportanceAccumulator(model, comb, kind)


@pytest.mark.parametrize('net', [ConvBN, _vit_block])
@pytest.mark.parametrize('kind', ['hessian', 'taylor'])
def test_scores_equal_explicit_gate_gradients(net, kind):
    model, comb, scorer = _setup(net, kind)
    assert scorer.params and (net is not ConvBN or scorer.activation_sites)
    scorer.remove()  # the reference runs without the hooks
    c_in, n_out = (3, 5) if net is ConvBN else (6, 3)
    data = [(torch.randn(4, c_in, 4, 4), torch.randint(0, n_out, (4, )))
            for _ in range(2)]
    expected = np.zeros(comb.num_channels)
    for x, t in data:
        g = explicit_gate_gradients(model, comb, x, t)
        expected += g * g if kind == 'hessian' else np.abs(g)
    scorer = ImportanceAccumulator(model, comb, kind)
    for x, t in data:
        F.cross_entropy(model(x), t).backward()
        model.zero_grad()
        scorer.step()
    got = scorer.current()
    prunable = np.concatenate([grp.channels for grp in comb.prunable_groups])
    assert np.abs(expected[prunable]).min() > 0, 'vacuous: no gradient'
    np.testing.assert_allclose(got[prunable], expected[prunable], rtol=1e-4,
                               atol=1e-12)
    # memory normalisation: score / (activation elements of the group's
    # producers per channel x active channels)
    kept = np.ones(comb.num_channels, bool)
    grp = comb.prunable_groups[0]
    kept[grp.channels[:2]] = False
    norm = normalise_by_memory(got, comb, kept)
    want = got[grp.channels] / (grp.numel_per_channel * (grp.size - 2))
    np.testing.assert_allclose(norm[grp.channels], want)


def _torchvision_resnet():
    import torchvision
    return torchvision.models.resnet18(num_classes=5)


@pytest.mark.parametrize('net', [ConvBN, _vit_block, _torchvision_resnet])
def test_fisher_sums_per_sample_squared_gate_gradients(net):
    """``fisher`` = sum over samples of (dL/dm restricted to the sample)^2:
    in eval mode (no batch statistics couple the samples) that is the
    gradient of each sample's share of the mean loss, by autograd. The
    attention heads' internal gates are read from the batch gradient and
    must equal the hessian score there. torchvision's ResNet has in-place
    ReLUs and ``out += identity`` after its gated BNs: reading the sites'
    outputs without a copy would fail here."""
    torch.manual_seed(0)
    model = net().eval()
    shape = (2, 6, 4, 4) if net is _vit_block else (2, 3, 4, 4) \
        if net is ConvBN else (2, 3, 32, 32)
    with torch.no_grad():  # no silent branch: BN statistics away from 0/1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    comb = comb_model(model, input_shape=shape)
    n_out = 3 if net is _vit_block else 5
    b = 4
    x = torch.randn(b, *shape[1:])
    t = torch.randint(0, n_out, (b, ))
    per = [explicit_gate_gradients(model, comb, x[i:i + 1], t[i:i + 1]) / b
           for i in range(b)]
    batch = explicit_gate_gradients(model, comb, x, t)
    tol = 1e-5 * np.abs(batch).max()  # float32 sums in another order
    np.testing.assert_allclose(sum(per), batch, rtol=1e-4, atol=tol)
    scorer = ImportanceAccumulator(model, comb, 'fisher')
    F.cross_entropy(model(x), t).backward()
    model.zero_grad()
    scorer.step()
    got = scorer.current()
    want = np.where(scorer.batch_only, batch * batch,
                    sum(g * g for g in per))
    prunable = np.concatenate([grp.channels for grp in comb.prunable_groups])
    # (a ReLU may be dead on all 4 samples, 1x1 at the last stage: a true 0)
    assert (want[prunable] > 0).mean() > 0.5, 'vacuous: no gradient'
    np.testing.assert_allclose(got[prunable], want[prunable], rtol=1e-3,
                               atol=tol * tol * b)
    # not the batch estimate under another name
    per_sample = prunable[~scorer.batch_only[prunable]]
    assert len(per_sample) >= len(prunable) // 2
    assert not np.allclose(got[per_sample], (batch * batch)[per_sample],
                           rtol=1e-2)
    assert scorer.batch_only.any() == (net is _vit_block)


def test_gradient_accumulation_scores_each_backward():
    """With accumulative_counts=2 the second backward must add g2^2, not
    (g1 + g2)^2 (the running sum in .grad)."""
    from mmengine.optim import OptimWrapper
    model, comb, scorer = _setup(ConvBN)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0),
                           accumulative_counts=2)
    xs = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    ts = [torch.randint(0, 5, (4, )) for _ in range(2)]
    scorer.remove()
    gs = [explicit_gate_gradients(model, comb, x, t) / 2
          for x, t in zip(xs, ts)]  # OptimWrapper divides the loss by 2
    scorer = ImportanceAccumulator(model, comb, 'hessian')
    with wrapper.optim_context(model):
        for x, t in zip(xs, ts):
            wrapper.update_params(F.cross_entropy(model(x), t))
            scorer.step()
    want = gs[0] ** 2 + gs[1] ** 2
    np.testing.assert_allclose(scorer.current(), want, rtol=1e-4,
                               atol=1e-12)
    wrong = gs[0] ** 2 + (gs[0] + gs[1]) ** 2
    assert not np.allclose(scorer.current(), wrong, rtol=1e-3)


def test_amp_scores_are_unscaled_and_overflow_skipped():
    from cpd_mm.prune.importance import inverse_loss_scale
    model, comb, scorer = _setup(ConvBN)
    x, t = torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4, ))
    scorer.remove()
    g = explicit_gate_gradients(model, comb, x, t)
    scorer = ImportanceAccumulator(model, comb, 'hessian')

    class Wrapper:  # what AmpOptimWrapper exposes
        loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 12)
    w = Wrapper()
    inv = inverse_loss_scale(w)  # before the first scaled loss
    assert inv == 2.0 ** -12
    w.loss_scaler.scale(F.cross_entropy(model(x), t)).backward()
    scorer.step(inv)
    np.testing.assert_allclose(scorer.current(), g * g, rtol=1e-4,
                               atol=1e-12)
    inv = inverse_loss_scale(w)
    assert isinstance(inv, torch.Tensor)  # no host sync once the scale exists
    # an overflowing backward is skipped
    model.zero_grad()
    loss = F.cross_entropy(model(x), t) * float('inf')
    loss.backward()
    scorer.step(inv)
    np.testing.assert_allclose(scorer.current(), g * g, rtol=1e-4,
                               atol=1e-12)
    assert scorer.iters == 1


def test_frozen_parameters_are_not_scored():
    """Parameters that do not train: no crash, their channels unscored."""
    model, comb, _ = _setup(ConvBN)
    for p in list(model.c1.parameters()) + list(model.b1.parameters()):
        p.requires_grad_(False)
    scorer = ImportanceAccumulator(model, comb, 'hessian')
    F.cross_entropy(model(torch.randn(4, 3, 4, 4)),
                    torch.randint(0, 5, (4, ))).backward()
    scorer.step()
    grp = comb.group('c1')
    assert scorer.unscored[grp.channels].all()
    assert not scorer.unscored[comb.group('c3').channels].any()


def test_hessian_fd_matches_the_exact_hessian_vector_product():
    """probe(): (Hv)^2 by a finite difference of explicit gate gradients
    equals (Hv)^2 by double backward, for the same v."""
    from cpd_mm.comb import ChannelGates
    torch.manual_seed(0)
    model = ConvBN().eval()  # eval: the loss is a smooth function of m
    comb = comb_model(model, input_shape=(2, 3, 4, 4))
    gates = ChannelGates(model, comb)
    x, t = torch.randn(4, 3, 4, 4), torch.randint(0, 5, (4, ))

    def loss_fn():
        return F.cross_entropy(model(x), t)
    scorer = ImportanceAccumulator(model, comb, 'hessian_fd', seed=3)
    scorer.probe(gates, loss_fn, eps=1e-3)
    assert scorer.iters == 1
    # the same v, by the same generator
    gen = torch.Generator().manual_seed(3 * 1000003)
    v = torch.randn(comb.num_channels + 1, generator=gen)
    v[-1] = 0
    m = torch.ones(comb.num_channels + 1, dtype=torch.float64,
                   requires_grad=True)
    model.double()
    x64 = x.double()
    with gates.probing(m):
        loss = F.cross_entropy(model(x64), t)
    g, = torch.autograd.grad(loss, m, create_graph=True)
    hv, = torch.autograd.grad(g, m, grad_outputs=v.double())
    want = hv[:-1].detach().numpy() ** 2
    got = scorer.current()
    prunable = np.concatenate([grp.channels for grp in comb.prunable_groups])
    assert want[prunable].max() > 0
    np.testing.assert_allclose(got[prunable], want[prunable], rtol=0.05,
                               atol=1e-3 * want[prunable].max())
