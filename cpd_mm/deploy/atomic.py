"""Write an output file all at once, and never replace one by accident."""
import contextlib
import os
import os.path as osp
import tempfile
from typing import Iterator

__all__ = ['check_output_path', 'atomic_output']


def check_output_path(path: str, force: bool) -> None:
    """Fail early when ``path`` exists and ``force`` is not set.

    Raises:
        FileExistsError: naming the file and the ``--force`` way out.
        IsADirectoryError: ``path`` is a directory.
    """
    if osp.isdir(path):
        raise IsADirectoryError(f'output {path} is a directory')
    if osp.lexists(path) and not force:
        raise FileExistsError(
            f'output {path} already exists; pass --force to overwrite it')


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory; publish it on success.

    The caller writes the complete file to the yielded path. When the block
    exits without an exception the file is renamed to ``path`` in one step,
    so readers never see a half-written file; on an exception it is deleted
    and ``path`` is untouched. Without ``force`` an existing ``path`` is
    never replaced, not even one created while the block was running.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
    """
    path = osp.abspath(path)
    check_output_path(path, force)
    directory = osp.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.',
                               suffix='.tmp', dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        if force:
            os.replace(tmp, path)
        else:
            try:
                # link() fails if `path` appeared meanwhile: no race.
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f'output {path} already exists; pass --force to '
                    'overwrite it') from None
            except OSError:
                # Filesystems without hard links: best effort check + rename.
                check_output_path(path, force)
                os.replace(tmp, path)
    finally:
        if osp.lexists(tmp):
            os.unlink(tmp)
