"""Helpers of the zoo check: model outputs, error summaries, diagnosis."""
import os.path as osp
import re
import traceback

import torch
from torch.utils._pytree import tree_flatten


def outputs(model, x, seed=0):
    """Tensors of ``default_forward`` (auxiliary heads included). The RNG is
    seeded first: some models draw random tensors in eval mode (SegNeXt's
    Hamburger draws its NMF bases with torch.rand)."""
    from cpd_mm.comb import default_forward
    torch.manual_seed(seed)
    out = default_forward(model, x)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def max_rel_diff(ys, zs):
    if len(ys) != len(zs):
        return None, f'{len(ys)} outputs vs {len(zs)}'
    worst = 0.0
    for a, b in zip(ys, zs):
        if a.shape != b.shape:
            return None, f'output shape {tuple(a.shape)} vs {tuple(b.shape)}'
        d = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        if d != d:  # NaN
            return None, 'NaN in outputs'
        worst = max(worst, d)
    return worst, ''


def short_error(e: BaseException, limit: int = 240) -> dict:
    """Exception type, first line of its message, and where it was raised:
    the innermost frame, and the innermost frame inside cpd_mm."""
    msg = str(e).strip().split('\n')[0]
    if len(msg) > limit:
        msg = msg[:limit] + '...'
    frames = traceback.extract_tb(e.__traceback__)
    where = cpd = ''
    if frames:
        f = frames[-1]
        where = f'{_short_path(f.filename)}:{f.lineno} {f.name}'
        # default_forward only calls the model: not where cpd_mm failed
        own = [f for f in frames if '/cpd_mm/' in f.filename
               and f.name != 'default_forward']
        if own:
            cpd = f'{_short_path(own[-1].filename)}:{own[-1].lineno} ' \
                  f'{own[-1].name}'
    # the innermost frame in the model's own code (not torch, not cpd_mm)
    lib = [f for f in frames if re.search(
        r'/(mmpretrain|mmseg|mmcv|mmdet|torchvision)/', f.filename)]
    model_where = (f'{_short_path(lib[-1].filename)}:{lib[-1].lineno} '
                   f'{lib[-1].name}') if lib else ''
    return dict(error=f'{type(e).__name__}: {msg}', where=where,
                cpd_where=cpd, model_where=model_where)


def _short_path(path):
    for marker in ('site-packages/', '/cpd_mm/', '/benchmarks/'):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return ('cpd_mm/' + tail) if marker == '/cpd_mm/' else tail
    return osp.basename(path)


def reason_kind(reason: str) -> str:
    """A frozen reason with module paths and numbers replaced by ``*``, so
    that reasons from different layers of one construct add up."""
    r = re.sub(r'\b[\w]+(\.[\w\']+)+', '*', reason)
    r = re.sub(r'\[[\d, ]+\]', '[*]', r)
    return re.sub(r'\b\d+\b', '*', r)


def _leaf_outputs(model, x):
    """Output of every leaf module in call order: {(name, call): tensor}."""
    seen, outs, handles = {}, {}, []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue

        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor):
                k = seen[name] = seen.get(name, -1) + 1
                outs[(name, k)] = out.detach().clone()
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs(model, x)
    finally:
        for h in handles:
            h.remove()
    return outs


def first_divergence(gated_model, pruned, x, tol):
    """The first leaf module (call order of the gated model) whose output
    has the same shape in both models but differs: where a wrong prune
    shows first. ``gated_model`` must have its gates attached."""
    a, b = _leaf_outputs(gated_model, x), _leaf_outputs(pruned, x)
    for key, ya in a.items():
        yb = b.get(key)
        if yb is None or ya.shape != yb.shape or ya.dtype != yb.dtype:
            continue
        d = float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))
        if d > tol:
            return f'{key[0]} (call {key[1]}): rel diff {d:.2e}'
    return ''
