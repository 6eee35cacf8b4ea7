"""Model-zoo downloads under DDP: rank 0 downloads, every rank loads.

mmengine's loader downloads on rank 0 before a barrier; when the download
fails, rank 0 raises and the others wait at the barrier until the process
group times out. cpd_mm's loader broadcasts the outcome: every rank raises
the same one-line error. The network is replaced by a fake download.
"""
import urllib.error

import torch

from dist_utils import run_distributed

URL = 'https://download.openmmlab.com/mmclassification/v0/demo/demo.pth'


def _load_twice(rank):
    from mmengine.runner.checkpoint import _load_checkpoint

    from cpd_mm.utils.checkpoint import CheckpointLoadError
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append('offline')
        raise urllib.error.URLError('[Errno -3] Temporary failure in name '
                                    'resolution')

    def online(url, dst, *args, **kwargs):
        calls.append('online')
        torch.save({'state_dict': {'w': torch.full((2, ), 3.0)}}, dst)

    torch.hub.download_url_to_file = offline
    try:
        _load_checkpoint(URL)
        failure = None
    except CheckpointLoadError as e:
        failure = str(e)
    torch.hub.download_url_to_file = online
    weights = _load_checkpoint(URL)['state_dict']['w']
    return dict(failure=failure, calls=calls, weights=weights)


def test_failed_download_fails_every_rank(tmp_path):
    ranks = run_distributed(_load_twice, world_size=2, timeout=120,
                            env=dict(TORCH_HOME=str(tmp_path)))
    cache = tmp_path / 'hub' / 'checkpoints' / 'demo.pth'
    for rank in ranks:
        assert rank['failure'].startswith(
            f'cannot load checkpoint "{URL}": the download failed')
        assert f'put it at {cache}' in rank['failure']
        assert torch.equal(rank['weights'], torch.full((2, ), 3.0))
    # only rank 0 downloads; rank 1 reads the file rank 0 cached
    assert ranks[0]['calls'] == ['offline', 'online']
    assert ranks[1]['calls'] == []
