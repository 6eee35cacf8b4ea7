"""Modules MMSegmentation lacks: the SeaFormer backbone and its LightHead,
registered in mmengine's root ``MODELS`` (found from any default scope)."""
from .light_head import LightHead
from .seaformer import SeaFormer

__all__ = ['SeaFormer', 'LightHead']
