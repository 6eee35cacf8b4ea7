"""Convert an official SeaFormer checkpoint (fudan-zvg/SeaFormer) for cpd_mm.

Official key names already match ``cpd_mm.models.SeaFormer``/``LightHead``;
what differs is the packaging. This tool picks the weights (``state_dict``,
or ``state_dict_ema`` with ``--ema``), strips wrapper prefixes (``module.``),
drops the ImageNet classifier (``linear.*``) and training state, detects the
variant from the tensor shapes, checks every key and shape strictly against a
freshly built model, and writes ``{'meta': ..., 'state_dict': ...}``:

* from an ImageNet checkpoint: unprefixed backbone weights, for
  ``backbone.init_cfg=dict(type='Pretrained', checkpoint=DST)`` in
  ``configs/seaformer/*.py``;
* from an ADE20K checkpoint: the whole segmentor (``backbone.*``,
  ``decode_head.*``), for ``load_from=DST`` or ``tools/test.py``; checked
  against the model of ``configs/seaformer/`` (or ``--config``).

Example::

    python tools/convert_seaformer.py SeaFormer_T.pth \\
        checkpoints/seaformer/seaformer-t_imagenet.pth --ema
"""
import argparse
import os
import os.path as osp

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ARCHS = ('tiny', 'small', 'base', 'large')
ARCH_CONFIGS = {
    a: osp.join(REPO, 'configs', 'seaformer',
                f'seaformer-{a[0]}_8xb4-160k_ade20k-512x512.py')
    for a in ARCHS
}


def detect_arch(backbone_state):
    """The variant whose backbone has exactly these keys and shapes.

    Raises ``ValueError`` naming the closest variant and its differences.
    """
    from cpd_mm.models import SeaFormer
    from cpd_mm.models.seaformer_checkpoint import check_state_dict
    errors = {}
    for arch in ARCHS:
        model = SeaFormer(arch)
        expected = model.state_dict()
        try:
            check_state_dict(model, backbone_state, f'SeaFormer-{arch}')
            return arch
        except ValueError as e:
            # closeness: keys in only one of the two, plus shape mismatches
            diff = set(expected) ^ set(backbone_state)
            diff |= {k for k in set(expected) & set(backbone_state)
                     if expected[k].shape != backbone_state[k].shape}
            errors[arch] = (len(diff), str(e))
    closest = min(errors, key=lambda a: errors[a][0])
    raise ValueError('the backbone weights match no SeaFormer variant '
                     f'{ARCHS}; closest is {closest!r}: {errors[closest][1]}')


def build_segmentor(config, num_classes):
    """The EncoderDecoder of ``config`` with ``num_classes`` outputs and no
    pretrained-weight loading."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.num_classes = num_classes
    cfg.model.pop('pretrained', None)
    return MODELS.build(cfg.model)


def convert(src, dst, arch='auto', ema=False, config=None):
    """Convert ``src`` into ``dst``; returns the written meta dict.

    Args:
        src (str): Official ImageNet or ADE20K checkpoint.
        dst (str): Output path (directories are created).
        arch (str): 'auto' (detect from shapes) or one of ``ARCHS``.
        ema (bool): Take ``state_dict_ema`` (error if the file has none).
        config (str, optional): Segmentation config to check an ADE20K
            checkpoint against. Default: the variant's config in
            ``configs/seaformer/``.

    Raises:
        RuntimeError: ``src`` is missing or corrupt.
        KeyError: no weights found, or keys of unknown modules.
        ValueError: the weights do not fit the (detected or given) variant.
    """
    import cpd_mm  # noqa: F401  (registers the modules, safe loading)
    from cpd_mm.models import SeaFormer
    from cpd_mm.models.seaformer_checkpoint import (check_state_dict,
                                                    read_checkpoint,
                                                    select_state_dict,
                                                    split_state_dict)
    ckpt = read_checkpoint(src)
    state, source = select_state_dict(ckpt, ema=bool(ema))
    backbone, head, kind = split_state_dict(state)
    if arch == 'auto':
        arch = detect_arch(backbone)
    elif arch not in ARCHS:
        raise ValueError(f'`arch` must be "auto" or one of {ARCHS}, '
                         f'but got {arch!r}')
    backbone = check_state_dict(SeaFormer(arch), backbone,
                                f'"{src}" ({source}) as SeaFormer-{arch}')
    meta = dict(source=osp.abspath(src), source_key=source, kind=kind,
                arch=arch, converted_by='tools/convert_seaformer.py')
    if kind == 'imagenet':
        out = backbone
    else:
        if 'decode_head.conv_seg.weight' not in head:
            raise KeyError(f'"{src}" has backbone weights but no '
                           '"decode_head.conv_seg.weight"')
        num_classes = head['decode_head.conv_seg.weight'].shape[0]
        segmentor = build_segmentor(config or ARCH_CONFIGS[arch],
                                    num_classes)
        out = {'backbone.' + k: v for k, v in backbone.items()}
        out.update(head)
        out = check_state_dict(segmentor, out,
                               f'"{src}" ({source}) as SeaFormer-{arch} '
                               'segmentor')
        meta['num_classes'] = num_classes
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(meta=meta, state_dict=out), dst)
    return meta


def parse_args():
    parser = argparse.ArgumentParser(
        description='Convert an official SeaFormer ImageNet or ADE20K '
        'checkpoint into one cpd_mm/MMSegmentation loads strictly.')
    parser.add_argument('src', help='official checkpoint (.pth / .pth.tar)')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument('--arch', default='auto',
                        choices=('auto', ) + ARCHS,
                        help='variant (default: detected from the shapes)')
    parser.add_argument('--ema', action='store_true',
                        help='take state_dict_ema (the weights the official '
                        'segmentation code starts from) instead of '
                        'state_dict')
    parser.add_argument('--config', default=None,
                        help='segmentation config to check an ADE20K '
                        'checkpoint against (default: configs/seaformer/)')
    return parser.parse_args()


def main():
    args = parse_args()
    meta = convert(args.src, args.dst, args.arch, args.ema, args.config)
    print(f'wrote {args.dst}: SeaFormer-{meta["arch"]} {meta["kind"]} '
          f'weights from "{meta["source_key"]}"')


if __name__ == '__main__':
    main()
