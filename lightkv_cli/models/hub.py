"""Checkpoints from the Hugging Face Hub, with the conventions every Hugging Face tool follows.

A model id that is not a local directory is fetched with ``huggingface_hub.snapshot_download`` into the
standard cache (``HF_HOME`` / ``HF_HUB_CACHE``; its own progress bars), and reused from there; nothing is
fetched when ``HF_HUB_OFFLINE=1`` or ``--offline`` is given, and then a checkpoint missing from the cache
gives the one-paragraph message of :func:`missing_message`. Only what loading needs is fetched:
configuration, tokenizer and processor files and ``*.safetensors`` weights (never ``*.bin`` or ``*.pt``
pickles; the model is loaded with ``use_safetensors=True`` and never with ``trust_remote_code``).
``--revision`` pins a branch, tag or commit. ``HF_ENDPOINT`` (read when a download starts) points at a
mirror, or at the test suite's server on 127.0.0.1.

Gated or missing repositories, a missing revision, no network and a full disk each give one line
(:class:`~lightkv_cli.errors.UserError`).
"""

from __future__ import annotations

import errno
import os

from lightkv_cli.errors import UserError

#: What a checkpoint directory needs: configs, tokenizer, processor, chat template, safetensors weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

_TRUE = {"1", "on", "yes", "true"}

#: Approximate download size of each aliased checkpoint (for the missing-weights message), GB.
DOWNLOAD_GB = {
    "llava-hf/llava-1.5-7b-hf": 14,
    "llava-hf/llava-v1.6-vicuna-7b-hf": 14,
    "llava-hf/llava-v1.6-mistral-7b-hf": 15,
    "Qwen/Qwen2-VL-7B-Instruct": 17,
    "Qwen/Qwen2.5-VL-7B-Instruct": 17,
}


def missing_message(name: str, source: str) -> str:
    """The one paragraph for model ``name`` (Hub id ``source``) missing from the cache while downloads are off:
    how to get it, how to pass a local checkpoint, and ``--init random`` to plan without the weights."""
    size = f" (about {DOWNLOAD_GB[source]} GB)" if source in DOWNLOAD_GB else ""
    return (
        f"model '{name}' ({source}) is not in the local Hugging Face cache and downloads are off "
        "(HF_HUB_OFFLINE=1 or --offline). Unset it to download on first use, or run on a machine with internet "
        f"access: `hf download {source}`{size}, "
        "or copy a checkpoint directory here and pass its path with --model /path/to/checkpoint. "
        "To plan memory and latency without the weights, add --init random (quality is then not meaningful)."
    )


def offline_requested(offline: bool = False) -> bool:
    """Whether nothing may be fetched: ``--offline``, or ``HF_HUB_OFFLINE`` set to a true value."""
    return offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def fetch_checkpoint(repo_id: str, revision: str | None = None, offline: bool = False, missing: str = "") -> str:
    """The local directory of ``repo_id`` (at ``revision``), downloaded into the Hugging Face cache if needed.

    Args:
        repo_id: a Hub model id (``org/name``).
        revision: a branch, tag or commit (None: the default branch).
        offline: fetch nothing (also when ``HF_HUB_OFFLINE`` is set); the cached snapshot is used.
        missing: the message for a checkpoint that is not cached while offline.

    Returns:
        The snapshot directory (config, tokenizer, processor files and safetensors weights).

    Raises:
        UserError: not cached while offline (``missing``), a gated repository (accept its licence and log
            in), no such repository or revision, no network, or a disk that is full.
    """
    import huggingface_hub
    from huggingface_hub import errors

    offline = offline_requested(offline)
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
            endpoint=endpoint,
        )
    except errors.GatedRepoError:
        raise UserError(
            f"{where} is a gated repository: accept its licence on its Hub page, then log in (`hf auth login`) "
            "or set HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(
            f"{where}: no such revision on the Hub; give a branch, tag or commit of the repository"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"no Hub repository {where} (or it is private: log in with `hf auth login` or set HF_TOKEN); "
            "check the id, or pass a local checkpoint directory"
        ) from None
    except errors.LocalEntryNotFoundError:
        if offline:
            raise UserError(missing or f"{where} is not in the local Hugging Face cache (offline)") from None
        raise UserError(
            f"cannot reach the Hugging Face Hub to download {where} and it is not cached; check the network "
            "(or HF_ENDPOINT), or copy a checkpoint here and pass its path with --model"
        ) from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise UserError(f"downloading {where} failed: the Hub answered HTTP {status or '?'}") from None
    except _transport_errors() as exc:  # no route, refused, DNS, timeout: the HTTP client's own errors
        raise UserError(
            f"cannot reach the Hugging Face Hub to download {where} ({type(exc).__name__}); check the network "
            "(or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use only the cache"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(
                f"no space left on the device while downloading {where} into the Hugging Face cache; free some "
                "space or point HF_HOME at a larger disk"
            ) from None
        if exc.errno is None:  # a connection error of the HTTP client
            raise UserError(f"cannot reach the Hugging Face Hub to download {where}: {exc}") from None
        raise


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors (httpx for huggingface_hub ≥ 1.0, requests before)."""
    found: list[type[BaseException]] = []
    try:
        import httpx

        found.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        found.append(requests.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found) or (ConnectionError,)
