"""Progress for long loops: mmengine's ProgressBar on a terminal, a log
line every 10% otherwise (a progress bar in a log file writes one line, or
one carriage return, per update)."""
import sys

from mmengine.logging import print_log


class Progress:
    """``update(n)`` after every ``n`` items of ``total``; ``close()`` at
    the end. ``what`` names the items in log lines ("graphs timed")."""

    def __init__(self, total: int, what: str, logger=None, prefix: str = ''):
        self.total, self.done, self.next = total, 0, 0.1
        self.what, self.logger, self.prefix = what, logger, prefix
        self.bar = None
        if logger is None and sys.stdout.isatty() and total:
            from mmengine.utils import ProgressBar
            self.bar = ProgressBar(total)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            for _ in range(n):
                self.bar.update()
        elif self.total and self.done >= self.next * self.total:
            print_log(f'{self.prefix}{self.done}/{self.total} {self.what}',
                      logger=self.logger or 'current')
            self.next = (int(self.done * 10 / self.total) + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.file.write('\n')
            self.bar.file.flush()
