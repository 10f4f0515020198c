"""compare.py: three tiny tokenizers of different token shapes on the same ImageFolder images, one
protocol; the leaderboard agrees with evaluate.py, the grid has a row per tokenizer, the page is
self-contained; a tokenizer that does not load, or none at all, is one line and exit code 2."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from conftest import CONFIGS
from imagetok import Tokenizer
from imagetok.evaluation.compare import COLUMNS, compare, default_names, sort_rows
from imagetok.evaluation.run import evaluate
from imagetok.training.run import tokenizer_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (the shared compare run sets it itself)
NARROW = ["encoder.ch=8", "encoder.z_channels=8"]
FAST = ["eval.random_weights=true", "eval.feature_layer=64", "eval.force=true", "eval.batch_size=4",
        "eval.metrics=[psnr,ssim,lpips,fid,tokens]"]


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


def _tiny_grid_tokenizer() -> Tokenizer:
    """A 16x16 grid of 16 codes at 32 px (downsampling 2): 256 * 4 / 1024 = 1 bit per pixel."""
    cnn = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4}
    return Tokenizer.from_config({"encoder": {"_target_": "imagetok.nets.cnn.Encoder", **cnn},
                                  "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer",
                                                "codebook_size": 16, "dim": 4},
                                  "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **cnn}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three save_pretrained directories (VQ 8x8x1 of 1024, LFQ 8x8x2 of 512, VQ 16x16x1 of 16) and an
    ImageFolder of 6 validation images of odd sizes."""
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    dirs = []
    for name, tok in [("vq", Tokenizer.from_config(tokenizer_config(_compose("train", NARROW)))),
                      ("lfq", Tokenizer.from_config(tokenizer_config(_compose("train", ["experiment=cpu_lfq", *NARROW])))),
                      ("tiny", _tiny_grid_tokenizer())]:
        dirs.append(tok.save_pretrained(root / name))
    for split, count in (("train", 1), ("val", 6)):
        (root / "tree" / split).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(i).integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "tree" / split / f"{i}.png")
    data = ["data=imagefolder", f"data.root={root / 'tree'}", "data.image_size=32", "data.num_workers=0"]
    return root, dirs, data


@pytest.fixture(scope="module")
def compared(setup, tmp_path_factory):
    """One compare run of the three tokenizers over the 6 images, 3 of them in the grid and the page."""
    _, dirs, data = setup
    out = tmp_path_factory.mktemp("cmp")
    tokenizers = "[" + ",".join(str(d) for d in dirs) + "]"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores: a second thread mostly waits
    try:
        results = compare(_compose("compare", [f"tokenizers={tokenizers}", *data, "data.val_crop=adm", *FAST,
                                               "num_grid_images=3"]), out)
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_compare_writes_one_leaderboard_grid_and_page_under_one_protocol(setup, compared, tmp_path):
    _, dirs, data = setup
    out, results = compared
    saved = json.loads((out / "leaderboard.json").read_text())
    rows = saved["leaderboard"]
    assert [r["name"] for r in rows] == ["vq", "lfq", "tiny"] and rows == results["leaderboard"]
    assert [r["bits_per_pixel"] for r in rows] == [0.625, 1.125, 1.0]
    assert [(r["tokens_per_image"], r["sub_tokens_per_token"]) for r in rows] == [(64, 1), (64, 2), (256, 1)]
    for row in rows:
        assert row["num_images"] == 6 and row["fid"] >= 0 and 0 < row["ssim"] <= 1 and row["lpips"] > 0
        assert 0 < row["codebook_usage"] <= 1 and row["images_per_second"] > 0 and row["parameters"] > 0
    assert rows[2]["parameters"] == sum(p.numel() for p in Tokenizer.from_pretrained(dirs[2]).parameters())
    protocol = saved["protocol"]
    assert protocol["crop"] == "adm" and protocol["image_size"] == 32 and "6 images" in protocol["evaluation_split"]
    assert protocol["inception"]["layer"] == "64" and protocol["fid_reference"] == "the 6 original images of the evaluation split"
    assert list(protocol["tokenizers"]) == ["vq", "lfq", "tiny"]

    # the same PSNR as evaluate.py of the same tokenizer on the same images
    single = evaluate(_compose("evaluate", [f"checkpoint={dirs[1]}", *data, "data.val_crop=adm", "eval.metrics=[psnr]",
                                            "eval.batch_size=4"]), tmp_path / "eval")
    assert rows[1]["psnr"] == single["psnr"]

    markdown = (out / "leaderboard.md").read_text()
    header = "| tokenizer | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    assert header in markdown and markdown.index("- crop: adm, 32 px") < markdown.index(header)
    assert f"| lfq | {rows[1]['fid']:.3f} | {rows[1]['psnr']:.2f} |" in markdown and "| 64 x 2 | 1.1250 |" in markdown

    # grid.png: 3 tiles of 32 px enlarged 4x, rows = originals + 3 tokenizers, 2 px make_grid padding
    width, height = Image.open(out / "grid.png").size
    assert height == 4 * (128 + 2) + 2 and width > 3 * (128 + 2) + 2

    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 * (1 + 3)  # each (image, tokenizer) and each original once
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=\"/" not in page
    assert "image-rendering: pixelated" in page and ">rFID</th>" in page and f"<td>{rows[0]['psnr']:.2f}</td>" in page
    parsed = _PageParser()
    parsed.feed(page)
    parsed.close()
    assert parsed.table_rows == 1 + 3 + (1 + 3)  # leaderboard header + rows, crops header + one row per image
    assert parsed.images == 3 * (1 + 3) + 3  # + one viewer per image (its src set by the script)
    assert parsed.open_tags == []


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.table_rows, self.images, self.open_tags = 0, 0, []

    def handle_starttag(self, tag, attrs):
        self.table_rows += tag == "tr"
        self.images += tag == "img"
        if tag not in ("img", "meta"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, (tag, self.open_tags)
        self.open_tags.pop()


def test_names_and_sorting():
    assert default_names(["a/vq", "runs/x/checkpoints/last.ckpt", "b/vq/"]) == ["a/vq", "x/last", "b/vq/"]
    assert default_names(["a/vq", "b/lfq"]) == ["vq", "lfq"]
    rows = [{"name": "a", "psnr": 20.0, "fid": None}, {"name": "b", "psnr": 25.0, "fid": 3.0},
            {"name": "c", "psnr": None, "fid": 1.0}]
    assert [r["name"] for r in sort_rows(rows, "psnr")] == ["b", "a", "c"]  # higher first, n/a last
    assert [r["name"] for r in sort_rows(rows, "fid")] == ["c", "b", "a"]  # lower first
    assert sort_rows(rows, None) == rows


def _run_cli(monkeypatch, capsys, args: list[str]) -> list[str]:
    from imagetok.cli.compare import main

    monkeypatch.setattr(sys, "argv", ["compare", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    assert exited.value.code == 2, out.out + out.err
    assert "Traceback" not in out.out + out.err
    return [line for line in (out.out + out.err).splitlines() if "error:" in line]


def test_a_tokenizer_that_does_not_load_or_none_at_all_is_one_line(setup, tmp_path, monkeypatch, capsys):
    _, dirs, data = setup
    run = f"hydra.run.dir={tmp_path / 'run'}"
    (line,) = _run_cli(monkeypatch, capsys, [f"tokenizers=[{dirs[0]},{tmp_path / 'nope'}]", *data, run])
    assert f"tokenizers[1]='{tmp_path / 'nope'}' is invalid" in line
    (tmp_path / "empty").mkdir()
    (line,) = _run_cli(monkeypatch, capsys, [f"tokenizers=[{tmp_path / 'empty'}]", *data, run])
    assert f"tokenizers[0]={tmp_path / 'empty'}: " in line
    # 30 px: fine for the tiny grid (downsampling 2), not for the VQ (4), named by its entry
    (line,) = _run_cli(monkeypatch, capsys, [f"tokenizers=[{dirs[2]},{dirs[0]}]", *data, "data.image_size=30",
                                             "eval.metrics=[psnr]", run])
    assert "tokenizers[1].images=" in line
    (line,) = _run_cli(monkeypatch, capsys, ["tokenizers=[]", *data, run])
    assert "tokenizers=[] is invalid: allowed values are a non-empty list" in line
    (line,) = _run_cli(monkeypatch, capsys, [f"tokenizers=[{dirs[0]},{dirs[1]}]", "names=[a]", *data, run])
    assert "names=['a'] is invalid" in line


# A stand-in for the few DOM calls the page's script makes (no browser or jsdom here): elements as the
# page declares them; then key 2, pointer over / off the first viewer, a click on column 3.
FAKE_DOM = r"""
const spec = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const make = a => ({...a, dataset: a.dataset, listeners: {}, on: false, title: '',
  classList: {toggle(_, v) { this.owner.on = v; }},
  addEventListener(t, f) { this.listeners[t] = f; }});
const all = spec.elements.map(make); all.forEach(el => { el.classList.owner = el; });
const showing = {textContent: ''}; const doc = {listeners: {}};
global.document = {
  querySelectorAll: sel => sel === '.viewer' ? all.filter(e => e.viewer)
    : sel === 'th[data-column]' ? all.filter(e => e.tag === 'th' && 'column' in e.dataset)
    : all.filter(e => 'column' in e.dataset),
  getElementById: id => id === 'showing' ? showing : all.find(e => e.id === id),
  addEventListener: (t, f) => { doc.listeners[t] = f; }};
const state = () => ({showing: showing.textContent, viewer0: all.find(e => e.viewer).src,
                      on: all.filter(e => e.on).map(e => e.dataset.column)});
eval(spec.script);
const states = [state()];
doc.listeners.keydown({key: '2'}); states.push(state());
const v = all.find(e => e.viewer); v.listeners.mouseenter(); states.push(state());
v.listeners.mouseleave(); states.push(state());
all.find(e => e.tag === 'th' && e.dataset.column === '3').listeners.click(); states.push(state());
doc.listeners.keydown({key: '9'}); doc.listeners.keydown({key: 'a'}); states.push(state());
console.log(JSON.stringify(states));
"""


class _ScriptAndElements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements, self.script, self.in_script = [], "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.in_script = tag == "script"
        if "data-column" in a or a.get("class") == "viewer" or tag == "img":
            self.elements.append({"tag": tag, "id": a.get("id"), "src": a.get("src", ""), "viewer": a.get("class") == "viewer",
                                  "dataset": {k[5:]: v for k, v in a.items() if k.startswith("data-")}})

    def handle_data(self, data):
        if self.in_script:
            self.script += data


def test_the_page_script_flips_between_reconstructions(compared):
    """The page's script under node with a stand-in DOM: keys and clicks choose what the viewers show."""
    import shutil
    import subprocess

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    parsed = _ScriptAndElements()
    parsed.feed((compared[0] / "index.html").read_text())
    src = {e["id"]: e["src"] for e in parsed.elements if e["id"]}
    out = subprocess.run(["node", "-e", FAKE_DOM], input=json.dumps({"elements": parsed.elements, "script": parsed.script}),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    first, key2, hover, leave, click3, ignored = json.loads(out)
    assert first == {"showing": "vq", "viewer0": src["img-0-1"], "on": ["1"] * 4}  # header + 3 images
    assert key2 == {"showing": "lfq", "viewer0": src["img-0-2"], "on": ["2"] * 4}
    assert hover["viewer0"] == src["img-0-0"] and leave == key2  # the original while the pointer is over it
    assert click3 == ignored == {"showing": "tiny", "viewer0": src["img-0-3"], "on": ["3"] * 4}


def test_the_page_in_a_headless_browser(compared):
    """Only where playwright and its Chromium are installed: the page renders, keys flip the viewer."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch()
        page = browser.new_page()
        page.goto((compared[0] / "index.html").as_uri())
        page.keyboard.press("2")
        assert page.text_content("#showing") == "lfq"
        assert page.get_attribute(".viewer", "src") == page.get_attribute("#img-0-2", "src")
        browser.close()
