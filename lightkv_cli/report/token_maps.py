"""Token-map figures: an input's image with an overlay of which vision tokens a run kept, as small PNGs.

Reads the ``per_input[].token_map`` entries of a results dictionary (``docs/results-schema.md``, written
by the sweep from what each press recorded) and draws, with Pillow only (no torch, no model):

- ``merge`` (LightKV): every group of cells merged together in one translucent colour (the cell they
  merged into included); cells kept as themselves are left clear;
- ``drop`` (FastV, random drop): removed cells dimmed, darker the earlier the stage that removed them;
- ``evict`` (VL-Cache, SnapKV): every cell shaded by ``1 − kept_share`` (the share of layers × KV heads
  that kept it), so a token no head kept is darkest.

The image is stretched to the grid's aspect ratio (each cell is one vision token of the first image's
grid); when it cannot be read the overlay is drawn on a grey canvas. Never raises on a malformed map:
such a map is skipped.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

from PIL import Image

WIDTH = 240
"""Width of every figure, pixels (the height follows the grid's aspect ratio)."""
_MAX_HEIGHT = 480
_GREY = (128, 128, 128)
_GROUP_ALPHA = 150
_GOLDEN = 0.618033988749895


def token_map_figures(results: dict, image_root: Path | None = None, max_inputs: int = 3) -> list[dict]:
    """Figures of where the vision tokens went, for up to ``max_inputs`` inputs having token maps.

    Inputs are chosen worst first: those whose answer changed (``quality.exact_match == 0``) in more runs
    come first (ties in input order), then the first inputs. For each chosen input, one figure per run
    (``status == "ok"``) having a map for it, in the order the runs appear.

    Args:
        results: a results dictionary (schema ``lightkv.results/1``).
        image_root: folder relative image paths are also tried under (after the working directory).
        max_inputs: most inputs drawn.

    Returns:
        ``[{"input": input id, "run": run id, "png": PNG bytes (≈ 240 px wide), "caption": str}]``, grouped
        by input; empty when no run has a map.
    """
    runs = [r for r in results.get("runs") or [] if isinstance(r, dict) and r.get("status") == "ok"]
    inputs = [i for i in results.get("inputs") or [] if isinstance(i, dict)]
    order = [str(i.get("id")) for i in inputs]
    maps: dict[str, list[tuple[dict, dict, dict]]] = {}  # input id -> [(run, per_input entry, map)]
    changed: dict[str, int] = {}
    for r in runs:
        for p in r.get("per_input") or []:
            if not isinstance(p, dict):
                continue
            key = str(p.get("input"))
            em = (p.get("quality") or {}).get("exact_match")
            if em is not None and em == 0:
                changed[key] = changed.get(key, 0) + 1
            m = p.get("token_map")
            if isinstance(m, dict) and _valid(m):
                maps.setdefault(key, []).append((r, p, m))
    rank = {key: k for k, key in enumerate(order)}
    candidates = sorted(maps, key=lambda key: (-changed.get(key, 0), rank.get(key, len(rank))))
    by_id = {str(i.get("id")): i for i in inputs}
    out = []
    for key in candidates[: max(0, max_inputs)]:
        inp = by_id.get(key, {})
        base = _load_image(inp.get("image"), image_root)
        name = Path(str(inp.get("image") or key)).name
        for r, p, m in maps[key]:
            try:
                png = _draw(base, m)
            except Exception:  # an illustration: a map that cannot be drawn is left out
                continue
            out.append({"input": key, "run": str(r.get("id")), "png": png, "caption": _caption(r, p, m, name)})
    return out


def _valid(m: dict) -> bool:
    grid = m.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(x, int) and x > 0 for x in grid)):
        return False
    cells = grid[0] * grid[1]
    kind = m.get("kind")
    if kind == "evict":
        share = m.get("kept_share")
        return isinstance(share, list) and len(share) == cells
    if kind in ("merge", "drop"):
        stage = m.get("stage")
        if not (isinstance(stage, list) and len(stage) == cells):
            return False
        if kind == "merge":
            group = m.get("group")
            return isinstance(group, list) and len(group) == cells
        return True
    return False


def _load_image(path, image_root: Path | None) -> Image.Image | None:
    """The input's image as RGB (tried as given, then under ``image_root``), or None when unreadable."""
    if not path or not isinstance(path, str):
        return None
    candidates = [Path(path)]
    if image_root is not None and not Path(path).is_absolute():
        candidates.append(Path(image_root) / path)
    for p in candidates:
        try:
            if not p.is_file():
                continue
            with Image.open(p) as im:
                im.draft("RGB", (WIDTH * 2, WIDTH * 2))
                im = im.convert("RGB")
                im.thumbnail((WIDTH * 2, WIDTH * 2))
                return im.copy()
        except Exception:
            continue
    return None


def figure_size(grid: list[int]) -> tuple[int, int]:
    """``(width, height)`` in pixels of the figure of a ``[rows, cols]`` grid."""
    rows, cols = grid
    return WIDTH, max(1, min(_MAX_HEIGHT, round(WIDTH * rows / cols)))


def _group_colour(k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((k * _GOLDEN) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _dim(stage: int, stages: int) -> int:
    """Alpha of the black over a cell removed at ``stage`` of ``stages``: 220 for the first, 90 for the last."""
    if stages <= 1:
        return 200
    return int(round(90 + 130 * (stages - min(stage, stages)) / (stages - 1)))


def _overlay(m: dict) -> Image.Image:
    """The overlay at one pixel per cell (RGBA, ``cols × rows``)."""
    rows, cols = m["grid"]
    kind = m["kind"]
    pixels: list[tuple[int, int, int, int]] = []
    if kind == "evict":
        for x in m["kept_share"]:
            share = min(1.0, max(0.0, float(x) if x is not None else 1.0))
            pixels.append((0, 0, 0, int(round(225 * (1.0 - share)))))
    else:
        stage = [int(s) if s is not None else 0 for s in m["stage"]]
        n = max(int(m.get("stages") or 0), max(stage, default=0), 1)
        group = [int(g) if g is not None else -1 for g in m.get("group") or [-1] * len(stage)]
        targets = sorted({g for g in group if 0 <= g < len(stage)})
        colour = {g: _group_colour(k) for k, g in enumerate(targets)}
        for i, s in enumerate(stage):
            g = group[i]
            if g in colour:
                pixels.append((*colour[g], _GROUP_ALPHA))
            elif i in colour:  # the cell others merged into
                pixels.append((*colour[i], _GROUP_ALPHA))
            elif s > 0:  # removed without merging: earlier stages darker
                pixels.append((0, 0, 0, _dim(s, n)))
            else:
                pixels.append((0, 0, 0, 0))
    over = Image.new("RGBA", (cols, rows))
    over.putdata(pixels)
    return over


def _draw(base: Image.Image | None, m: dict) -> bytes:
    size = figure_size(m["grid"])
    canvas = base.resize(size, Image.Resampling.BILINEAR) if base is not None else Image.new("RGB", size, _GREY)
    over = _overlay(m).resize(size, Image.Resampling.NEAREST)
    out = Image.alpha_composite(canvas.convert("RGBA"), over).convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _caption(run: dict, p: dict, m: dict, name: str) -> str:
    rows, cols = m["grid"]
    cells = rows * cols
    if m["kind"] == "evict":
        share = [float(x) for x in m["kept_share"] if x is not None]
        mean = sum(share) / len(share) if share else 0.0
        what = f"{mean:.0%} of {cells} tokens kept on average over layers × heads"
    else:
        kept = sum(1 for s in m["stage"] if s == 0)
        n = int(m.get("stages") or max((int(s) for s in m["stage"] if s is not None), default=0))
        what = f"{n} stage{'s' if n != 1 else ''}, {kept} of {cells} tokens kept"
        if m["kind"] == "merge":
            what += f" ({sum(1 for g in m['group'] if g is not None and g >= 0)} merged)"
    em = (p.get("quality") or {}).get("exact_match")
    tail = " · answer changed" if em is not None and em == 0 else ""
    return f"{run.get('id')} · {name} · {what}{tail}"
