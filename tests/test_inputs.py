"""Tests for lightkv_cli.inputs: image collection/decoding and prompts files (CPU, offline, fast)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image, features

from lightkv_cli.errors import UserError
from lightkv_cli.inputs import (
    DEFAULT_PROMPT,
    IMAGE_EXTENSIONS,
    ImageInput,
    ImageLoadError,
    PromptItem,
    Skipped,
    collect_images,
    describe_skipped,
    load_image,
    load_prompts,
)

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_images"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _by_name(items) -> dict[str, object]:
    return {item.path.name: item for item in items}


# --------------------------------------------------------------------------------------------------
# load_image: formats and modes
# --------------------------------------------------------------------------------------------------


def test_png_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (30, 20), (10, 200, 30)), tmp_path / "a.png")
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (30, 20)
    assert img.getpixel((5, 5)) == (10, 200, 30)


def test_grayscale_png_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("L", (17, 9), 77), tmp_path / "g.png")
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (17, 9)
    assert img.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    src = Image.new("RGBA", (4, 3), (255, 0, 0, 255))
    src.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black must not show as black
    src.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue over white
    img = load_image(_save(src, tmp_path / "t.png"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((2, 2)) == (255, 0, 0)
    r, g, b = img.getpixel((1, 0))
    assert b == 255 and 120 <= r <= 135 and 120 <= g <= 135


def test_palette_with_transparency_composited_on_white(tmp_path: Path) -> None:
    src = Image.new("P", (4, 4), 1)
    src.putpalette([0, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 6))
    src.putpixel((0, 0), 0)
    img = load_image(_save(src, tmp_path / "p.png", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((3, 3)) == (0, 128, 0)


def test_16bit_grayscale_scaled_not_clipped(tmp_path: Path) -> None:
    src = Image.new("I;16", (3, 1), 0)
    src.putpixel((1, 0), 32768)
    src.putpixel((2, 0), 65535)
    img = load_image(_save(src, tmp_path / "deep.png"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((2, 0)) == (255, 255, 255)
    assert 120 <= img.getpixel((1, 0))[0] <= 135  # mid-grey, not clipped to white


def test_animated_gif_returns_first_frame(tmp_path: Path) -> None:
    red = Image.new("RGB", (12, 8), (255, 0, 0))
    blue = Image.new("RGB", (12, 8), (0, 0, 255))
    path = _save(red, tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (12, 8)
    assert img.getpixel((3, 3)) == (255, 0, 0)


def test_jpeg_exif_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(Image.new("RGB", (40, 20), (0, 0, 255)), tmp_path / "rot.jpg", exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (20, 40)


def test_bmp_loads(tmp_path: Path) -> None:
    img = load_image(_save(Image.new("RGB", (7, 5), (1, 2, 3)), tmp_path / "b.bmp"))
    assert img.mode == "RGB" and img.size == (7, 5)
    assert img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_loads(tmp_path: Path) -> None:
    img = load_image(_save(Image.new("RGB", (9, 11), (0, 255, 0)), tmp_path / "w.webp", lossless=True))
    assert img.mode == "RGB" and img.size == (9, 11)
    assert img.getpixel((4, 4)) == (0, 255, 0)


def test_load_image_returns_independent_loaded_copy(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (5, 5), (9, 9, 9)), tmp_path / "c.png")
    img = load_image(path)
    path.unlink()  # file gone: pixels must already be in memory
    assert img.getpixel((4, 4)) == (9, 9, 9)


# --------------------------------------------------------------------------------------------------
# load_image: failures
# --------------------------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "empty file (0 bytes)"
    assert not isinstance(info.value, UserError)


def test_text_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a jpeg\n")
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        load_image(path)


def test_truncated_png(tmp_path: Path) -> None:
    good = _save(_noise((64, 64)), tmp_path / "good.png")
    data = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"^truncated or corrupt image \(.+\)$"):
        load_image(bad)


def test_directory_and_missing_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"cannot read file \(Is a directory\)"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match=r"cannot read file \(No such file or directory\)"):
        load_image(tmp_path / "nope.png")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "locked.png")
    original = Path.open

    def open_(self: Path, *args, **kwargs):
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "cannot read file (Permission denied)"
    loaded, skipped, _ = collect_images([path])
    assert loaded == [] and skipped == [Skipped(path, "cannot read file (Permission denied)")]


@pytest.mark.parametrize("pixels", [150, 250])
def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    # 400-pixel image: past 2x a limit of 150 (Pillow raises), only past 1x a limit of 250 (Pillow warns)
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(ImageLoadError, match=r"^image too large \(400 pixels"):
        load_image(path)


# --------------------------------------------------------------------------------------------------
# collect_images
# --------------------------------------------------------------------------------------------------


def test_collect_mixed_directory(tmp_path: Path) -> None:
    _save(Image.new("RGB", (8, 6), (1, 1, 1)), tmp_path / "b_good.png")
    _save(Image.new("L", (5, 5), 3), tmp_path / "a_gray.PNG")  # upper-case extension still an image
    (tmp_path / "c_empty.png").write_bytes(b"")
    (tmp_path / "d_text.jpg").write_text("hello")
    data = _save(_noise((48, 48), 1), tmp_path / "e_full.png").read_bytes()
    (tmp_path / "e_full.png").unlink()
    (tmp_path / "f_trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.md").write_text("# notes")
    _save(Image.new("RGB", (2, 2)), tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    _save(Image.new("RGB", (2, 2)), tmp_path / "sub" / "nested.png")

    loaded, skipped, ignored = collect_images([tmp_path])

    assert [i.path.name for i in loaded] == ["a_gray.PNG", "b_good.png"]
    assert all(isinstance(i, ImageInput) and i.image.mode == "RGB" for i in loaded)
    assert (loaded[1].width, loaded[1].height) == (8, 6)
    assert (loaded[1].image.width, loaded[1].image.height) == (8, 6)

    reasons = {s.path.name: s.reason for s in skipped}
    assert list(reasons) == ["c_empty.png", "d_text.jpg", "f_trunc.png"]  # name order
    assert "empty" in reasons["c_empty.png"]
    assert "not a recognised image" in reasons["d_text.jpg"]
    assert "truncated" in reasons["f_trunc.png"]

    assert ignored == [tmp_path / "notes.md"]
    everything = [i.path.name for i in loaded] + list(reasons) + [p.name for p in ignored]
    assert ".hidden.png" not in everything
    assert "nested.png" not in everything and "sub" not in everything


def test_collect_explicit_files(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (3, 4), (5, 6, 7)), tmp_path / "x.png")
    text = tmp_path / "readme.txt"
    text.write_text("not an image")
    # an explicit non-image-extension file that IS an image is loaded
    disguised = _save(Image.new("RGB", (2, 2)), tmp_path / "photo.data", format="PNG")
    loaded, skipped, ignored = collect_images([str(text), good, disguised])
    assert [i.path for i in loaded] == [good, disguised]
    assert skipped == [Skipped(text, "not a recognised image (unknown file format)")]
    assert ignored == []


def test_collect_missing_path_is_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=r"image path '.*nope' does not exist"):
        collect_images([missing])


def test_collect_deduplicates(tmp_path: Path) -> None:
    img = _save(Image.new("RGB", (2, 2)), tmp_path / "one.png")
    other = tmp_path / "sub"
    other.mkdir()
    via_dotdot = other / ".." / "one.png"
    loaded, skipped, ignored = collect_images([img, tmp_path, via_dotdot, str(img)])
    assert [i.path for i in loaded] == [img]
    assert skipped == [] and ignored == []


def test_collect_nothing_loads_does_not_raise(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    loaded, skipped, ignored = collect_images([tmp_path])
    assert loaded == [] and len(skipped) == 1 and ignored == []
    assert collect_images([]) == ([], [], [])


def test_sha256_matches_file(tmp_path: Path) -> None:
    path = _save(_noise((16, 16), 3), tmp_path / "h.png")
    (item,), _, _ = collect_images([path])
    assert item.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_input_equality_ignores_image(tmp_path: Path) -> None:
    a = ImageInput(Path("a.png"), Image.new("RGB", (1, 1), 0), 1, 1, "00")
    b = ImageInput(Path("a.png"), Image.new("RGB", (1, 1), 255), 1, 1, "00")
    assert a == b


def test_describe_skipped_uses_file_name_only(tmp_path: Path) -> None:
    s = Skipped(tmp_path / "deep" / "broken.jpg", "truncated or corrupt image (image file is truncated)")
    assert describe_skipped(s) == "skipped broken.jpg: truncated or corrupt image (image file is truncated)"


def test_constants() -> None:
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
    assert DEFAULT_PROMPT == "Describe this image in one sentence."


# --------------------------------------------------------------------------------------------------
# load_prompts
# --------------------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def prompt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    _save(Image.new("RGB", (2, 2)), d / "near.png")
    return d


def test_load_prompts_valid(tmp_path: Path, prompt_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _save(Image.new("RGB", (2, 2)), root / "far.png")
    path = _write_lines(
        prompt_dir / "p.jsonl",
        [
            "# comment line",
            json.dumps({"image": "near.png", "question": "What?", "answer": "cat"}),
            "",
            "   ",
            json.dumps({"image": "far.png", "question": "How many?", "answer": 24}),
            json.dumps({"image": str(root / "far.png"), "question": "Abs?", "answer": None}),
            json.dumps({"image": "near.png", "question": "No answer"}),
        ],
    )
    items = load_prompts(path, image_root=root)
    assert items == [
        PromptItem(prompt_dir / "near.png", "What?", "cat", 2),
        PromptItem(root / "far.png", "How many?", "24", 5),
        PromptItem(root / "far.png", "Abs?", None, 6),
        PromptItem(prompt_dir / "near.png", "No answer", None, 7),
    ]
    assert all(item.image.exists() for item in items)


def test_load_prompts_prefers_prompts_dir_and_accepts_file_as_root(tmp_path: Path, prompt_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _save(Image.new("RGB", (2, 2)), root / "near.png")  # same name in both places: prompts dir wins
    _save(Image.new("RGB", (2, 2)), root / "only_root.png")
    path = _write_lines(
        prompt_dir / "p.jsonl",
        [json.dumps({"image": "near.png", "question": "q"}), json.dumps({"image": "only_root.png", "question": "q"})],
    )
    items = load_prompts(str(path), image_root=root / "near.png")  # a file: its folder is used
    assert [i.image for i in items] == [prompt_dir / "near.png", root / "only_root.png"]


def test_load_prompts_falls_back_to_cwd(tmp_path: Path, prompt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _save(Image.new("RGB", (2, 2)), cwd / "here.png")
    monkeypatch.chdir(cwd)
    path = _write_lines(prompt_dir / "p.jsonl", [json.dumps({"image": "here.png", "question": "q"})])
    (item,) = load_prompts(path)
    assert item.image.resolve() == (cwd / "here.png").resolve()


GOOD = json.dumps({"image": "near.png", "question": "q"})


@pytest.mark.parametrize(
    ("third_line", "expected"),
    [
        ('{"image": "near.png", "question": ', "invalid JSON"),
        ('["near.png", "q"]', "expected a JSON object"),
        ('{"image": "near.png"}', 'missing "question"'),
        ('{"question": "q"}', 'missing "image"'),
        ('{"image": "near.png", "question": "  "}', '"question" is empty'),
        ('{"image": "", "question": "q"}', '"image" is empty'),
        ('{"image": 3, "question": "q"}', '"image" must be a string'),
        ('{"image": "near.png", "question": ["q"]}', '"question" must be a string'),
        ('{"image": "near.png", "question": "q", "answer": true}', '"answer" must be a string, a number or null'),
        ('{"image": "near.png", "question": "q", "label": "x"}', "unknown key(s) 'label'"),
        ('{"image": "gone.png", "question": "q"}', "image 'gone.png' not found (looked in"),
    ],
)
def test_load_prompts_errors_name_line(prompt_dir: Path, third_line: str, expected: str) -> None:
    path = _write_lines(prompt_dir / "bad.jsonl", [GOOD, "# comment", third_line, GOOD])
    with pytest.raises(UserError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message
    assert "\n" not in message


def test_load_prompts_unknown_key_lists_allowed(prompt_dir: Path) -> None:
    path = _write_lines(prompt_dir / "bad.jsonl", ['{"image": "near.png", "question": "q", "img": 1}'])
    with pytest.raises(UserError, match=r":1: unknown key\(s\) 'img'; allowed keys are 'image', 'question', 'answer'"):
        load_prompts(path)


def test_load_prompts_invalid_json_includes_json_message(prompt_dir: Path) -> None:
    path = _write_lines(prompt_dir / "bad.jsonl", ["{'image': 'near.png'}"])
    with pytest.raises(UserError, match=r":1: invalid JSON \(Expecting property name enclosed in double quotes"):
        load_prompts(path)


def test_load_prompts_empty_file(prompt_dir: Path) -> None:
    path = _write_lines(prompt_dir / "empty.jsonl", ["# only a comment", "", "  "])
    with pytest.raises(UserError, match="is empty"):
        load_prompts(path)
    (prompt_dir / "zero.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_prompts(prompt_dir / "zero.jsonl")


def test_load_prompts_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl"
    with pytest.raises(UserError, match=rf"^prompts file '{missing}' does not exist$"):
        load_prompts(missing)


def test_load_prompts_crlf_and_bom(prompt_dir: Path) -> None:
    path = prompt_dir / "win.jsonl"
    path.write_bytes(("\ufeff" + GOOD + "\r\n" + GOOD + "\r\n").encode("utf-8"))
    items = load_prompts(path)
    assert [i.line for i in items] == [1, 2]


def test_load_prompts_type_and_tags(prompt_dir: Path) -> None:
    path = _write_lines(
        prompt_dir / "typed.jsonl",
        [
            json.dumps({"image": "near.png", "question": "How many?", "type": "counting", "tags": ["small", "ocr"]}),
            json.dumps({"image": "near.png", "question": "q", "tags": ["a", "b", "a"], "type": None}),
            json.dumps({"image": "near.png", "question": "q", "tags": None}),
            json.dumps({"image": "near.png", "question": "q", "tags": []}),
        ],
    )
    items = load_prompts(path)
    assert [(i.type, i.tags) for i in items] == [
        ("counting", ("small", "ocr")),
        (None, ("a", "b")),  # duplicates dropped, first kept
        (None, ()),
        (None, ()),
    ]
    assert items[2] == PromptItem(prompt_dir / "near.png", "q", None, 3)  # the defaults


@pytest.mark.parametrize(
    ("third_line", "expected"),
    [
        ('{"image": "near.png", "question": "q", "type": 3}', '"type" must be a string, got a number'),
        ('{"image": "near.png", "question": "q", "type": ["a"]}', '"type" must be a string, got an array'),
        ('{"image": "near.png", "question": "q", "type": " "}', '"type" is empty'),
        ('{"image": "near.png", "question": "q", "tags": "ocr"}', '"tags" must be an array of strings, got str'),
        ('{"image": "near.png", "question": "q", "tags": {"a": 1}}', '"tags" must be an array of strings, got an'),
        ('{"image": "near.png", "question": "q", "tags": ["a", 2]}', '"tags"[1] must be a string, got a number'),
        ('{"image": "near.png", "question": "q", "tags": [""]}', '"tags"[0] is empty'),
    ],
)
def test_load_prompts_type_and_tags_errors_name_line(prompt_dir: Path, third_line: str, expected: str) -> None:
    path = _write_lines(prompt_dir / "bad.jsonl", [GOOD, "# comment", third_line, GOOD])
    with pytest.raises(UserError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message
    assert "\n" not in message


def test_profile_input_records_type_and_tags_only_when_given(prompt_dir: Path) -> None:
    from types import SimpleNamespace

    from lightkv_cli.engine.prepare import ProfileInput

    image = SimpleNamespace(path=prompt_dir / "near.png", sha256="0" * 64, width=8, height=8)
    plain = ProfileInput("near.png", image, "q", None, {}, 10, 4).to_dict()
    assert "type" not in plain and "tags" not in plain
    typed = ProfileInput("near.png", image, "q", None, {}, 10, 4, type="counting", tags=("ocr",)).to_dict()
    assert (typed["type"], typed["tags"]) == ("counting", ["ocr"])
    assert typed.keys() - plain.keys() == {"type", "tags"}


def test_demo_testset_prompts_carry_their_question_type() -> None:
    from collections import Counter

    from lightkv_cli.demo_model import TESTSET_PROMPTS
    from lightkv_cli.demo_model.data import question_type

    items = load_prompts(TESTSET_PROMPTS)
    assert len(items) == 200
    assert all(i.type == question_type(i.question, i.answer) for i in items)
    assert Counter(i.type for i in items) == {"shape": 50, "colour": 50, "yes/no": 100}


# --------------------------------------------------------------------------------------------------
# the repository's sample images
# --------------------------------------------------------------------------------------------------


def test_sample_images_directory() -> None:
    loaded, skipped, ignored = collect_images([SAMPLE_DIR])
    assert len(loaded) == 16
    assert skipped == []
    assert sorted(p.name for p in ignored) == ["LICENSES.md", "prompts.jsonl"]
    assert all(i.image.mode == "RGB" and i.image.size == (i.width, i.height) for i in loaded)
    by_name = _by_name(loaded)
    assert by_name["matplotlib_grace_hopper.jpg"].width == 512  # type: ignore[attr-defined]
    assert by_name["matplotlib_grace_hopper.jpg"].height == 600  # type: ignore[attr-defined]
    # LICENSES.md records each file's sha256; our digests must agree with it
    licences = (SAMPLE_DIR / "LICENSES.md").read_text(encoding="utf-8")
    for item in loaded:
        assert item.sha256 in licences, item.path.name


def test_sample_prompts() -> None:
    items = load_prompts(SAMPLE_DIR / "prompts.jsonl")
    assert len(items) == 4
    assert all(item.answer for item in items)
    assert all(item.image.is_file() and item.image.parent == SAMPLE_DIR for item in items)
    assert [i.line for i in items] == [1, 2, 3, 4]
    assert items[0].answer == "cat"


def test_gather_inputs_pairs_prompts_with_images_and_limits(tmp_path):
    from lightkv_cli.inputs import gather_inputs

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"")
    lines = [
        {"image": "a.png", "question": "q1", "answer": "x"},
        {"image": "bad.png", "question": "q2"},
        {"image": "a.png", "question": "q3"},
        {"image": "a.png", "question": "q4"},
    ]
    pf = tmp_path / "p.jsonl"
    pf.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = gather_inputs([], prompts=pf)
    assert [i.question for i in got.items] == ["q1", "q3", "q4"]
    assert got.images[0] is got.images[1]  # each distinct image loaded once
    assert len(got.skipped) == 1 and "line 2" in got.skipped[0].reason and "empty" in got.skipped[0].reason
    limited = gather_inputs([], prompts=pf, limit=2)
    assert [i.question for i in limited.items] == ["q1", "q3"]
    with pytest.raises(UserError):
        gather_inputs([tmp_path], prompt="x", prompts=pf)
    with pytest.raises(UserError):
        gather_inputs([])
    with pytest.raises(UserError):
        gather_inputs([tmp_path], prompt="   ")
    plain = gather_inputs([tmp_path], limit=1)
    assert len(plain.items) == 1 and plain.items[0].question == "Describe this image in one sentence."
