"""Channel importance: the paper's Hessian score and ablation baselines.

A gate ``m`` multiplies every gate site (see :mod:`cpd_mm.comb.gates`). At
``m = 1`` the gate gradient of channel c is
``∂L/∂m_c = Σ_sites Σ_positions y_c · ∂L/∂y_c``. Where a site's module has
parameters that are homogeneous of degree one in each output channel (weight
rows and bias of a conv or linear, a norm's affine parameters; the handler
says which), that sum equals ``Σ θ·∂L/∂θ`` over those parameters, collected
by gradient hooks as backward runs; other sites (parameter-free modules,
modules whose parameters do not train) use the activation and its gradient
directly. Handlers that gate inside a module (attention projections) name
their own parameters. The runner's own loss (task + distillation) drives
the scores.

Scores (per channel, accumulated over a pruning interval, on the device):
  - ``hessian``: (∂L/∂m_c)², the squared-gradient estimate of the Hessian
    diagonal restricted to the gates, from the batch gradient (the paper's
    practical score);
  - ``fisher``: Σ_b (∂L/∂m_c restricted to sample b)², the same estimate
    from per-sample gate gradients (the empirical Fisher diagonal of the
    gates: Torch-Pruning's Hessian/OBD estimator and mmrazor's GroupFisher
    take per-sample gradients too). With a mean-reduced loss both have the
    same expectation where the mean gradient is 0 (a converged model:
    E[(Σ_b s_b)²] = Σ_b E[s_b²]), but a batch of B samples gives B squared
    terms instead of one, so the ranking is far less noisy. Every gate
    site is read from its output and the output's gradient (``y·∂L/∂y``
    summed over positions, per sample); the output is copied in the forward
    (an in-place op after the site would change it), which costs one more
    activation per gated layer while pruning. Gates inside a module
    (attention heads) and sites whose output has another batch size are
    read from the batch gradient and scored as ``hessian``;
  - ``taylor``: |∂L/∂m_c| (first-order Taylor);
  - ``hessian_fd``: (H v)_c², the Hessian restricted to the gates times a
    random v ~ N(0, I), by a finite difference of explicit gate gradients,
    ``(∇_m L(m + εv) - ∇_m L(m)) / ε``: E_v[(Hv)_c²] is the squared norm of
    row c of the Hessian (the paper's exact variant). Each scoring step
    (:meth:`ImportanceAccumulator.probe`, once per iteration) costs two
    forward/backward passes more on the same batch;
  - ``l1``: Σ|θ| of the gate parameters (magnitude);
  - ``random``: uniform random.
Each backward contributes once (hooks see one backward's gradient, also
under gradient accumulation); gradients scaled by AMP are unscaled with the
scale of that backward, and a backward whose gradients overflowed is
skipped, without a host synchronisation. Under DDP each step's
contribution is summed over the ranks before it is added, so every rank
holds the same scores at every step (and a checkpoint of any rank resumes
the run exactly). Memory normalisation divides by
the group's activation memory, B·H·W of the producers' outputs times the
group's active channels.
"""
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..comb.groups import CombResult
from ..comb.handlers import handler_for
from ..comb.space import along, channel_axis
from ..comb.verify import model_outputs

IMPORTANCE_TYPES = ('hessian', 'fisher', 'hessian_fd', 'taylor', 'l1',
                    'random')
# kinds scored from gradients as the model trains, whose scores are state
_GRADIENT_KINDS = ('hessian', 'fisher', 'taylor')


def _site_lines(comb: CombResult):
    """module -> (channel axis of its output, atoms along it)."""
    out = {}
    for s in comb.sites:
        ch = channel_axis(s.ids)
        if ch is not None and s.module not in out:
            out[s.module] = (ch - s.ids.ndim, along(s.ids, ch,
                                                    s.ids.shape[ch]))
    return out


def gate_parameters(model: nn.Module, comb: CombResult):
    """Split the gates into parameter-scored and activation-scored ones.

    Returns ``(params, activation_sites)``: ``params`` is a list of
    ``(name, parameter, axis, channel per position)``; ``activation_sites``
    maps module names to ``(output channel axis, channel per position)``.
    """
    modules = dict(model.named_modules())
    params, acts = [], {}
    for name, (axis, atoms) in _site_lines(comb).items():
        m = modules[name]
        h = handler_for(m)
        rec = comb.records.get(name)
        chans = comb.channels(atoms)
        found = []
        if h is not None and rec is not None:
            for pname, pax in h.site_parameters(m, rec):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter) and \
                        p.shape[pax] == len(chans):
                    found.append((f'{name}.{pname}', p, pax, chans))
        if found and all(p.requires_grad for _, p, _, _ in found):
            params += found
        else:
            acts[name] = (axis, chans)
    return params + internal_gate_parameters(model, comb), acts


def internal_gate_parameters(model: nn.Module, comb: CombResult):
    """Gates inside modules (attention heads), as ``(name, parameter,
    axis, channel per position)``: their handlers name the parameters."""
    modules = dict(model.named_modules())
    out = []
    for name, rec in comb.records.items():
        m = modules[name]
        for pname, pax, atoms in handler_for(m).internal_gates(m, rec):
            p = m.get_parameter(pname)
            out.append((f'{name}.{pname}', p, pax, comb.channels(atoms)))
    return out


class ImportanceAccumulator:
    """Collects per-channel scores between pruning steps.

    Args:
        model, comb: the model being pruned and its groups.
        kind: one of :data:`IMPORTANCE_TYPES`.
        seed: for ``random``.
        reduce: ``reduce(tensor)`` sums a tensor over the data-parallel
            ranks in place (DDP), or None. Each step's contribution is
            reduced before it is added, so ``scores`` are the same on every
            rank at every step and any rank's :meth:`state_dict` is the
            whole run's: a resumed run continues the same sum.

    Attributes:
        unscored (np.ndarray): bool per channel whose gate gradient could
            not be observed (its layer's output does not require grad, e.g.
            a frozen stage); they must not be pruned on a zero score. See
            :meth:`find_unscored` to know them before training.
    """

    def __init__(self, model: nn.Module, comb: CombResult,
                 kind: str = 'hessian', seed: int = 0,
                 reduce: Optional[Callable[[torch.Tensor], None]] = None):
        if kind not in IMPORTANCE_TYPES:
            raise ValueError(f'importance must be one of {IMPORTANCE_TYPES},'
                             f' but got {kind!r}')
        self.kind, self.comb, self.seed = kind, comb, seed
        self._reduce = reduce
        self.params, self.activation_sites = gate_parameters(model, comb)
        p0 = next(iter(model.parameters()), None)
        dev = p0.device if p0 is not None else torch.device('cpu')
        acc = torch.float64 if dev.type in ('cpu', 'cuda') else torch.float32
        n = comb.num_channels
        self._grad = torch.zeros(n + 1, device=dev)
        # fisher: per-sample gate gradients of the current backward, and
        # the channels read (also) from the batch gradient
        self._per_sample = None
        self.batch_only = np.zeros(n, dtype=bool)
        self._batch_only_t = None
        self.scores = torch.zeros(n, device=dev, dtype=acc)
        self.iters_t = torch.zeros((), device=dev, dtype=torch.int64)
        self.unscored = np.zeros(n, dtype=bool)
        self._handles = []
        self._removed = False
        self._probes = 0
        if kind not in _GRADIENT_KINDS:
            return
        if kind == 'fisher':
            self._hook_per_sample(model)
            return
        for _, p, axis, chans in self.params:
            if p.requires_grad:
                self._handles.append(p.register_hook(
                    self._param_hook(p, axis, self._index(chans, dev))))
            else:  # a frozen attention projection: no gradient to read
                self.unscored[chans[chans >= 0]] = True
        modules = dict(model.named_modules())
        for name, (axis, chans) in self.activation_sites.items():
            self._handles.append(modules[name].register_forward_hook(
                self._activation_hook(axis, chans, self._index(chans, dev))))

    def _hook_per_sample(self, model: nn.Module) -> None:
        """``fisher``: every gate site's output, per sample; the gates
        inside modules from their parameters' batch gradient."""
        dev = self._grad.device
        modules = dict(model.named_modules())
        for name, (axis, atoms) in _site_lines(self.comb).items():
            chans = self.comb.channels(atoms)
            self._handles.append(modules[name].register_forward_hook(
                self._per_sample_hook(axis, chans, self._index(chans, dev))))
        for _, p, axis, chans in internal_gate_parameters(model, self.comb):
            if p.requires_grad:
                self.batch_only[chans[chans >= 0]] = True
                self._handles.append(p.register_hook(
                    self._param_hook(p, axis, self._index(chans, dev))))
            else:
                self.unscored[chans[chans >= 0]] = True

    def _per_sample_hook(self, axis, chans, idx):
        def fn(module, args, out):
            if not isinstance(out, torch.Tensor) or \
                    not torch.is_grad_enabled():
                return
            if not out.requires_grad:
                self.unscored[chans[chans >= 0]] = True
                return
            y = out.detach().clone()  # an in-place op may follow

            def grad_fn(grad):
                # (in float32: AMP scales the gradient, a half product
                # summed over positions can overflow)
                prod = y.float() * grad.detach().float()
                ax = axis % prod.dim()
                if ax == 0 or prod.dim() < 2:  # no batch axis to keep
                    self.batch_only[chans[chans >= 0]] = True
                    dims = [d for d in range(prod.dim()) if d != ax]
                    self._add(prod.sum(dims) if dims else prod, idx)
                    return
                dims = [d for d in range(1, prod.dim()) if d != ax]
                self._add_per_sample(prod.sum(dims) if dims else prod,
                                     chans, idx)
            out.register_hook(grad_fn)
        return fn

    def _add_per_sample(self, per, chans, idx):
        """Add ``per`` (batch, channels of the site) to this backward's
        per-sample gate gradients; a site with another batch size than the
        first one of the backward goes to the batch gradient."""
        n = self.comb.num_channels
        buf = self._per_sample
        if buf is None:
            buf = self._per_sample = torch.zeros(
                per.shape[0], n + 1, device=per.device)
        if per.shape[0] != buf.shape[0]:
            self.batch_only[chans[chans >= 0]] = True
            self._add(per.sum(0), idx)
            return
        if idx.device != per.device:
            idx = idx.to(per.device)
        buf.index_add_(1, idx, per.float())

    def _index(self, chans, device):
        n = self.comb.num_channels
        return torch.as_tensor(np.where(chans >= 0, chans, n), device=device)

    def _add(self, per, idx):
        if idx.device != per.device:
            idx = idx.to(per.device)
        if self._grad.device != per.device:
            self._grad = self._grad.to(per.device)
        self._grad.index_add_(0, idx, per.float())

    def _param_hook(self, p, axis, idx):
        def fn(grad):
            prod = p.detach() * grad.detach()
            dims = [d for d in range(prod.dim()) if d != axis]
            self._add(prod.sum(dims) if dims else prod, idx)
        return fn

    def _activation_hook(self, axis, chans, idx):
        def fn(module, args, out):
            if not isinstance(out, torch.Tensor) or \
                    not torch.is_grad_enabled():
                return
            if not out.requires_grad:
                self.unscored[chans[chans >= 0]] = True
                return
            y = out.detach()

            def grad_fn(grad):
                prod = y * grad.detach()
                ax = axis % prod.dim()
                dims = [d for d in range(prod.dim()) if d != ax]
                self._add(prod.sum(dims) if dims else prod, idx)
            out.register_hook(grad_fn)
        return fn

    def find_unscored(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        """Mark, before training, the channels no backward will score: one
        forward of ``model`` on ``x`` in eval mode (no statistics move, no
        backward) marks the activation sites whose outputs do not require
        grad (frozen parameters upstream, e.g. ``frozen_stages``), as
        training would. Returns :attr:`unscored`."""
        was_training = model.training
        try:
            with torch.enable_grad():  # (its gradient hooks die with it)
                model_outputs(model.eval(), x, None)
        finally:
            model.train(was_training)
        return self.unscored

    def _fold(self, v: torch.Tensor) -> None:
        """Add one step's scores (summed over ranks first); a step whose
        sum is not finite (an AMP overflow on some rank) is skipped."""
        if self._reduce is not None:
            self._reduce(v)
        ok = torch.isfinite(v).all()
        self.scores += torch.where(ok, v, torch.zeros_like(v))
        self.iters_t += ok.to(torch.int64)

    def probe(self, gates, loss_fn, eps: float = 1e-2,
              module: Optional[nn.Module] = None) -> None:
        """``hessian_fd``: fold in one finite-difference Hessian-vector
        product at the current weights. ``loss_fn()`` returns the training
        loss of the current batch (its random ops are replayed alike in
        both passes); ``module`` is the module whose forward it runs
        (default: ``gates.model``; a distiller wrapping it, whose losses
        keep memories). Every buffer of ``module`` (BatchNorm statistics,
        memory queues and their pointers) is left as it was (a copy of
        them is held during the probe)."""
        module = gates.model if module is None else module
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        m = gates.mask.detach()
        # v and the replayed randomness depend on the seed and the probe
        # count only: every rank and a resumed run draw the same
        gen = torch.Generator().manual_seed(self.seed * 1000003 +
                                            self._probes)
        self._probes += 1
        v = torch.randn(m.numel(), generator=gen).to(m)
        v[-1] = 0
        grads = []
        seed = int(torch.randint(0, 2 ** 31 - 1, (1, ), generator=gen))
        for point in (m, m * (1 + eps * v)):
            leaf = point.detach().requires_grad_()
            devices = [m.device] if m.device.type == 'cuda' else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                with gates.probing(leaf):
                    loss = loss_fn()
            grads.append(torch.autograd.grad(loss, leaf)[0][:-1])
            for b, saved in buffers:
                b.copy_(saved)
        hv = (grads[1] - grads[0]).to(self.scores.dtype) / eps
        self._fold(hv * hv)

    def step(self, inv_scale: Optional[torch.Tensor] = None) -> None:
        """Close one backward: fold its gate gradient in (device only).

        Args:
            inv_scale: 1 / loss scale of that backward (AMP), a tensor or
                a float.
        """
        if self.kind == 'hessian_fd':  # scored by probe()
            return
        if self.kind not in _GRADIENT_KINDS:
            self.iters_t += 1
            return
        g = self._grad[:-1].to(self.scores.dtype)
        per = None
        if self._per_sample is not None:
            per = self._per_sample[:, :-1].to(self.scores.dtype)
            self._per_sample = None
        if isinstance(inv_scale, torch.Tensor):
            g = g * inv_scale.to(g)
            per = None if per is None else per * inv_scale.to(per)
        elif inv_scale is not None:
            g = g * inv_scale
            per = None if per is None else per * inv_scale
        if self.kind == 'fisher':
            if per is None:
                v = g * g
            else:  # a channel read (also) from the batch gradient: hessian
                both = per.sum(0) + g
                v = torch.where(self._batch_only_mask(g.device), both * both,
                                (per * per).sum(0))
        else:
            v = g * g if self.kind == 'hessian' else g.abs()
        self._fold(v)
        self._grad.zero_()

    def _batch_only_mask(self, device):
        """:attr:`batch_only` on ``device`` (copied when it changed)."""
        count = int(self.batch_only.sum())  # (host side: no sync)
        if self._batch_only_t is None or self._batch_only_t[0] != count or \
                self._batch_only_t[1].device != device:
            self._batch_only_t = (count, torch.as_tensor(self.batch_only,
                                                         device=device))
        return self._batch_only_t[1]

    @property
    def iters(self) -> int:
        """Backwards folded in since the last reset (a host copy)."""
        return int(self.iters_t)

    def current(self, step: int = 0) -> np.ndarray:
        """Scores of every channel (higher = more important): one copy to
        the host."""
        if self.kind == 'l1':
            s = np.zeros(self.comb.num_channels)
            for _, p, axis, chans in self.params:
                dims = [d for d in range(p.dim()) if d != axis]
                v = p.detach().abs().float()
                v = (v.sum(dims) if dims else v).cpu().double().numpy()
                ok = chans >= 0
                np.add.at(s, chans[ok], v[ok])
            return s
        if self.kind == 'random':
            return np.random.default_rng(self.seed + step).random(
                self.comb.num_channels)
        # (a copy: on the CPU .cpu().double() would share the live buffer)
        return self.scores.detach().cpu().double().numpy().copy()

    def reset(self) -> None:
        self.scores.zero_()
        self.iters_t.zero_()

    def remove(self) -> None:
        """Detach every hook (pruning is over: no cost on later steps)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True

    @property
    def needs_loss(self) -> bool:
        """Scores come from :meth:`probe` of each batch's loss."""
        return self.kind == 'hessian_fd' and not self._removed

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def state_dict(self) -> dict:
        return dict(scores=self.current().tolist() if self.kind in (
            *_GRADIENT_KINDS, 'hessian_fd') else [], iters=self.iters,
            probes=self._probes,
            unscored=[int(i) for i in np.nonzero(self.unscored)[0]])

    def load_state_dict(self, state: dict) -> None:
        self._probes = int(state.get('probes', 0))
        if self.kind in (*_GRADIENT_KINDS, 'hessian_fd'):
            s = np.asarray(state['scores'], dtype=np.float64)
            if s.shape != tuple(self.scores.shape):
                raise ValueError('checkpointed importance scores do not '
                                 'match the model channels')
            self.scores.copy_(torch.from_numpy(s).to(self.scores))
        self.iters_t.fill_(int(state['iters']))
        self.unscored[np.asarray(state.get('unscored', []), np.int64)] = True


def inverse_loss_scale(optim_wrapper):
    """1 / the loss scale the next backward will use (AMP), or None; a
    device tensor or a float, never a host synchronisation."""
    scaler = getattr(optim_wrapper, 'loss_scaler', None)
    if scaler is None or not getattr(scaler, 'is_enabled', lambda: True)():
        return None
    scale = getattr(scaler, '_scale', None)
    if scale is None:  # set on the first scaled loss, to init_scale
        return 1.0 / float(scaler._init_scale)
    return torch.reciprocal(scale)


def normalise_by_memory(scores: np.ndarray, comb: CombResult,
                        kept: np.ndarray) -> np.ndarray:
    """Divide each channel's score by its group's activation memory."""
    out = scores.copy()
    for g in comb.groups:
        active = max(int(kept[g.channels].sum()), 1)
        mem = max(g.numel_per_channel, 1) * active
        out[g.channels] = scores[g.channels] / mem
    return out
