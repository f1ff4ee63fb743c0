"""Publish a pruned checkpoint folder to the Hugging Face Hub (or any Hub-compatible endpoint), and fetch it back.

:func:`push_to_hub` uploads everything ``save_pretrained`` wrote (weights, ``config.json`` with its
``sparsity_plan``, tokenizer files, the ``README.md`` model card) as **one** commit, so a repo never shows a
half-uploaded model. Failures the user can fix raise a :class:`HubError` subclass that says how.

Loading needs nothing from this module: ``AutoModelForCausalLM.from_pretrained(repo_id)`` works when
``HF_ENDPOINT`` pointed at the Hub before ``huggingface_hub`` was imported (it reads the variable once, at
import). To fetch from an endpoint chosen at run time, use :func:`pull_from_hub` and load the local folder it
returns.

The token is only ever handed to ``huggingface_hub``; it is never logged nor put in an error message. What we
log or raise goes through :func:`redact`: credentials embedded in the endpoint URL (``https://user:TOKEN@host``)
are masked, and so are the token itself, ``Authorization``/``Bearer`` values and ``hf_...`` tokens that a server
echoes back in an error body.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Type, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

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

T = TypeVar("T")
_SKIPPED_DIRECTORIES = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
_MASK = "***"
# credentials as they appear in text we do not control (server error bodies, transport errors, HTTP logs):
# (pattern, replacement)
_SECRET_PATTERNS = [
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+|basic\s+|token\s+)?[^\s'\",}]+"),
     r"\1" + _MASK),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + _MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), _MASK),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s:@]*(?::[^/\s@]*)?@"), r"\1" + _MASK + "@"),  # user:pw@ of a URL
]
#: loggers of the HTTP stack under huggingface_hub: they log request URLs (with any credentials they embed)
_HTTP_LOGGERS = ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "requests")


def redact(text: object, secrets: Iterable[Optional[str]] = ()) -> str:
    """``text`` with the given ``secrets`` and anything credential-shaped masked (for logs and error messages)."""
    out = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, _MASK)
    for pattern, replacement in _SECRET_PATTERNS:
        out = pattern.sub(replacement, out)
    return out


class _RedactingFilter(logging.Filter):
    def __init__(self, secrets: List[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is left to the logging machinery
            return True
        redacted = redact(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


@contextlib.contextmanager
def _redacted_logs(secrets: Iterable[Optional[str]]) -> Iterator[None]:
    """While talking to the Hub, mask credentials in what the HTTP stack logs (it logs request URLs, which may
    embed ``user:token@``). A logger's filters only see records created on that logger, so the filter goes on
    every existing logger of those libraries, and comes off afterwards."""
    chosen = [secret for secret in secrets if secret]
    names = [name for name in list(logging.Logger.manager.loggerDict)
             if any(name == root or name.startswith(root + ".") for root in _HTTP_LOGGERS)]
    loggers = [logging.getLogger(name) for name in set(names) | set(_HTTP_LOGGERS)]
    log_filter = _RedactingFilter(chosen)
    for log in loggers:
        log.addFilter(log_filter)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(log_filter)


def _url_secrets(url: str) -> List[str]:
    """The user name and password embedded in ``url`` (``http://user:TOKEN@host``), to mask wherever they appear."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    return [value for value in (parts.password, parts.username) if value]


def _safe_url(url: str) -> str:
    """``url`` without the credentials it may embed (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{_MASK}@{host}", parts.path, parts.query, parts.fragment))


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
    shown = _safe_url(endpoint)  # what logs and errors may show of the endpoint
    token = _resolve_token(token, shown)
    operations = _upload_operations(folder)
    api = HfApi(endpoint=endpoint, token=token)
    logger.info("Pushing %d files from %s to %s on %s", len(operations), folder, repo_id, shown)

    def push() -> CommitInfo:
        try:
            created = api.create_repo(repo_id, private=private, exist_ok=exist_ok).repo_id
        except HfHubHTTPError as error:
            if _status(error) == 409:
                raise RepoExistsError(
                    f"The repo {repo_id!r} already exists on {shown}. Pass exist_ok=True to add a commit to it, "
                    "or choose another repo_id."
                ) from None
            raise
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(created, branch=revision, exist_ok=True)
        return api.create_commit(
            created,
            operations,
            commit_message=commit_message or f"Upload pruned model from {folder.name}",
            revision=revision,
        )

    commit = _guarded(push, endpoint, repo_id, secrets=[token])
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
    secrets = [token if isinstance(token, str) else None, get_token()]
    folder = _guarded(lambda: snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                                cache_dir=cache_dir), endpoint, repo_id, secrets=secrets)
    logger.info("Pulled %s from %s into %s", repo_id, _safe_url(endpoint), folder)
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


def _guarded(call: Callable[[], T], endpoint: str, repo_id: str, secrets: Iterable[Optional[str]] = ()) -> T:
    """``call()``, with huggingface_hub / transport failures turned into HubErrors that say what to do.

    The message keeps the server's or the transport's text, redacted (a server may echo the Authorization header
    in its error body, a transport error may print the URL with the credentials it embeds). The error is raised
    with its chain cut (no ``__cause__`` nor ``__context__``), *outside* the ``except`` clause so that Python does
    not chain the original back in: nothing reachable from what the caller catches holds a secret.
    """
    secrets = [*secrets, *_url_secrets(endpoint)]
    endpoint = _safe_url(endpoint)
    failure: Optional[BaseException] = None
    try:
        with _redacted_logs(secrets):
            return call()
    except HubError as error:
        failure = error
    except OfflineModeIsEnabled:
        failure = EndpointUnreachableError(
            f"Cannot reach {endpoint}: offline mode is on. Unset HF_HUB_OFFLINE to talk to the Hub.")
    except LocalEntryNotFoundError:
        # snapshot_download: the Hub could not be reached and nothing is cached
        failure = EndpointUnreachableError(
            f"Could not download {repo_id!r}: {endpoint} did not answer and the repo is not in the local cache. "
            "Check the endpoint (HF_ENDPOINT or endpoint=...) and your network."
        )
    except HfHubHTTPError as error:
        status = _status(error)
        if status == 401:
            failure = InvalidTokenError(
                f"{endpoint} rejected the token (HTTP 401). Create a token with write access at "
                f"{endpoint}/settings/tokens and pass it as token=... or set HF_TOKEN (it takes precedence over "
                "`hf auth login`)."
            )
        elif status == 403:
            failure = InvalidTokenError(
                f"The token may not write to {repo_id!r} on {endpoint} (HTTP 403). Use a token with write access "
                "to that namespace, or push to your own namespace."
            )
        else:
            failure = HubError(f"The Hub at {endpoint} refused the request for {repo_id!r}: {redact(error, secrets)}")
    except _transport_errors() as error:
        failure = EndpointUnreachableError(
            f"Could not connect to {endpoint} ({type(error).__name__}: {redact(error, secrets)}). Check the endpoint "
            "(HF_ENDPOINT or endpoint=...) and your network."
        )
    failure.__cause__ = failure.__context__ = None
    failure.__suppress_context__ = True
    raise failure
