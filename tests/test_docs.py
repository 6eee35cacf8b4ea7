"""README and docs/ stay navigable: every relative link resolves (file and
heading anchor), and the README's test command is the one CI runs."""
import os.path as osp
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(path):
    out, seen, fence = set(), {}, False
    for line in path.read_text(encoding='utf-8').splitlines():
        fence ^= line.startswith('```')
        if fence or not line.startswith('#'):
            continue
        s = _slug(line.lstrip('#'))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f'{s}-{n}')
    return out


def _broken_links(md):
    text = re.sub(r'```.*?```', '', md.read_text(encoding='utf-8'), flags=re.S)
    text = re.sub(r'`[^`\n]*`', '', text)  # inline code is not a link
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target):
            continue
        path, _, anchor = target.partition('#')
        full = Path(osp.normpath(md.parent / path)) if path else md
        if not full.exists():
            yield f'{md.relative_to(ROOT)}: no file {target}'
        elif anchor and full.suffix == '.md' and anchor not in _anchors(full):
            yield f'{md.relative_to(ROOT)}: no heading for {target}'


def test_relative_links_resolve():
    docs = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
    assert [b for md in docs for b in _broken_links(md)] == []


def test_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / '.ci' / 'run').read_text().splitlines()
          if line and not line.startswith(('#', 'set ', 'cd '))]
    assert len(ci) == 1, ci
    assert ci[0] in (ROOT / 'README.md').read_text().splitlines()
