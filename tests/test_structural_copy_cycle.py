import gc

import torch
import torch.nn as nn
import torchvision

from cpd_mm.comb import comb_model, verify_comb


def test_verification_leaves_no_copy_in_a_reference_cycle():
    """The copies verification makes (generic copy, twin, pruned copies)
    are freed when they go out of use, not at the garbage collector's next
    full run: a copy kept in a reference cycle holds its pruned weights
    and makes a later gen-2 collection (tens of ms) more likely."""
    model = torchvision.models.resnet18().eval()
    comb = comb_model(model, input_shape=(1, 3, 32, 32), verify=False)
    x = torch.randn(1, 3, 32, 32)
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        verify_comb(model, comb, x)
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage
                  if isinstance(o, nn.Module)]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert not leaked, f'{len(leaked)} modules in cycles, e.g. {leaked[:3]}'
