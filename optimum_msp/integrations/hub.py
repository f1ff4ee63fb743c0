"""Publish a pruned checkpoint folder to the Hugging Face Hub (or any Hub-compatible endpoint), and fetch it back.

:func:`push_to_hub` uploads everything ``save_pretrained`` wrote (weights, ``config.json`` with its
``sparsity_plan``, tokenizer files, the ``README.md`` model card) as **one** commit, so a repo never shows a
half-uploaded model. Failures the user can fix raise a :class:`HubError` subclass that says how.

Loading needs nothing from this module: ``AutoModelForCausalLM.from_pretrained(repo_id)`` works when
``HF_ENDPOINT`` pointed at the Hub before ``huggingface_hub`` was imported (it reads the variable once, at
import). To fetch from an endpoint chosen at run time, use :func:`pull_from_hub` and load the local folder it
returns.

The token is only ever handed to ``huggingface_hub``; it is never logged nor put in an error message.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Type, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

__all__ = [
    "HubError",
    "MissingTokenError",
    "InvalidTokenError",
    "EndpointUnreachableError",
    "RepoExistsError",
    "push_to_hub",
    "pull_from_hub",
    "resolve_endpoint",
]

_SKIPPED_DIRECTORIES = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}


class HubError(RuntimeError):
    """Talking to the Hub failed; the message says what to do about it."""


class MissingTokenError(HubError):
    """No token was passed, and none is in ``HF_TOKEN`` nor in a stored login."""


class InvalidTokenError(HubError):
    """The Hub rejected the token (HTTP 401), or it may not write where asked (HTTP 403)."""


class EndpointUnreachableError(HubError):
    """Nothing answered at the endpoint (connection refused, DNS failure, timeout, offline mode)."""


class RepoExistsError(HubError):
    """The repo already exists and ``exist_ok=True`` was not passed."""


def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT`` as it is now (huggingface_hub only read it at import), else the Hub."""
    chosen = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return chosen.rstrip("/")


def push_to_hub(
    folder: Union[str, Path],
    repo_id: str,
    *,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    private: Optional[bool] = None,
    exist_ok: bool = False,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
) -> CommitInfo:
    """Upload the saved model ``folder`` to ``repo_id`` as a single commit and return its :class:`CommitInfo`.

    The repo is created first (``private`` applies only then); pushing to an existing repo needs
    ``exist_ok=True``. ``revision`` names a branch, created from ``main`` if missing. ``token`` defaults to
    ``HF_TOKEN`` then to the stored ``hf auth login``; ``endpoint`` to ``HF_ENDPOINT`` then to the public Hub.
    The returned value is a ``str`` (the commit URL) with ``.oid`` and ``.commit_url``.
    """
    folder = _existing_folder(folder)
    endpoint = resolve_endpoint(endpoint)
    token = _resolve_token(token, endpoint)
    operations = _upload_operations(folder)
    api = HfApi(endpoint=endpoint, token=token)
    logger.info("Pushing %d files from %s to %s on %s", len(operations), folder, repo_id, endpoint)

    with _hub_errors(endpoint, repo_id):
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=exist_ok).repo_id
        except HfHubHTTPError as error:
            if _status(error) == 409:
                raise RepoExistsError(
                    f"The repo {repo_id!r} already exists on {endpoint}. Pass exist_ok=True to add a commit to it, "
                    "or choose another repo_id."
                ) from None
            raise
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload pruned model from {folder.name}",
            revision=revision,
        )
    logger.info("Pushed %s: commit %s", repo_id, commit.oid)
    return commit


def pull_from_hub(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Download a snapshot of ``repo_id`` into the Hub cache and return its local folder.

    Public repos need no token. Pass the folder to ``from_pretrained`` (or to this package's loader).
    """
    endpoint = resolve_endpoint(endpoint)
    with _hub_errors(endpoint, repo_id):
        folder = snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    logger.info("Pulled %s from %s into %s", repo_id, endpoint, folder)
    return Path(folder)


# --------------------------------------------------------------------------------------------------------------


def _existing_folder(folder: Union[str, Path]) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the directory written by save_pretrained.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass the directory written by save_pretrained.")
    if not (folder / "README.md").is_file():
        logger.warning("%s has no README.md: the repo will have no model card.", folder)
    return folder


def _resolve_token(token: Optional[str], endpoint: str) -> str:
    if token:
        logger.debug("Using the token passed as argument")
        return token
    found = get_token()  # HF_TOKEN, then the file written by `hf auth login`
    if not found:
        raise MissingTokenError(
            f"Pushing to {endpoint} needs a token with write access and none was found. Pass token=..., set "
            f"the HF_TOKEN environment variable, or run `hf auth login`. Tokens: {endpoint}/settings/tokens"
        )
    logger.debug("Using the token from HF_TOKEN or the stored login")
    return found


def _upload_operations(folder: Path) -> List[CommitOperationAdd]:
    """One addition per file under ``folder``, skipping VCS and cache folders."""
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not _SKIPPED_DIRECTORIES.intersection(relative.parts[:-1]):
            operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=str(path)))
            logger.debug("Will upload %s (%d bytes)", relative.as_posix(), path.stat().st_size)
    if not operations:
        raise FileNotFoundError(f"{folder} holds no file to upload.")
    return operations


def _transport_errors() -> Tuple[Type[BaseException], ...]:
    """Connection-level exceptions of whichever HTTP library this huggingface_hub uses (httpx2 or httpx)."""
    errors: List[Type[BaseException]] = [ConnectionError]  # includes huggingface_hub's OfflineModeIsEnabled
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _status(error: HfHubHTTPError) -> Optional[int]:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub / transport failures into HubErrors that say what to do.

    Causes are dropped (``from None``): their text is shown anyway below, and a chained transport error could
    carry request details we do not control.
    """
    try:
        yield
    except HubError:
        raise
    except OfflineModeIsEnabled:
        raise EndpointUnreachableError(
            f"Cannot reach {endpoint}: offline mode is on. Unset HF_HUB_OFFLINE to talk to the Hub."
        ) from None
    except LocalEntryNotFoundError:
        # snapshot_download: the Hub could not be reached and nothing is cached
        raise EndpointUnreachableError(
            f"Could not download {repo_id!r}: {endpoint} did not answer and the repo is not in the local cache. "
            "Check the endpoint (HF_ENDPOINT or endpoint=...) and your network."
        ) from None
    except HfHubHTTPError as error:
        status = _status(error)
        if status == 401:
            raise InvalidTokenError(
                f"{endpoint} rejected the token (HTTP 401). Create a token with write access at "
                f"{endpoint}/settings/tokens and pass it as token=... or set HF_TOKEN (it takes precedence over "
                "`hf auth login`)."
            ) from None
        if status == 403:
            raise InvalidTokenError(
                f"The token may not write to {repo_id!r} on {endpoint} (HTTP 403). Use a token with write access "
                "to that namespace, or push to your own namespace."
            ) from None
        raise HubError(f"The Hub at {endpoint} refused the request for {repo_id!r}: {error}") from None
    except _transport_errors() as error:
        raise EndpointUnreachableError(
            f"Could not connect to {endpoint} ({type(error).__name__}: {error}). Check the endpoint (HF_ENDPOINT or "
            "endpoint=...) and your network."
        ) from None
