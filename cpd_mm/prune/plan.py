"""Pruning plans: plain data that rebuild a pruned model from its config.

A plan is JSON-serialisable::

    {'format': 'cpd_mm.plan/v1',
     'model': 'ImageClassifier',          # type of the model it was made for
     'input_shape': [1, 3, 64, 64],       # example input used to comb it
     'num_channels': 3880,                # channels found by comb (a check)
     'groups': {'backbone.layer1.0.conv1': {'num_channels': 64,
                                            'kept': [0, 3, 4, ...]}, ...}}

Groups not listed keep all their channels.  Checkpoints store the plan in
``meta['cpd_plan']``: build the model from the original config, call
:func:`apply_plan`, then load the weights.
"""
import json
from typing import Optional

import numpy as np
import torch.nn as nn

from ..comb import comb_model, prune_model

PLAN_META_KEY = 'cpd_plan'
PLAN_FORMAT = 'cpd_mm.plan/v1'


class PlanMismatchError(ValueError):
    """The plan does not fit the model built from the config."""


def make_plan(comb, kept: np.ndarray, model: Optional[nn.Module] = None) -> dict:
    """Plan of a keep-mask over ``comb``'s channels."""
    plan = comb.plan_from_kept(np.asarray(kept, dtype=bool))
    plan['num_channels'] = int(comb.num_channels)
    if model is not None:
        plan['model'] = type(model).__name__
    return plan


def validate_plan(plan) -> dict:
    if not isinstance(plan, dict) or plan.get('format') != PLAN_FORMAT:
        raise PlanMismatchError(
            f'not a cpd_mm plan (expected format {PLAN_FORMAT!r}, got '
            f'{plan.get("format") if isinstance(plan, dict) else type(plan)})')
    for key in ('input_shape', 'groups'):
        if key not in plan:
            raise PlanMismatchError(f'plan lacks {key!r}')
    return plan


def apply_plan(model: nn.Module, plan: dict, comb=None) -> nn.Module:
    """Prune ``model`` in place to the structure described by ``plan``.

    Raises:
        PlanMismatchError: with a message naming what does not fit.
    """
    validate_plan(plan)
    # the distillation wrapper prunes its student
    target = getattr(model, 'student', model)
    if plan.get('model') and plan['model'] != type(target).__name__:
        raise PlanMismatchError(
            f'the plan was made for a {plan["model"]}, but the config '
            f'builds a {type(target).__name__}')
    if comb is None:
        # the plan was checked when it was made: the structure is enough
        comb = comb_model(target, input_shape=plan['input_shape'],
                          verify=False)
    if plan.get('num_channels') not in (None, comb.num_channels):
        raise PlanMismatchError(
            f'the plan was made for a model with {plan["num_channels"]} '
            f'channels, this config builds one with {comb.num_channels}: '
            'use the config the checkpoint was trained with')
    try:
        kept = comb.kept_from_plan(plan)
    except (KeyError, ValueError) as e:
        raise PlanMismatchError(f'plan does not fit the model: {e}') from None
    prune_model(target, comb, kept)
    return model


def save_plan(plan: dict, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(plan, f, indent=1)


def load_plan(path: str) -> dict:
    with open(path) as f:
        return validate_plan(json.load(f))
