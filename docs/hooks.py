"""mkdocs hook: publish the committed curves (results/<suite>/curves.png), tables and text files.

The pages link them as ../results/<suite>/curves.png, which also works when a page is read on
GitHub; here each becomes a site file of the same path (results/<suite>/curves.png), and the links are
rewritten to it before mkdocs checks them."""

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    paths = [path for ext in ("png", "txt", "md") for path in (ROOT / "results").glob(f"*/*.{ext}")]
    for path in sorted(paths):
        uri = path.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    return re.sub(r"\]\(\.\./results/", "](results/", markdown)
