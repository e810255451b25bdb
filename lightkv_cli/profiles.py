"""Operating-point profiles (``profiles/NAME.toml``) and sweep configurations (``sweep.toml``).

A profile records one operating point so that it can be reused and guarded: the model, the method
and its schedule, the thresholds it was chosen under, the figures measured when it was chosen, and a
fingerprint of the inputs it was chosen on. ``lightkv sweep --save-profile NAME`` writes one;
``lightkv check --profile`` re-runs it. Published default schedules (METHODS.md) ship as profiles of
kind ``published-default``: not tuned for any domain, and without measured figures.

Both files are TOML, validated with pydantic; a wrong field gives one line naming it, the closest
valid name and the fix.
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lightkv_cli import __version__
from lightkv_cli.demo_model import DEMO_NAME
from lightkv_cli.errors import UserError
from lightkv_cli.files import write_text_atomic
from lightkv_cli.methods.registry import METHODS
from lightkv_cli.methods.schedule import Schedule
from lightkv_cli.schemas import explain
from lightkv_cli.scoring.thresholds import Thresholds, ThresholdsSection
from lightkv_cli.text import printable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_FORMAT = "lightkv.profile/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileMeta(_Strict):
    """``[profile]``: what this file is."""

    format: Literal["lightkv.profile/1"] = PROFILE_FORMAT
    name: str
    kind: Literal["measured", "published-default"] = "measured"
    description: str = ""
    created: str | None = None
    tool_version: str | None = None


class ProfileModel(_Strict):
    """``[model]``: the model the operating point is for."""

    name: str
    family: str | None = None
    layers: int | None = Field(default=None, ge=1)
    init: Literal["pretrained", "random"] = "pretrained"


class ProfileMethod(_Strict):
    """``[method]``: the method and its schedule (LightKV-family and random) or its target (others)."""

    name: str
    layers: list[int] | None = None
    windows: list[int] | None = None
    ratios: list[float] | None = None
    positions: Literal["keep", "renumber"] = "keep"
    target_retention: float | None = Field(default=None, gt=0, le=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}'; known methods: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _complete(self) -> ProfileMethod:
        if METHODS[self.name].schedules:
            missing = [k for k in ("layers", "windows", "ratios") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"method '{self.name}' needs a schedule: missing {', '.join(missing)}")
        elif self.target_retention is None:
            raise ValueError(f"method '{self.name}' takes no schedule: give target_retention")
        return self

    @property
    def uses_schedule(self) -> bool:
        """Whether the operating point is an explicit schedule (else a target retention)."""
        return METHODS[self.name].schedules

    def schedule(self) -> Schedule:
        """The explicit schedule (raises ``UserError`` when inconsistent)."""
        return Schedule.build(self.layers, self.windows, self.ratios)


class ProfileMeasured(_Strict):
    """``[measured]``: the figures measured when the operating point was chosen."""

    run: str
    device: str
    dtype: str
    vision_retention: float
    kv_bytes: float
    kv_bytes_vision: float
    kv_ratio: float | None = None
    flops_ratio: float | None = None
    prefill_ms: float | None = None
    time_to_first_token_ms: float | None = None
    decode_ms_per_token: float | None = None
    max_concurrent_requests: int | None = None
    answer_match: float | None = None
    top1_agreement: float | None = None
    first_token_kl_max: float | None = None
    token_agreement: float | None = None
    continuation_kl_max: float | None = None
    accuracy: float | None = None


class ProfileInputs(_Strict):
    """``[inputs]``: what the operating point was chosen on."""

    fingerprint: str
    count: int = Field(ge=1)
    images: list[str] = []


class ProfileSettings(_Strict):
    """``[settings]``: decode settings of the measurement."""

    max_new_tokens: int = Field(default=32, ge=1)


class Profile(_Strict):
    """A whole ``profiles/NAME.toml``. ``[thresholds]`` is a
    :class:`~lightkv_cli.scoring.thresholds.Thresholds` whose keys left out are not checked."""

    profile: ProfileMeta
    model: ProfileModel
    method: ProfileMethod
    thresholds: ThresholdsSection = Field(default_factory=Thresholds.unset)
    measured: ProfileMeasured | None = None
    inputs: ProfileInputs | None = None
    settings: ProfileSettings = ProfileSettings()


class ScheduleTable(_Strict):
    """One ``[[schedules]]`` entry of a sweep configuration."""

    layers: list[int]
    windows: list[int]
    ratios: list[float]


class SweepConfig(_Strict):
    """A ``sweep.toml``: every ``lightkv sweep`` option, so a sweep is repeatable.

    Keys are the long option names with ``_`` for ``-`` (``max_new_tokens``); options given on the
    command line override the file. Relative paths are relative to the file's folder. ``[thresholds]``
    is a :class:`~lightkv_cli.scoring.thresholds.Thresholds`; the keys it leaves out keep their defaults.
    """

    model: str | None = None
    init: Literal["pretrained", "random"] | None = None
    images: list[str] | None = None
    prompt: str | None = None
    prompts: str | None = None
    methods: list[str] | None = None
    retentions: list[float] | None = None
    schedules: list[ScheduleTable] | None = None
    positions: Literal["keep", "renumber"] | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    timing_inputs: Annotated[int, Field(ge=1)] | Literal["all"] | None = None
    timing_batch: list[Annotated[int, Field(ge=1)]] | None = None
    repeats: int | None = Field(default=None, ge=1)
    warmup: int | None = Field(default=None, ge=0)
    nvml_interval_ms: float | None = Field(default=None, gt=0)
    gpu_memory: str | None = None
    device: str | None = None
    dtype: str | None = None
    limit: int | None = Field(default=None, ge=1)
    output: str | None = None
    save_profile: str | None = None
    thresholds: ThresholdsSection | None = None

    #: The tables that are not ``lightkv sweep`` options (the command merges them itself).
    TABLES: ClassVar[tuple[str, ...]] = ("thresholds", "schedules")

    def option_defaults(self) -> dict:
        """The options this file sets, as ``lightkv sweep`` takes them (its click ``default_map``):
        lists of methods and retentions joined with commas, images as a list of paths; without the
        ``[thresholds]`` and ``[[schedules]]`` tables (:attr:`TABLES`)."""
        values = self.model_dump(exclude_none=True, exclude=set(self.TABLES))
        for key in ("methods", "retentions", "timing_batch"):
            if key in values:
                values[key] = ",".join(str(v) for v in values[key])
        for key in ("batch_size", "timing_inputs"):  # options that take a number or a word
            if key in values:
                values[key] = str(values[key])
        return values


def _read_toml(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} '{path}' is a directory; give a .toml file") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} '{path}' is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what} '{path}' is not UTF-8 text (byte {exc.start}: {exc.reason}; a binary or damaged file); "
            "give a TOML file saved as UTF-8"
        ) from None
    except RecursionError:
        raise UserError(f"{what} '{path}' is not valid TOML: nested too deeply") from None


def load_profile(path: Path) -> Profile:
    """Read and validate ``profiles/NAME.toml``.

    Raises:
        UserError: missing file, invalid TOML, an unknown or missing field, a wrong value, a newer
            profile format, or an inconsistent schedule.
    """
    data = _read_toml(Path(path), "profile")
    fmt = data.get("profile", {}).get("format") if isinstance(data.get("profile"), dict) else None
    if isinstance(fmt, str) and fmt != PROFILE_FORMAT and fmt.startswith("lightkv.profile/"):
        raise UserError(
            f"profile '{path}' has format {fmt}; this lightkv {__version__} reads {PROFILE_FORMAT}: upgrade lightkv"
        )
    try:
        prof = Profile.model_validate(data)
    except ValidationError as exc:
        raise explain(exc, Profile, f"profile '{path}'", "see profiles/README.md for the fields") from None
    try:
        if prof.method.uses_schedule:
            prof.method.schedule()
    except UserError as exc:
        raise UserError(f"profile '{path}': [method] {exc}") from None
    return prof


def load_sweep_config(path: Path) -> SweepConfig:
    """Read and validate a sweep configuration; relative paths become relative to its folder.

    Raises:
        UserError: missing file, invalid TOML, an unknown field or a wrong value.
    """
    path = Path(path)
    data = _read_toml(path, "sweep config")
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise explain(
            exc, SweepConfig, f"sweep config '{path}'", "see `lightkv sweep --help` for the options"
        ) from None
    base = path.parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(p if Path(p).is_absolute() else base / p)

    cfg.images = None if cfg.images is None else [rel(p) for p in cfg.images]
    cfg.prompts = rel(cfg.prompts)
    cfg.output = rel(cfg.output)
    return cfg


def check_profile_name(name: str) -> str:
    """Validate a profile name (it becomes ``profiles/NAME.toml``).

    Raises:
        UserError: empty, a path, or characters other than letters, digits, ``.``, ``_``, ``-``.
    """
    if not _NAME_RE.match(name or "") or name.endswith(".toml"):
        raise UserError(
            f"--save-profile '{name}': give a plain name of letters, digits, '.', '_' or '-' (no path, no .toml); "
            "it is written to profiles/NAME.toml"
        )
    return name


def profile_from_results(results: dict, run_id: str, name: str) -> dict:
    """The TOML-ready profile of run ``run_id`` of a results dictionary.

    Raises:
        UserError: the run does not exist, did not finish, or is the uncompressed reference.
    """
    run = next((r for r in results.get("runs", []) if r.get("id") == run_id), None)
    if run is None or run.get("status") != "ok":
        raise UserError(f"cannot save a profile: run '{run_id}' did not finish")
    if run.get("method") == "uncompressed":
        raise UserError(
            "cannot save a profile: no compressed run met the thresholds (the recommendation is the uncompressed "
            "model); relax the thresholds or add higher retentions"
        )
    p, q = run["params"], run.get("quality", {})
    model = results["model"]
    method = {"name": run["method"], "positions": p.get("positions", "keep")}
    if METHODS[run["method"]].schedules:
        method.update({"layers": p["layers"], "windows": p["windows"], "ratios": p["ratios"]})
    if run.get("target_retention") is not None:
        method["target_retention"] = run["target_retention"]

    def median(x):
        return x.get("median") if isinstance(x, dict) else x

    measured = {
        "run": run["id"],
        "device": results.get("environment", {}).get("device_name") or model.get("device", ""),
        "dtype": model.get("dtype", ""),
        "vision_retention": run["vision_retention"],
        "kv_bytes": run["kv_bytes"],
        "kv_bytes_vision": run["kv_bytes_vision"],
        "kv_ratio": run.get("kv_ratio"),
        "flops_ratio": run.get("flops_ratio"),
        "prefill_ms": median(run.get("prefill_ms")),
        "time_to_first_token_ms": median(run.get("time_to_first_token_ms")),
        "decode_ms_per_token": median(run.get("decode_ms_per_token")),
        "max_concurrent_requests": (run.get("capacity") or {}).get("max_concurrent_requests"),
        "answer_match": q.get("answer_match"),
        "top1_agreement": q.get("top1_agreement"),
        "first_token_kl_max": q.get("first_token_kl_max"),
        "token_agreement": q.get("token_agreement"),
        "continuation_kl_max": q.get("continuation_kl_max"),
        "accuracy": q.get("accuracy"),
    }
    data = {
        "profile": {
            "format": PROFILE_FORMAT,
            "name": name,
            "kind": "measured",
            "description": f"chosen by lightkv from {len(results.get('inputs', []))} inputs",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool_version": __version__,
        },
        "model": {
            "name": model["name"],
            "family": model.get("family"),
            "layers": model.get("layers"),
            "init": model.get("init", "pretrained"),
        },
        "method": method,
        "thresholds": {k: v for k, v in (results.get("thresholds") or {}).items() if v is not None},
        "measured": measured,
        "inputs": {
            "fingerprint": results.get("inputs_fingerprint", ""),
            "count": len(results.get("inputs", [])),
            "images": sorted({printable(_portable(Path(i["image"]).parent)) for i in results.get("inputs", [])}),
        },
        "settings": {"max_new_tokens": results.get("settings", {}).get("max_new_tokens", 32)},
    }
    return _drop_none(data)


def _portable(path: Path) -> str:
    """``path`` relative to the current directory when it lies under it (so a profile committed to a
    repository does not name one machine's checkout), else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _drop_none(obj):
    """TOML has no null: leave unset values out."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def save_profile(data: dict, path: Path) -> Path:
    """Validate ``data`` as a profile and write it to ``path`` as TOML, atomically.

    Raises:
        UserError: the folder cannot be created or written.
    """
    import tomli_w

    Profile.model_validate(data)  # what we write, we can read back
    path = Path(path)
    header = (
        f"# lightkv operating point '{data['profile']['name']}' ({data['profile']['kind']}).\n"
        "# Check it in CI: lightkv check --profile "
        + str(path)
        + (
            " (no inputs: the demo model's shipped test questions)"
            if data["model"]["name"] == DEMO_NAME
            else " --images <dir> [--prompts <file>]"
        )
        + "\n\n"
    )
    try:
        write_text_atomic(path, header + tomli_w.dumps(data))
    except OSError as exc:
        raise UserError(
            f"cannot write profile '{path}': {exc.strerror or exc}; give a writable --profiles-dir"
        ) from None
    return path
