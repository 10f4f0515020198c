"""``index.html`` of ``compare.py``: one self-contained page (images as base64 PNG data URIs, inline CSS
and JS, no external asset) that opens from disk offline.

It shows the protocol, the leaderboard, and the same crops at full resolution: per image a row of the
original and every tokenizer's reconstruction side by side, and on the left a viewer that shows the
selected tokenizer's reconstruction (click a name, or press 1..N; 0 shows the original) and the
original while the pointer is over it. Each PNG is embedded once; the viewer borrows its ``src``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence

import torch
from PIL import Image

from imagetok.tokenizer import Tokenizer

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table.board { border-collapse: collapse; margin: 1em 0; }
table.board td, table.board th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.board td:first-child, table.board th:first-child { text-align: left; }
img { image-rendering: pixelated; display: block; }
.crops td { vertical-align: top; padding: 2px; font-size: 12px; }
.crops th { font-weight: normal; cursor: pointer; padding: 2px 6px; }
.crops th.on, .crops td.on { background: #fd6; }
.viewer { cursor: crosshair; outline: 2px solid #fd6; }
"""

SCRIPT = """
const names = NAMES;
let current = names.length ? 1 : 0;  // 0: the original, k: the k-th tokenizer
function show(k) {
  current = k;
  document.querySelectorAll('.viewer').forEach(v => {
    v.src = document.getElementById(`img-${v.dataset.image}-${k}`).src;
    v.title = (k ? names[k - 1] : 'original') + ' (hover: original)';
  });
  document.querySelectorAll('[data-column]').forEach(c => c.classList.toggle('on', +c.dataset.column === k));
  document.getElementById('showing').textContent = k ? names[k - 1] : 'original';
}
document.querySelectorAll('.viewer').forEach(v => {
  v.addEventListener('mouseenter', () => { v.src = document.getElementById(`img-${v.dataset.image}-0`).src; });
  v.addEventListener('mouseleave', () => show(current));
});
document.querySelectorAll('th[data-column]').forEach(h => h.addEventListener('click', () => show(+h.dataset.column)));
document.addEventListener('keydown', ev => { const k = +ev.key; if (ev.key >= '0' && k <= names.length) show(k); });
show(current);
"""


def png_data_uri(image: torch.Tensor) -> str:
    """``[3, H, W]`` in [-1, 1] -> ``data:image/png;base64,...`` of its uint8 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(Tokenizer.to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def comparison_page(header: Sequence[str], table: Sequence[Sequence[str]], protocol: Sequence[str],
                    originals: torch.Tensor, reconstructions: Sequence[torch.Tensor], names: Sequence[str],
                    min_display: int = 128) -> str:
    """The page as a string. ``table``: the leaderboard's cells as text, under ``header``; ``protocol``:
    Markdown bullet lines (``- ...``); ``originals`` and each of ``reconstructions``: ``[N, 3, H, W]`` in
    [-1, 1], one per entry of ``names``. Crops smaller than ``min_display`` px are shown enlarged by
    an integer factor, pixelated (every pixel stays visible)."""
    e = html.escape
    height, width = originals.shape[-2:]
    scale = max(1, min_display // height)
    size = f'width="{width * scale}" height="{height * scale}"'
    board = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>\n"
    board += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in table)
    columns = ["original", *names]
    crops = ("<tr><th>shown</th>" + "".join(f'<th data-column="{k}" title="press {k}">{k}: {e(c)}</th>'
                                            for k, c in enumerate(columns)) + "</tr>\n")
    for i in range(originals.shape[0]):
        images = [originals[i], *(r[i] for r in reconstructions)]
        cells = "".join(f'<td data-column="{k}"><img id="img-{i}-{k}" {size} alt="{e(columns[k])}, image {i}" '
                        f'src="{png_data_uri(image)}"></td>' for k, image in enumerate(images))
        crops += f'<tr><td><img class="viewer" data-image="{i}" {size} alt="image {i}"></td>{cells}</tr>\n'
    bullets = "".join(f"<li>{e(line.removeprefix('- '))}</li>" for line in protocol)
    script = SCRIPT.replace("NAMES", json.dumps(list(names)).replace("</", "<\\/"))  # no "</script>" inside
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Tokenizer comparison</title>
<style>{STYLE}</style></head>
<body>
<h1>Tokenizer comparison</h1>
<h2>Protocol</h2><ul>{bullets}</ul>
<h2>Leaderboard</h2>
<table class="board">
{board}</table>
<h2>Reconstructions</h2>
<p>Left: <b id="showing">{e(names[0]) if names else "original"}</b>, the original while the pointer is over it. Click a
column name or press 0..{len(names)} to choose; the chosen column is highlighted. Crops of {width}x{height} px, shown
at {scale}x.</p>
<noscript><p>(With scripts off the left column stays empty; the crops are in the columns beside it.)</p></noscript>
<table class="crops">
{crops}</table>
<script>{script}</script>
</body></html>
"""
