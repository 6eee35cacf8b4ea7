"""Cross-image relational KD (Yang et al., CVPR 2022) for segmentation.

CIRKD transfers *relations between pixels*, across the images of a batch
and across images seen earlier, instead of per-pixel predictions:

* mini-batch pixel-to-pixel: for every pair of images (i, j) of the batch,
  the similarities of each pixel embedding of image i to all pixel
  embeddings of image j form a distribution (softmax at the contrast
  temperature); the student's must match the teacher's (KL, averaged over
  pixels and over the B² pairs);
* memory pixel-to-pixel / pixel-to-region: every labelled pixel of the
  batch is an anchor; its similarities to teacher pixel embeddings and
  teacher region embeddings (class-mean embeddings of one image) sampled
  from class-aware memories form distributions that are matched in the
  same way. The student embeddings first go through a projection head to
  the teacher's width.

Defaults follow the official code (github.com/winycg/CIRKD, train_cirkd.py
and losses/cirkd_*.py); deviations are listed in :class:`CIRKDLoss`.
"""
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dist import all_gather, is_distributed
from mmengine.registry import MODELS
from torch import Tensor

from .shapes import check_pair, resize_labels, resize_to, zero_like_graph


def relation_kl(logits_S: Tensor, logits_T: Tensor, tau: float = 1.0) -> Tensor:
    """KL(softmax(T/tau) ‖ softmax(S/tau)) per row, averaged over rows, × tau².

    The last dim holds the embeddings an anchor is related to; every other
    dim indexes anchors.
    """
    log_p_s = F.log_softmax(logits_S / tau, dim=-1)
    log_p_t = F.log_softmax(logits_T / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * tau**2


@MODELS.register_module()
class CIRKDLoss(nn.Module):
    """CIRKD: mini-batch and memory-based pixel/region relation distillation.

    ``forward`` returns a dict with the three weighted terms
    ``minibatch_p2p``, ``memory_p2p`` and ``memory_p2r``; the distiller
    logs them as ``loss_kd_<name>_<term>``. The published method also uses
    vanilla KD on the logits, which is a separate :class:`KLDivergence`
    item (the ``'cirkd'`` preset adds it).

    Inputs are the *embeddings* before the classifier (e.g. the
    ``'pre_logits'`` source of a decode head) and the label map.

    Args:
        num_classes (int): number of classes (one memory per class).
        student_channels (int): width of the student embeddings.
        teacher_channels (int): width of the teacher embeddings.
        pixel_memory_size (int): teacher pixel embeddings kept per class.
            Defaults to 20000.
        region_memory_size (int): teacher region embeddings kept per class.
            Defaults to 2000.
        pixel_contrast_size (int): pixel embeddings sampled from the memory
            per step, over all classes; each class contributes
            ``pixel_contrast_size // num_classes + 1`` (as the official
            training script computes it), at most its memory size.
            Defaults to 4096.
        region_contrast_size (int): the same for regions. Defaults to 1024.
        pixels_per_update (int): pixels of each class of each image pushed
            into the pixel memory per step. Defaults to 16.
        contrast_temperature (float): temperature of the similarities
            (cosine / τ). Defaults to 0.1.
        contrast_kd_temperature (float): KD temperature applied on top for
            the memory terms (their KL is scaled by its square).
            Defaults to 1.0.
        minibatch_weight (float): weight of the mini-batch term.
            Defaults to 1.0.
        memory_pixel_weight (float): weight of the memory pixel-to-pixel
            term. Defaults to 0.1.
        memory_region_weight (float): weight of the memory pixel-to-region
            term. Defaults to 0.1.
        loss_weight (float): multiplies all three terms. Defaults to 1.0.
        ignore_index (int): label of unlabelled pixels: they are neither
            anchors nor enqueued. Defaults to 255 (MMSegmentation's).
        pooling (bool): 2×2 average-pool the embeddings before the
            mini-batch term (its cost is quadratic in the pixels).
            Defaults to False.
        seed (int): seed of the sampling generator (see Note).
            Defaults to 0.

    Note:
        - The projection head (1×1 conv, BN, ReLU, 1×1 conv, no biases, as
          in the paper) is always used for the memory terms, even when the
          widths agree, as in the official code. The mini-batch term
          compares pixel-by-pixel similarity matrices, which do not depend
          on the width, so it uses the raw student embeddings. The head is
          trained with the student but is not part of it.
        - When pruning removes student channels physically,
          :meth:`shrink_student_channels` slices the head's input alike
          (the distiller calls it): the mini-batch term is width-independent
          and the head's columns of removed channels only ever multiplied
          zeros, so all three terms keep their values.
        - Memories are buffers (``pixel_queue`` (K, P, D),
          ``region_queue`` (K, R, D), their ring pointers ``*_ptr`` (K,),
          and ``num_updates``), so checkpoints keep them. They start as
          random unit vectors (as in the official code). Writes wrap around
          (a true ring buffer; the official code instead writes the last
          slots and restarts at 0), and the pixels pushed for a class are
          drawn among the pixels *of that class*.
        - Under DDP the teacher embeddings and labels of all ranks are
          gathered (``mmengine.dist.all_gather``, which needs the same
          batch and feature shape on every rank) before enqueueing. All
          random choices use a generator seeded with ``seed +
          num_updates``, so every rank writes the same memories and picks
          the same contrast samples: the buffers stay identical without
          broadcasting, and ``broadcast_buffers=False`` in the DDP wrapper
          avoids sending the (large) memories every step.
    """

    requires_labels = True

    def __init__(self,
                 num_classes: int,
                 student_channels: int,
                 teacher_channels: int,
                 pixel_memory_size: int = 20000,
                 region_memory_size: int = 2000,
                 pixel_contrast_size: int = 4096,
                 region_contrast_size: int = 1024,
                 pixels_per_update: int = 16,
                 contrast_temperature: float = 0.1,
                 contrast_kd_temperature: float = 1.0,
                 minibatch_weight: float = 1.0,
                 memory_pixel_weight: float = 0.1,
                 memory_region_weight: float = 0.1,
                 loss_weight: float = 1.0,
                 ignore_index: int = 255,
                 pooling: bool = False,
                 seed: int = 0):
        super().__init__()
        for name, value in (('num_classes', num_classes),
                            ('student_channels', student_channels),
                            ('teacher_channels', teacher_channels),
                            ('pixel_memory_size', pixel_memory_size),
                            ('region_memory_size', region_memory_size),
                            ('pixel_contrast_size', pixel_contrast_size),
                            ('region_contrast_size', region_contrast_size),
                            ('pixels_per_update', pixels_per_update)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'`{name}` must be a positive int, '
                                 f'but got {value!r}')
        if pixels_per_update > pixel_memory_size:
            raise ValueError('`pixels_per_update` must be <= '
                             f'`pixel_memory_size`, but got '
                             f'{pixels_per_update} > {pixel_memory_size}')
        if contrast_temperature <= 0 or contrast_kd_temperature <= 0:
            raise ValueError('temperatures must be > 0, but got '
                             f'{contrast_temperature}, '
                             f'{contrast_kd_temperature}')
        self.num_classes = num_classes
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.pixels_per_update = pixels_per_update
        self.pixel_samples = min(pixel_contrast_size // num_classes + 1,
                                 pixel_memory_size)
        self.region_samples = min(region_contrast_size // num_classes + 1,
                                  region_memory_size)
        self.contrast_temperature = contrast_temperature
        self.contrast_kd_temperature = contrast_kd_temperature
        self.minibatch_weight = minibatch_weight
        self.memory_pixel_weight = memory_pixel_weight
        self.memory_region_weight = memory_region_weight
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.pooling = pooling
        self.seed = seed

        self.project_head = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels), nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False))

        # same seed on every rank: the memories start identical everywhere
        g = torch.Generator().manual_seed(seed)
        dim = teacher_channels
        self.register_buffer('pixel_queue', F.normalize(torch.randn(
            num_classes, pixel_memory_size, dim, generator=g), dim=2))
        self.register_buffer('pixel_queue_ptr',
                             torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer('region_queue', F.normalize(torch.randn(
            num_classes, region_memory_size, dim, generator=g), dim=2))
        self.register_buffer('region_queue_ptr',
                             torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer('num_updates', torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def shrink_student_channels(self, keep: np.ndarray) -> None:
        """Follow a student whose embeddings lost channels.

        Args:
            keep (np.ndarray): bool per channel of the *current* student
                embeddings (``student_channels`` entries), True for those
                still present.

        The projection head's first conv keeps the input columns of the
        kept channels; its weight is a new ``nn.Parameter`` (same
        ``requires_grad``, its ``grad`` sliced alike), so optimizer state can
        be remapped from the old one. ``student_channels`` becomes the kept
        number.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.student_channels, ) or not keep.any():
            raise ValueError(
                'CIRKDLoss.shrink_student_channels: `keep` must be a bool '
                f'mask of {self.student_channels} entries (the current '
                f'student_channels) keeping at least one, but got shape '
                f'{keep.shape} with {int(keep.sum())} kept')
        conv = self.project_head[0]
        old = conv.weight
        index = torch.as_tensor(np.flatnonzero(keep), device=old.device)
        new = nn.Parameter(old.index_select(1, index),
                           requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad.index_select(1, index)
        conv.weight = new
        conv.in_channels = self.student_channels = int(keep.sum())

    def _generator(self) -> torch.Generator:
        # a function of the step only, so all ranks draw the same numbers
        return torch.Generator().manual_seed(self.seed +
                                             int(self.num_updates))

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor,
                generator: Optional[torch.Generator] = None) -> None:
        """Push teacher embeddings into the class-aware memories.

        For each image and each class c present in it (``ignore_index``
        excluded): the L2-normalised mean embedding of its class-c pixels
        goes into ``region_queue[c]`` and ``min(#pixels, pixels_per_update)``
        randomly chosen class-c pixel embeddings into ``pixel_queue[c]``,
        each at its ring pointer. Under DDP, all ranks' inputs are gathered
        first.

        Args:
            embeddings (Tensor): L2-normalised (over dim 1) teacher
                embeddings, (B, D, h, w).
            labels (Tensor): labels at the same resolution, (B, h, w).
            generator (torch.Generator, optional): source of randomness;
                defaults to the step-seeded one.
        """
        g = generator if generator is not None else self._generator()
        if is_distributed():
            embeddings = torch.cat(all_gather(embeddings.contiguous()))
            labels = torch.cat(all_gather(labels.contiguous()))
        num_pixels_mem = self.pixel_queue.shape[1]
        num_regions_mem = self.region_queue.shape[1]
        for feat, lab in zip(embeddings.flatten(2), labels.flatten(1)):
            for c in torch.unique(lab).tolist():
                if c == self.ignore_index:
                    continue
                if not 0 <= c < self.num_classes:
                    raise ValueError(f'CIRKDLoss: label {c} is outside '
                                     f'[0, {self.num_classes}) and is not '
                                     f'ignore_index={self.ignore_index}')
                idx = (lab == c).nonzero()[:, 0]
                ptr = int(self.region_queue_ptr[c])
                self.region_queue[c, ptr] = F.normalize(
                    feat[:, idx].mean(dim=1), dim=0)
                self.region_queue_ptr[c] = (ptr + 1) % num_regions_mem

                k = min(idx.numel(), self.pixels_per_update)
                pick = torch.randperm(idx.numel(), generator=g)[:k]
                pixels = feat[:, idx[pick.to(idx.device)]].t()
                ptr = int(self.pixel_queue_ptr[c])
                slots = (ptr + torch.arange(k)) % num_pixels_mem
                self.pixel_queue[c, slots.to(pixels.device)] = F.normalize(
                    pixels, dim=1)
                self.pixel_queue_ptr[c] = (ptr + k) % num_pixels_mem
        self.num_updates += 1

    def minibatch_loss(self, feat_S: Tensor, feat_T: Tensor) -> Tensor:
        """Mini-batch pixel-to-pixel term on raw embeddings (any widths)."""
        if self.pooling:
            feat_S = F.avg_pool2d(feat_S, 2, 2, ceil_mode=True)
            feat_T = F.avg_pool2d(feat_T, 2, 2, ceil_mode=True)
        fs = F.normalize(feat_S, dim=1).flatten(2)  # (B, Cs, HW)
        ft = F.normalize(feat_T, dim=1).flatten(2)  # (B, Ct, HW)
        # all B² image pairs at once: a pair-by-pair loop would keep the
        # same softmax outputs alive for backward, so it saves no memory
        sim_s = torch.einsum('icp,jcq->ijpq', fs, fs)
        sim_t = torch.einsum('icp,jcq->ijpq', ft, ft)
        # every pair has HW rows, so the mean over rows is the pair mean
        return relation_kl(sim_s / self.contrast_temperature,
                           sim_t / self.contrast_temperature)

    def memory_losses(self, feat_S: Tensor, feat_T: Tensor,
                      labels: Tensor) -> Tuple[Tensor, Tensor]:
        """Memory pixel-to-pixel and pixel-to-region terms.

        Enqueues the (normalised) teacher embeddings first, then relates
        every labelled pixel to embeddings sampled from the memories.
        """
        emb_S = F.normalize(self.project_head(feat_S), dim=1)
        emb_T = F.normalize(feat_T, dim=1)
        g = self._generator()
        self.enqueue(emb_T, labels, g)

        valid = labels.flatten() != self.ignore_index
        if not valid.any():
            zero = zero_like_graph(emb_S)
            return zero, zero
        dim = emb_T.shape[1]
        anchors_S = emb_S.permute(0, 2, 3, 1).reshape(-1, dim)[valid]
        anchors_T = emb_T.permute(0, 2, 3, 1).reshape(-1, dim)[valid]

        terms = []
        for queue, samples in ((self.pixel_queue, self.pixel_samples),
                               (self.region_queue, self.region_samples)):
            # the same slots of every class, as in the official code
            slots = torch.randperm(queue.shape[1], generator=g)[:samples]
            contrast = queue[:, slots.to(queue.device)].reshape(-1, dim)
            logits_S = anchors_S @ contrast.t() / self.contrast_temperature
            logits_T = anchors_T @ contrast.t() / self.contrast_temperature
            terms.append(
                relation_kl(logits_S, logits_T, self.contrast_kd_temperature))
        return terms[0], terms[1]

    def forward(self,
                preds_S: Tensor,
                preds_T: Tensor,
                gt: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Compute the three CIRKD terms.

        Args:
            preds_S (Tensor): student embeddings (B, student_channels, h, w).
            preds_T (Tensor): teacher embeddings (B, teacher_channels, h', w');
                detached here. The student map is bilinearly resized to
                (h', w') if needed.
            gt (Tensor): label map (B, H, W) at any resolution; it is
                nearest-resized to (h', w').
        """
        if gt is None:
            raise ValueError('CIRKDLoss needs the ground-truth label map '
                             '(segmentation data samples with gt_sem_seg)')
        check_pair('CIRKDLoss', preds_S, preds_T, ndims=(4, ),
                   same_channels=False)
        for role, t, width in (('student', preds_S, self.student_channels),
                               ('teacher', preds_T, self.teacher_channels)):
            if t.shape[1] != width:
                raise ValueError(f'CIRKDLoss: the {role} embeddings have '
                                 f'shape {tuple(t.shape)}, but '
                                 f'{role}_channels={width}')
        preds_T = preds_T.detach()
        preds_S = resize_to(preds_S, preds_T.shape[-2:])
        labels = resize_labels(gt.to(preds_T.device), preds_T.shape[-2:])

        minibatch = self.minibatch_loss(preds_S, preds_T)
        pixel, region = self.memory_losses(preds_S, preds_T, labels)
        w = self.loss_weight
        return dict(
            minibatch_p2p=w * self.minibatch_weight * minibatch,
            memory_p2p=w * self.memory_pixel_weight * pixel,
            memory_p2r=w * self.memory_region_weight * region)
