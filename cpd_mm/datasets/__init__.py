"""Data sets: procedurally generated demo data (no download needed)."""
from .demo_data import make_classification_set, make_segmentation_set
from .demo_det import make_detection_set

__all__ = [
    'make_classification_set', 'make_segmentation_set', 'make_detection_set'
]
