"""Token-map figures from hand-made maps: which inputs and runs are drawn, in what order, at what size."""

from __future__ import annotations

import io
import subprocess
import sys

from conftest import SAMPLE_IMAGES
from PIL import Image

from lightkv_cli.report.token_maps import WIDTH, figure_size, token_map_figures

MERGE = {"grid": [2, 3], "kind": "merge", "stages": 2, "stage": [0, 1, 2, 0, 0, 1], "group": [-1, 0, 0, -1, -1, 4]}
DROP = {"grid": [2, 3], "kind": "drop", "stages": 1, "stage": [0, 1, 1, 0, 1, 0]}
EVICT = {"grid": [2, 3], "kind": "evict", "kept_share": [1.0, 0.5, 0.0, 0.25, 1.0, 0.75]}


def _entry(name: str, changed: bool, tmap: dict | None) -> dict:
    p = {"input": name, "answer": "a", "quality": {"exact_match": 0.0 if changed else 1.0}}
    if tmap is not None:
        p["token_map"] = tmap
    return p


def _results(image_a: str) -> dict:
    names = ["a.png", "b.png", "c.png", "d.png"]
    inputs = [{"id": n, "image": n, "kind": "image"} for n in names]
    inputs[0]["image"] = image_a
    # b changed in two runs, d in one, a and c in none; c has no map anywhere
    return {
        "schema": "lightkv.results/1",
        "inputs": inputs,
        "runs": [
            {
                "id": "uncompressed",
                "method": "uncompressed",
                "status": "ok",
                "per_input": [_entry(n, False, None) for n in names],
            },
            {
                "id": "lightkv@0.5",
                "method": "lightkv",
                "status": "ok",
                "per_input": [
                    _entry("a.png", False, MERGE),
                    _entry("b.png", True, MERGE),
                    _entry("c.png", False, None),
                    _entry("d.png", True, MERGE),
                ],
            },
            {"id": "fastv@0.5", "method": "fastv", "status": "error", "error": "x"},
            {
                "id": "random@0.5",
                "method": "random",
                "status": "ok",
                "per_input": [
                    _entry("a.png", False, DROP),
                    _entry("b.png", True, DROP),
                    _entry("c.png", False, None),
                    _entry("d.png", False, {"grid": [2, 3], "kind": "drop", "stage": [0]}),  # malformed: skipped
                ],
            },
            {
                "id": "snapkv@0.5",
                "method": "snapkv",
                "status": "ok",
                "per_input": [_entry("a.png", False, EVICT), _entry("b.png", False, EVICT)],
            },
        ],
    }


def test_inputs_worst_changed_first_then_first_inputs_and_runs_in_order():
    figs = token_map_figures(_results(str(SAMPLE_IMAGES / "skimage_chelsea.png")), max_inputs=3)
    assert [(f["input"], f["run"]) for f in figs] == [
        ("b.png", "lightkv@0.5"),
        ("b.png", "random@0.5"),
        ("b.png", "snapkv@0.5"),
        ("d.png", "lightkv@0.5"),
        ("a.png", "lightkv@0.5"),
        ("a.png", "random@0.5"),
        ("a.png", "snapkv@0.5"),
    ]
    assert [f["input"] for f in token_map_figures(_results("a.png"), max_inputs=1)] == ["b.png"] * 3
    assert token_map_figures({"schema": "lightkv.results/1", "runs": []}) == []
    assert figs[0]["caption"] == "lightkv@0.5 · b.png · 2 stages, 3 of 6 tokens kept (3 merged) · answer changed"
    assert figs[1]["caption"] == "random@0.5 · b.png · 1 stage, 3 of 6 tokens kept · answer changed"
    assert (
        figs[-1]["caption"] == "snapkv@0.5 · skimage_chelsea.png · 58% of 6 tokens kept on average over layers × heads"
    )


def test_pngs_decode_at_the_grid_aspect_and_show_the_overlay():
    figs = token_map_figures(_results(str(SAMPLE_IMAGES / "skimage_chelsea.png")), max_inputs=3)
    assert figure_size([2, 3]) == (WIDTH, 160)
    by = {(f["input"], f["run"]): Image.open(io.BytesIO(f["png"])) for f in figs}
    for im in by.values():
        assert im.format == "PNG" and im.size == (240, 160)
    # unreadable image (b.png does not exist): a grey canvas; kept-alone cells stay grey, others do not
    merge = by[("b.png", "lightkv@0.5")].convert("RGB")
    assert merge.getpixel((120, 40)) != (128, 128, 128)  # cell 1 merged into cell 0: coloured …
    assert merge.getpixel((120, 40)) == merge.getpixel((200, 40)) == merge.getpixel((40, 40))  # … as its group
    assert merge.getpixel((40, 120)) == (128, 128, 128)  # cell 3 kept alone: clear
    assert merge.getpixel((120, 120)) != merge.getpixel((120, 40))  # group of cell 4: another colour
    drop = by[("b.png", "random@0.5")].convert("RGB")
    assert drop.getpixel((40, 40)) == (128, 128, 128) and sum(drop.getpixel((120, 40))) < 3 * 128
    evict = by[("b.png", "snapkv@0.5")].convert("RGB")
    levels = [sum(evict.getpixel((40 + 80 * c, 40 + 80 * r))) for r in range(2) for c in range(3)]
    assert levels[0] == levels[4] == 3 * 128  # kept by every head: clear
    assert levels[2] < levels[3] < levels[1] < levels[5] < levels[0]  # darker the less it was kept
    # a readable image is drawn (not grey) under the overlay
    photo = by[("a.png", "lightkv@0.5")].convert("RGB")
    assert photo.getpixel((40, 40)) != (128, 128, 128)


def test_module_imports_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
        "import lightkv_cli.report.token_maps\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
