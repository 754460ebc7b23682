"""Hub ids: download (or find in the local Hugging Face cache) a model's safetensors and tokenizer files."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from subclone_core.core.errors import SubcloneError
from subclone_core.sources.embedded import EMBEDDED
from subclone_core.sources.folders import first_line

VIT_ID = "default-vit"  # the self-pretrained ViT (sources.vit_pretrain)
SPECIAL_IDS = (*EMBEDDED, VIT_ID)  # ids that name no folder, file or Hub model: never looked up on the Hub


def hub_folder(repo_id: str, *, allow_pickle: bool = False) -> Path:
    """Download (or find in the local Hugging Face cache) a Hub model's files; its snapshot folder.

    Raises:
        SubcloneError: offline, unreachable, or no such repository, in one line that says how to use
            a local folder instead.
    """
    import huggingface_hub  # late: only Hub ids need it
    from huggingface_hub import errors as hub_errors

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"] + (
        ["*.bin"] if allow_pickle else []
    )
    offline = _hub_offline()
    instead = "download it elsewhere and pass its local folder (config.json + model.safetensors) instead"
    if not offline and not _hub_reachable():
        offline = True  # fall back to a cached snapshot; fail fast rather than wait on timeouts
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns, local_files_only=offline, etag_timeout=10
        )
    except hub_errors.RepositoryNotFoundError:
        raise SubcloneError(
            f"no model {repo_id!r} on the Hugging Face Hub (or it is gated); {instead}"
        ) from None
    except hub_errors.LocalEntryNotFoundError as err:
        why = "offline (HF_HUB_OFFLINE is set)" if _hub_offline() else "unreachable"
        raise SubcloneError(
            f"parent {repo_id!r} looks like a Hub id, but the Hugging Face Hub is {why} and it is not in the "
            f"local cache{_did_you_mean(repo_id)}; {instead}"
        ) from err
    except (OSError, ValueError) as err:  # HTTP errors from the Hub, invalid ids
        raise SubcloneError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub: {first_line(err)}"
        ) from None
    if not allow_pickle and not any(Path(path).glob("*.safetensors")):
        raise SubcloneError(
            f"Hub model {repo_id!r} has no safetensors weights; pass --allow-pickle to use its pickle weights "
            "(pickles can run code)"
        )
    return Path(path)


def _did_you_mean(text: str) -> str:
    close = difflib.get_close_matches(text, SPECIAL_IDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint, so that a dead network fails in seconds, not minutes."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what we cannot; let the client try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True
