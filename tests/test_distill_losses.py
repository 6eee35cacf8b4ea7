"""Distillation losses against plain numpy computations on small tensors."""
import numpy as np
import pytest
import torch

from cpd_mm.distill.losses import (ChannelWiseDivergence, CIRKDLoss,
                                   KLDivergence)


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p, q):
    """KL(p ‖ q) of two 1-d distributions."""
    return float(np.sum(p * (np.log(p) - np.log(q))))


def np_normalize(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


# ------------------------------------------------------------------------ KL
@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_kl_class_logits_matches_plain_kl_times_tau_squared(tau):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    got = KLDivergence(tau=tau, loss_weight=0.5)(s, t)
    ref = np.mean([
        np_kl(np_softmax(t[i].numpy() / tau, 0),
              np_softmax(s[i].numpy() / tau, 0)) for i in range(3)
    ])
    assert got.item() == pytest.approx(0.5 * tau**2 * ref, rel=1e-5)


def test_kl_pixels_ignore_index_with_label_map_at_input_resolution():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    low = torch.randint(0, 3, (2, 4, 4))
    low[0, :2] = 255
    low[1, :, 3] = 255
    # labels at 2x the logits' size; nearest resizing recovers `low`
    gt = low.repeat_interleave(2, 1).repeat_interleave(2, 2)
    tau = 2.0
    got = KLDivergence(tau=tau, ignore_index=255)(s, t, gt)
    ref = []
    for n in range(2):
        for y in range(4):
            for x in range(4):
                if low[n, y, x] != 255:
                    ref.append(np_kl(np_softmax(t[n, :, y, x].numpy() / tau,
                                                0),
                                     np_softmax(s[n, :, y, x].numpy() / tau,
                                                0)))
    assert got.item() == pytest.approx(tau**2 * np.mean(ref), rel=1e-5)
    # without ignore_index every pixel counts
    all_px = KLDivergence(tau=tau)(s, t, gt)
    assert all_px.item() != pytest.approx(got.item(), rel=1e-3)
    none = KLDivergence(tau=tau, ignore_index=255, reduction='none')(s, t, gt)
    assert none.shape == (2, 4, 4)
    assert torch.all(none[low == 255] == 0)
    total = KLDivergence(tau=tau, ignore_index=255, reduction='sum')(s, t, gt)
    assert total.item() == pytest.approx(tau**2 * np.sum(ref), rel=1e-5)


def test_kl_is_zero_for_identical_logits_and_grad_only_to_student():
    s = torch.randn(2, 4, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = KLDivergence(tau=3.0)(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    KLDivergence()(s, torch.randn(2, 4).requires_grad_(True)).backward()
    assert s.grad is not None and t.grad is None


def test_kl_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r'\(2, 3\).*\(2, 4\)'):
        KLDivergence()(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match='tau'):
        KLDivergence(tau=0)


# ----------------------------------------------------------------------- CWD
@pytest.mark.parametrize('tau', [1.0, 3.0])
def test_cwd_is_spatial_softmax_kl_per_channel(tau):
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    got = ChannelWiseDivergence(tau=tau, loss_weight=2.0)(s, t)
    ref = 0.0
    for n in range(2):
        for c in range(3):
            ref += np_kl(np_softmax(t[n, c].numpy().ravel() / tau, 0),
                         np_softmax(s[n, c].numpy().ravel() / tau, 0))
    assert got.item() == pytest.approx(2.0 * tau**2 * ref / 6, rel=1e-5)


def test_cwd_ignores_per_channel_offsets_but_not_per_pixel_ones():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    cwd = ChannelWiseDivergence()
    base = cwd(s, t)
    # a constant per (n, c) does not move a softmax over positions ...
    assert cwd(s + torch.randn(2, 3, 1, 1), t).item() == pytest.approx(
        base.item(), rel=1e-5)
    # ... a constant per pixel across channels does (unlike a class softmax)
    assert cwd(s + torch.randn(2, 1, 4, 4), t).item() != pytest.approx(
        base.item(), rel=1e-3)
    assert cwd(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_requires_maps_with_equal_channels():
    with pytest.raises(ValueError, match='4-d'):
        ChannelWiseDivergence()(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r'\(1, 2, 4, 4\).*\(1, 3, 4, 4\)'):
        ChannelWiseDivergence()(torch.randn(1, 2, 4, 4),
                                torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------- CIRKD
def small_cirkd(**kw):
    args = dict(num_classes=3, student_channels=4, teacher_channels=6,
                pixel_memory_size=8, region_memory_size=4,
                pixel_contrast_size=3 * 8, region_contrast_size=3 * 4,
                pixels_per_update=8)
    args.update(kw)
    return CIRKDLoss(**args)


def np_relation_kl(ls, lt, tau=1.0):
    rows = [np_kl(np_softmax(lt[i] / tau, 0), np_softmax(ls[i] / tau, 0))
            for i in range(ls.shape[0])]
    return float(np.mean(rows)) * tau**2


def test_cirkd_minibatch_term_matches_pairwise_similarity_kl():
    torch.manual_seed(4)
    loss = small_cirkd(memory_pixel_weight=0.0, memory_region_weight=0.0)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    got = loss(s, t, torch.zeros(2, 3, 3, dtype=torch.long))
    fs = np_normalize(s.numpy().reshape(2, 4, 9), 1)
    ft = np_normalize(t.numpy().reshape(2, 6, 9), 1)
    ref = np.mean([
        np_relation_kl(fs[i].T @ fs[j] / 0.1, ft[i].T @ ft[j] / 0.1)
        for i in range(2) for j in range(2)
    ])
    assert got['minibatch_p2p'].item() == pytest.approx(ref, rel=1e-4)
    assert got['memory_p2p'].item() == 0.0


def test_cirkd_queues_after_known_enqueues_and_ring_wrap():
    loss = small_cirkd()
    init_pixels = loss.pixel_queue.clone()
    emb = torch.nn.functional.normalize(torch.randn(2, 6, 2, 3), dim=1)
    labels = torch.tensor([[[0, 0, 1], [255, 1, 1]],
                           [[0, 255, 255], [255, 255, 0]]])
    loss.enqueue(emb, labels)
    flat = emb.permute(0, 2, 3, 1).reshape(2, 6, 6)
    # class 0: image 0 has 2 pixels, image 1 has 2 -> 4 pixel slots, 2 regions
    want0 = [flat[0, 0], flat[0, 1], flat[1, 0], flat[1, 5]]
    got0 = loss.pixel_queue[0, :4]
    for w in want0:
        assert torch.isclose(got0 @ w, torch.tensor(1.0), atol=1e-5).any()
    reg0 = torch.nn.functional.normalize(flat[0, [0, 1]].mean(0), dim=0)
    reg1 = torch.nn.functional.normalize(flat[1, [0, 5]].mean(0), dim=0)
    assert torch.allclose(loss.region_queue[0, 0], reg0, atol=1e-6)
    assert torch.allclose(loss.region_queue[0, 1], reg1, atol=1e-6)
    # class 1 only in image 0 (3 pixels); class 2 absent; 255 never enqueued
    assert loss.pixel_queue_ptr.tolist() == [4, 3, 0]
    assert loss.region_queue_ptr.tolist() == [2, 1, 0]
    assert torch.equal(loss.pixel_queue[2], init_pixels[2])
    assert torch.equal(loss.pixel_queue[0, 4:], init_pixels[0, 4:])
    assert int(loss.num_updates) == 1
    # twice more: class 0 writes 4 + 4 slots into a ring of 8 -> wraps to 4
    loss.enqueue(emb, labels)
    loss.enqueue(emb, labels)
    assert loss.pixel_queue_ptr.tolist() == [4, 1, 0]  # class 1: 9 % 8
    assert loss.region_queue_ptr.tolist() == [2, 3, 0]  # 6 % 4, 3
    for w in want0:  # the slots keep only class-0 embeddings of the batch
        assert (loss.pixel_queue[0] @ w).isclose(torch.tensor(1.0),
                                                 atol=1e-5).sum() == 2


def test_cirkd_memory_terms_match_plain_relations_over_queue():
    torch.manual_seed(5)
    loss = small_cirkd(minibatch_weight=0.0, memory_pixel_weight=1.0,
                       memory_region_weight=1.0, contrast_kd_temperature=2.0)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 6, 3, 3, requires_grad=True)
    gt = torch.randint(0, 3, (2, 3, 3))
    gt[1, 0] = 255
    got = loss(s, t, gt)
    # every slot is sampled: column order does not change the softmax KL
    with torch.no_grad():
        emb_s = torch.nn.functional.normalize(loss.project_head(s), dim=1)
    valid = (gt.flatten() != 255).numpy()
    a_s = emb_s.permute(0, 2, 3, 1).reshape(-1, 6).numpy()[valid]
    a_t = np_normalize(t.detach().permute(0, 2, 3, 1).reshape(-1, 6).numpy(),
                       1)[valid]
    for key, queue in (('memory_p2p', loss.pixel_queue),
                       ('memory_p2r', loss.region_queue)):
        bank = queue.reshape(-1, 6).numpy()
        ref = np_relation_kl(a_s @ bank.T / 0.1, a_t @ bank.T / 0.1, 2.0)
        assert got[key].item() == pytest.approx(ref, rel=1e-4)
    sum(got.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert loss.project_head[0].weight.grad is not None


def test_cirkd_all_ignored_gives_zero_memory_terms_and_no_enqueue():
    loss = small_cirkd()
    before = loss.pixel_queue.clone()
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    got = loss(s, torch.randn(2, 6, 3, 3), torch.full((2, 3, 3), 255))
    assert got['memory_p2p'].item() == 0.0 and got['memory_p2r'].item() == 0.0
    assert torch.equal(loss.pixel_queue, before)
    assert loss.pixel_queue_ptr.sum() == 0
    sum(got.values()).backward()  # still part of the graph


def test_cirkd_same_seed_same_memories_and_checks():
    torch.manual_seed(6)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    gt = torch.randint(0, 3, (2, 3, 3))
    a, b = small_cirkd(pixels_per_update=2), small_cirkd(pixels_per_update=2)
    assert torch.equal(a.pixel_queue, b.pixel_queue)  # seeded start
    b.project_head.load_state_dict(a.project_head.state_dict())
    torch.manual_seed(7)
    out_a = a(s, t, gt)
    torch.manual_seed(8)  # global RNG differs; the step-seeded one does not
    out_b = b(s, t, gt)
    assert torch.equal(a.pixel_queue, b.pixel_queue)
    for key in out_a:
        assert torch.allclose(out_a[key], out_b[key])
    assert set(a.state_dict()) >= {'pixel_queue', 'pixel_queue_ptr',
                                   'region_queue', 'region_queue_ptr',
                                   'num_updates'}
    with pytest.raises(ValueError, match='label 7'):
        a(s, t, torch.full((2, 3, 3), 7))
    with pytest.raises(ValueError, match='student_channels=4'):
        a(torch.randn(2, 5, 3, 3), t, gt)
    with pytest.raises(ValueError, match='label map'):
        a(s, t, None)
    # per-class sample counts follow the official script: size // K + 1
    c = CIRKDLoss(num_classes=19, student_channels=8, teacher_channels=8,
                  pixel_memory_size=300, region_memory_size=100)
    assert (c.pixel_samples, c.region_samples) == (4096 // 19 + 1, 54)
