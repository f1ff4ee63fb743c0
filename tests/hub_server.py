"""A loopback fake of the Hugging Face Hub, for tests that push and pull without the internet.

It speaks the part of the Hub HTTP API that the real ``huggingface_hub`` client (and transformers'
``push_to_hub`` / ``from_pretrained`` on top of it) calls to create a model repo, commit files to it and
download them again:

* ``POST /api/repos/create`` (409 when the repo exists), ``GET /api/whoami-v2``, ``POST /api/validate-yaml``
* ``POST /api/models/{repo}/preupload/{rev}`` -> ``uploadMode`` "lfs" or "regular" for each file
* ``POST /{repo}.git/info/lfs/objects/batch`` -> upload + verify actions that point back to this server,
  ``PUT /lfs-upload/{oid}`` (the object itself) and ``POST /{repo}.git/info/lfs/objects/verify``
* ``POST /api/models/{repo}/commit/{rev}`` with the ndjson payload (file, lfsFile, deletedFile, deletedFolder)
* ``POST /api/models/{repo}/branch/{branch}``
* ``GET /api/models/{repo}[/revision/{rev}]`` (siblings), ``GET /api/models/{repo}/tree/{rev}[/{path}]``,
  ``POST /api/models/{repo}/paths-info/{rev}``
* ``GET|HEAD /{repo}/resolve/{rev}/{path}``: regular files are served directly with ETag / X-Repo-Commit /
  Content-Length; LFS files answer 302 with X-Linked-Etag / X-Linked-Size towards a second listener on another
  port (the "CDN"), as the real Hub redirects to its CDN, so the client's cross-origin download path (which
  drops the Authorization header) is the one exercised.

Only model repos with ``namespace/name`` ids are served. Writes need ``Authorization: Bearer <token>`` with a
token known to the server, on a namespace the token's user owns. Repos live in a temporary folder (one blob
file per object) and in memory (branches, commits).

The ``huggingface_hub`` client uploads large files with Xet when ``hf_xet`` is installed, and there is no
fake of Xet's storage service here: the :func:`fake_hub` fixture therefore disables Xet, which makes the
client use the classic Git LFS protocol above. Downloads use Xet only when the server sends ``X-Xet-Hash``,
which this one never does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import secrets
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

logger = logging.getLogger(__name__)

DEFAULT_TOKEN = "hf_fakehub_write_token_0123456789"
DEFAULT_USERNAME = "tester"
# Patterns of the .gitattributes the Hub puts in every new repo: these go through LFS whatever their size.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz",
    ".pkl", ".pickle", ".model", ".tflite", ".ot", ".zip", ".tar", ".gz", ".zst", ".arrow", ".parquet",
)  # fmt: skip
# The Hub refuses regular (non-LFS) files above 10 MB.
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------------
# Repository storage: no HTTP in here.
# --------------------------------------------------------------------------------------------------------------


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ETag / ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The small text file git stores in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    size: int
    git_oid: str  # of the content, or of the pointer for an LFS file (as on the Hub)
    lfs_sha256: Optional[str] = None
    pointer_size: Optional[int] = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def content_oid(self) -> str:
        """The oid the client compares its local file to: sha256 for LFS files, git sha1 for regular ones."""
        return self.lfs_sha256 or self.git_oid


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    files: Dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: Dict[str, str] = field(default_factory=dict)
    commits: Dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        """A branch name, a full commit oid or an unambiguous prefix of one (as ``git`` accepts)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        return self.commits[matches[0]] if len(matches) == 1 else None


class HubHttpError(Exception):
    """An error answer, shaped as the Hub shapes them (the client reads X-Error-Code to pick its exception)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 body: Optional[dict] = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}  # extra JSON fields next to "error"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class RepoStore:
    """Repos, commits and blobs of the fake Hub; thread-safe (the HTTP server is threaded)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        self.repos: Dict[str, Repo] = {}
        self.lock = threading.RLock()
        self._commit_counter = itertools.count()

    # -- blobs ---------------------------------------------------------------------------------------------
    def _write_object(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        (self.root / "objects" / oid).write_bytes(data)
        return oid

    def has_lfs_object(self, sha256: str) -> bool:
        return (self.root / "lfs" / sha256).is_file()

    def lfs_object_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    def put_lfs_object(self, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubHttpError(400, f"Uploaded content does not hash to {sha256}.")
        self.lfs_object_path(sha256).write_bytes(data)

    def read(self, stored: StoredFile) -> bytes:
        if stored.is_lfs:
            return self.lfs_object_path(stored.lfs_sha256).read_bytes()
        return (self.root / "objects" / stored.git_oid).read_bytes()

    # -- repos and commits --------------------------------------------------------------------------------
    def get_repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubHttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    def get_commit(self, repo_id: str, revision: str) -> Commit:
        commit = self.get_repo(repo_id).resolve(revision)
        if commit is None:
            raise HubHttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubHttpError(409, "You already created this model repo")
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            self.repos[repo_id] = repo
            # Like the Hub, start every repo with a commit holding the LFS .gitattributes.
            gitattributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
            initial_files = {".gitattributes": self.regular_file(gitattributes.encode())}
            self._new_commit(repo, "main", "initial commit", initial_files)
            return repo

    def regular_file(self, data: bytes) -> StoredFile:
        return StoredFile(size=len(data), git_oid=self._write_object(data))

    def lfs_file(self, sha256: str) -> StoredFile:
        if not self.has_lfs_object(sha256):
            raise HubHttpError(
                422, f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {sha256}"
            )
        size = self.lfs_object_path(sha256).stat().st_size
        pointer = lfs_pointer(sha256, size)
        return StoredFile(size=size, git_oid=git_blob_oid(pointer), lfs_sha256=sha256, pointer_size=len(pointer))

    def create_branch(self, repo_id: str, branch: str, starting_point: Optional[str]) -> None:
        with self.lock:
            repo = self.get_repo(repo_id)
            if branch in repo.branches:
                raise HubHttpError(409, "Reference already exists")
            repo.branches[branch] = self.get_commit(repo_id, starting_point or "main").oid

    def commit(self, repo_id: str, branch: str, title: str, changes: List[Tuple[str, str, Optional[StoredFile]]],
               parent_commit: Optional[str] = None) -> Commit:  # fmt: skip
        """Apply ``(kind, path, file)`` changes on top of ``branch``; kind is "add", "delete_file", "delete_folder"."""
        with self.lock:
            repo = self.get_repo(repo_id)
            if branch not in repo.branches:
                raise HubHttpError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and not head.oid.startswith(parent_commit):
                raise HubHttpError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for kind, path, stored in changes:
                if kind == "add":
                    files[path] = stored
                elif kind == "delete_file":
                    if files.pop(path, None) is None:
                        raise HubHttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                else:
                    prefix = path.rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            return self._new_commit(repo, branch, title, files)

    def _new_commit(self, repo: Repo, branch: str, title: str, files: Dict[str, StoredFile]) -> Commit:
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{next(self._commit_counter)}\n{sorted(files)}"
        commit = Commit(oid=hashlib.sha1(seed.encode()).hexdigest(), parent=parent, title=title, files=files,
                        date=_now())  # fmt: skip
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


def tree_entries(commit: Commit, folder: str, recursive: bool) -> List[dict]:
    """The Hub's tree listing of ``folder`` (``""`` for the root) in ``commit``: files and directories."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    if prefix and prefix[:-1] in commit.files:
        raise HubHttpError(400, f"{folder} is a file, not a folder")
    entries: Dict[str, dict] = {}
    for path, stored in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        relative_parts = path[len(prefix):].split("/")
        # every folder between `folder` and the file shows up (only the first level when not recursive)
        for depth in range(1, len(relative_parts)):
            directory = prefix + "/".join(relative_parts[:depth])
            entries.setdefault(directory, directory_entry(directory))
            if not recursive:
                break
        if recursive or len(relative_parts) == 1:
            entries[path] = file_entry(path, stored)
    if prefix and not entries:
        raise HubHttpError(404, f"Entry not found: {folder}", code="EntryNotFound")
    return list(entries.values())


def file_entry(path: str, stored: StoredFile) -> dict:
    entry = {"type": "file", "oid": stored.git_oid, "size": stored.size, "path": path}
    if stored.is_lfs:
        entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size, "pointerSize": stored.pointer_size}
    return entry


def directory_entry(path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


# --------------------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    status: int
    authenticated: bool


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to the FakeHub that owns the server (``self.server.hub``)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "FakeHub/1.0"

    # -- plumbing -------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        logger.debug("fake hub: " + format, *args)

    @property
    def hub(self) -> "FakeHub":
        return self.server.hub  # type: ignore[attr-defined]

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.parts = [unquote(part) for part in split.path.split("/")[1:]]
        self.status_sent = 0
        self.user: Optional[str] = None
        try:
            # Read the body first, so that an early error still leaves the keep-alive connection in sync.
            self.body = self._read_body()
            self.user = self._authenticated_user()
            if self.server.is_cdn:  # type: ignore[attr-defined]
                self._route_cdn()
            else:
                self._route_api()
        except HubHttpError as error:
            self._send_error(error)
        except Exception as error:  # a bug in the fake: answer 500 (the client retries those) and say why
            logger.exception("fake hub crashed on %s %s", self.command, split.path)
            self._send_error(HubHttpError(500, f"fake hub error: {error!r}"))
        self.hub.requests.append(
            RecordedRequest(self.command, split.path, self.status_sent, self.user is not None)
        )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authenticated_user(self) -> Optional[str]:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else header.strip()
        user = self.hub.tokens.get(token)
        if user is None:
            # The Hub's exact wording: the client tells a bad token from a missing repo by it.
            raise HubHttpError(401, "Invalid credentials in Authorization header")
        return user

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubHttpError(400, f"Body is not JSON: {error}") from error

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
              content_type: str = "application/json", content_length: Optional[int] = None) -> None:  # fmt: skip
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.status_sent = status

    def _send_json(self, payload, status: int = 200, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, error: HubHttpError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message, **error.body}, status=error.status, headers=headers)

    def _send_file(self, data: bytes, headers: dict) -> None:
        """Serve file bytes, honouring a ``Range: bytes=N-[M]`` header (used by the client to resume)."""
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start_text, _, end_text = range_header[len("bytes="):].partition("-")
            start, end = int(start_text or 0), int(end_text) if end_text else len(data) - 1
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            self._send(206, data[start:end + 1], headers, content_type="application/octet-stream")
            return
        self._send(200, data, headers, content_type="application/octet-stream")

    # -- access control -------------------------------------------------------------------------------------
    def _require_writer(self, namespace: str) -> str:
        if self.user is None:
            raise HubHttpError(401, "You must be authenticated to access this resource")
        if namespace != self.user and namespace not in self.hub.orgs:
            raise HubHttpError(403, f"You don't have the rights to write to the namespace {namespace}")
        return self.user

    def _readable_repo(self, repo_id: str) -> Repo:
        repo = self.hub.store.get_repo(repo_id)
        if repo.private and self.user != repo_id.split("/")[0]:
            raise HubHttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    # -- routing --------------------------------------------------------------------------------------------
    def _route_api(self) -> None:
        method, parts = self.command, self.parts
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if parts == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(parts) == 2 and parts[0] == "lfs-upload" and method == "PUT":
            return self._lfs_put(parts[1])
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", (parts[4:5] or [""])[0], parts[5:]
            handlers = {
                ("", "GET"): lambda: self._model_info(repo_id, "main"),
                ("revision", "GET"): lambda: self._model_info(repo_id, "/".join(rest)),
                ("preupload", "POST"): lambda: self._preupload(repo_id, "/".join(rest)),
                ("commit", "POST"): lambda: self._commit(repo_id, "/".join(rest)),
                ("tree", "GET"): lambda: self._tree(repo_id, rest[0], "/".join(rest[1:])),
                ("paths-info", "POST"): lambda: self._paths_info(repo_id, "/".join(rest)),
                ("branch", "POST"): lambda: self._create_branch(repo_id, "/".join(rest)),
            }
            if (action, method) in handlers and (action == "" or rest):
                return handlers[(action, method)]()
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1][:-len('.git')]}"
            if parts[5] == "batch" and method == "POST":
                return self._lfs_batch(repo_id)
            if parts[5] == "verify" and method == "POST":
                return self._lfs_verify(repo_id)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        logger.warning("fake hub: no route for %s %s", method, self.path)
        raise HubHttpError(404, f"fake hub has no route for {method} /{'/'.join(parts)}")

    def _route_cdn(self) -> None:
        if len(self.parts) == 2 and self.parts[0] == "lfs-cdn" and self.command in ("GET", "HEAD"):
            sha256 = self.parts[1]
            if not self.hub.store.has_lfs_object(sha256):
                raise HubHttpError(404, "No such object")
            filename = self.query.get("filename", [sha256])[0]
            headers = {"ETag": f'"{sha256}"', "Content-Disposition": f'inline; filename="{filename}";'}
            return self._send_file(self.hub.store.lfs_object_path(sha256).read_bytes(), headers)
        raise HubHttpError(404, "Not found")

    # -- account --------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        if self.user is None:
            raise HubHttpError(401, "Invalid credentials in Authorization header")
        self._send_json({
            "type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24], "name": self.user,
            "fullname": self.user, "orgs": [{"type": "org", "name": org} for org in self.hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
        })  # fmt: skip

    def _validate_yaml(self) -> None:
        import yaml  # a dependency of huggingface_hub

        content = self._json_body().get("content", "")
        if content.startswith("---"):
            front_matter = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                yaml.safe_load(front_matter)
            except yaml.YAMLError as error:
                self._send_json({"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, status=400)
                return
        self._send_json({"errors": [], "warnings": []})

    # -- repos ----------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HubHttpError(400, "fake hub only serves model repos")
        user = self._require_writer(payload.get("organization") or self.user or "")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.hub.endpoint}/{repo_id}"
        try:
            self.hub.store.create_repo(repo_id, private=private)
        except HubHttpError as error:
            error.body["url"] = url  # the client reads it when exist_ok=True
            raise
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        self._require_writer(repo_id.split("/")[0])
        self.hub.store.create_branch(repo_id, branch, self._json_body().get("startingPoint"))
        self._send_json({})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._readable_repo(repo_id)
        commit = self.hub.store.get_commit(repo_id, revision)
        with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=stored.size, blobId=stored.git_oid)
                if stored.is_lfs:
                    lfs = {"size": stored.size, "sha256": stored.lfs_sha256, "pointerSize": stored.pointer_size}
                    sibling["lfs"] = lfs
            siblings.append(sibling)
        self._send_json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })  # fmt: skip

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        self._readable_repo(repo_id)
        commit = self.hub.store.get_commit(repo_id, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send_json(tree_entries(commit, folder, recursive))

    def _paths_info(self, repo_id: str, revision: str) -> None:
        self._readable_repo(repo_id)
        commit = self.hub.store.get_commit(repo_id, revision)
        form = parse_qs(self.body.decode())
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                entries.append(directory_entry(path))
        self._send_json(entries)

    # -- uploads --------------------------------------------------------------------------------------------
    def _writable_branch(self, repo_id: str, revision: str) -> Commit:
        self._require_writer(repo_id.split("/")[0])
        if self.query.get("create_pr"):
            raise HubHttpError(501, "fake hub does not support pull requests")
        return self.hub.store.get_commit(repo_id, revision)

    def _preupload(self, repo_id: str, revision: str) -> None:
        head = self._writable_branch(repo_id, revision)
        answers = []
        for item in self._json_body().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            existing = head.files.get(item["path"])
            answers.append({
                "path": item["path"],
                "uploadMode": "lfs" if self.hub.goes_to_lfs(item["path"], item["size"], sample) else "regular",
                "shouldIgnore": False,
                "oid": existing.content_oid if existing else None,
            })  # fmt: skip
        self._send_json({"files": answers})

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_writer(repo_id.split("/")[0])
        self.hub.store.get_repo(repo_id)
        request = self._json_body()
        if request.get("operation") != "upload":
            raise HubHttpError(400, "fake hub only implements LFS uploads")
        objects = []
        for obj in request.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub.store.has_lfs_object(obj["oid"]):  # no "actions" = already stored, skip the upload
                ticket = self.hub.issue_upload_ticket(obj["oid"], obj["size"])
                git_repo_url = f"{self.hub.endpoint}/{repo_id}.git/info/lfs/objects"
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}?ticket={ticket}", "header": {}},
                    "verify": {"href": f"{git_repo_url}/verify", "header": {}},
                }
            objects.append(answer)
        body = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        self._send(200, body, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, sha256: str) -> None:
        # The client PUTs objects without its Authorization header (the real target is a presigned S3 URL),
        # so the URL itself carries the proof: a one-time ticket issued by the batch endpoint.
        ticket = self.query.get("ticket", [""])[0]
        if not self.hub.redeem_upload_ticket(ticket, sha256, len(self.body)):
            raise HubHttpError(403, "Invalid or expired upload URL")
        self.hub.store.put_lfs_object(sha256, self.body)
        self.hub.lfs_uploads.append(sha256)
        self._send(200, b"", {"ETag": f'"{sha256}"'})

    def _lfs_verify(self, repo_id: str) -> None:
        self._require_writer(repo_id.split("/")[0])
        request = self._json_body()
        stored = self.hub.store.lfs_object_path(request.get("oid", ""))
        if not stored.is_file() or stored.stat().st_size != request.get("size"):
            raise HubHttpError(404, "LFS object not found or of the wrong size")
        self._send_json({"success": True})

    def _commit(self, repo_id: str, revision: str) -> None:
        self._writable_branch(repo_id, revision)
        store = self.hub.store
        header: dict = {}
        changes: List[Tuple[str, str, Optional[StoredFile]]] = []
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                content = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                changes.append(("add", value["path"], store.regular_file(content)))
            elif key == "lfsFile":
                changes.append(("add", value["path"], store.lfs_file(value["oid"])))
            elif key == "deletedFile":
                changes.append(("delete_file", value["path"], None))
            elif key == "deletedFolder":
                changes.append(("delete_folder", value["path"], None))
            else:
                raise HubHttpError(400, f"fake hub does not handle commit operation {key!r}")
        if not header.get("summary"):
            raise HubHttpError(400, "The commit needs a summary")
        commit = store.commit(repo_id, revision, header["summary"], changes, header.get("parentCommit"))
        self._send_json({
            "success": True, "commitOid": commit.oid, "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{commit.oid}",
            "hookOutput": "", "pullRequestUrl": None,
        })  # fmt: skip

    # -- downloads ------------------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._readable_repo(repo_id)
        commit = self.hub.store.get_commit(repo_id, revision)
        stored = commit.files.get(path)
        if stored is None:
            # X-Repo-Commit lets the client remember the absence of this file at this commit.
            raise HubHttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.git_oid}"', "Accept-Ranges": "bytes"}
        if stored.is_lfs:
            location = f"{self.hub.cdn_endpoint}/lfs-cdn/{stored.lfs_sha256}?filename={quote(path.split('/')[-1])}"
            headers.update({
                "X-Linked-Etag": f'"{stored.lfs_sha256}"', "X-Linked-Size": stored.size, "Location": location,
            })  # fmt: skip
            self._send(302, f"Found. Redirecting to {location}".encode(), headers, content_type="text/plain")
            return
        self._send_file(self.hub.store.read(stored), headers)


class _FakeHubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a client that keeps a connection open must not block shutdown

    def __init__(self, hub: "FakeHub", is_cdn: bool):
        super().__init__(("127.0.0.1", 0), _HubRequestHandler)
        self.hub = hub
        self.is_cdn = is_cdn


# --------------------------------------------------------------------------------------------------------------
# The fake Hub (two listeners: the Hub itself and its "CDN") and the pytest fixture
# --------------------------------------------------------------------------------------------------------------


class FakeHub:
    """A Hub on 127.0.0.1. Use as a context manager, or ``start()`` / ``stop()``.

    Inspect what the client did with :attr:`requests` (every request: method, path, status),
    :attr:`lfs_uploads` (sha256 of every LFS object PUT), :meth:`repo_files` and :meth:`commit_titles`.
    """

    def __init__(self, root: Optional[Path] = None, *, token: str = DEFAULT_TOKEN, username: str = DEFAULT_USERNAME,
                 orgs: Tuple[str, ...] = (), lfs_threshold: int = DEFAULT_LFS_THRESHOLD):  # fmt: skip
        self._tempdir = None if root is not None else tempfile.TemporaryDirectory(prefix="fake-hub-")
        self.store = RepoStore(Path(root) if root is not None else Path(self._tempdir.name))
        self.token, self.username, self.orgs = token, username, tuple(orgs)
        self.tokens: Dict[str, str] = {token: username}
        self.lfs_threshold = lfs_threshold
        self.requests: List[RecordedRequest] = []
        self.lfs_uploads: List[str] = []
        self._upload_tickets: Dict[str, Tuple[str, int]] = {}
        self._servers: List[_FakeHubHTTPServer] = []

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        self._api_server = _FakeHubHTTPServer(self, is_cdn=False)
        self._cdn_server = _FakeHubHTTPServer(self, is_cdn=True)
        self._servers = [self._api_server, self._cdn_server]
        for server in self._servers:
            # a short poll interval keeps stop() (which waits for the serve loop to notice) fast
            threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._api_server.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        # Another port = another origin for the client, like the Hub's CDN.
        return f"http://127.0.0.1:{self._cdn_server.server_address[1]}"

    # -- policy ---------------------------------------------------------------------------------------------
    def add_token(self, token: str, username: str) -> None:
        self.tokens[token] = username

    def goes_to_lfs(self, path: str, size: int, sample: bytes) -> bool:
        """The Hub's rule: LFS for the .gitattributes patterns, for big files and for binary content."""
        return path.endswith(LFS_SUFFIXES) or size > self.lfs_threshold or b"\0" in sample

    def issue_upload_ticket(self, sha256: str, size: int) -> str:
        ticket = secrets.token_hex(16)
        self._upload_tickets[ticket] = (sha256, size)
        return ticket

    def redeem_upload_ticket(self, ticket: str, sha256: str, size: int) -> bool:
        return self._upload_tickets.pop(ticket, None) == (sha256, size)

    # -- inspection -----------------------------------------------------------------------------------------
    def repo_files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        commit = self.store.get_commit(repo_id, revision)
        return {path: self.store.read(stored) for path, stored in commit.files.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main") -> List[str]:
        commit = self.store.get_commit(repo_id, revision)
        return sorted(path for path, stored in commit.files.items() if stored.is_lfs)

    def commit_titles(self, repo_id: str, branch: str = "main") -> List[str]:
        """Titles of the commits reachable from ``branch``, newest first (the last one is "initial commit")."""
        repo = self.store.get_repo(repo_id)
        titles, oid = [], repo.branches[branch]
        while oid is not None:
            titles.append(repo.commits[oid].title)
            oid = repo.commits[oid].parent
        return titles


def closed_port_endpoint() -> str:
    """An http endpoint on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def point_hub_client_at(endpoint: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make huggingface_hub (and transformers) talk to ``endpoint``, with caches and login under ``hf_home``.

    huggingface_hub reads its environment once, at import, into ``huggingface_hub.constants`` (and a few
    objects built from them), so setting the variables is not enough in a process that already imported it:
    the derived values are patched too. The variables are still set, for code that reads them late and for
    subprocesses. No token is left in the environment: tests pass one explicitly or set HF_TOKEN themselves.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    hub_cache, token_path = hf_home / "hub", hf_home / "token"
    environment = {
        "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"), "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(token_path), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }  # fmt: skip
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)

    derived = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache), "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"), "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"), "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        # Xet uploads would need a fake of Xet's storage service: use the classic LFS protocol instead.
        "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }  # fmt: skip
    for name, value in derived.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # The module-level HfApi behind huggingface_hub.create_repo() & co. copied the endpoint when it was built.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Origins whose redirects the client follows with the Authorization header (computed at import).
    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    try:  # transformers keeps one HfApi (built with the endpoint of its first use) for push_to_hub & co.
        import transformers.utils.hub as transformers_hub
    except ImportError:
        return
    monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)


@pytest.fixture
def fake_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh loopback Hub, with huggingface_hub/transformers pointed at it and an empty HF_HOME.

    ``fake_hub.endpoint`` / ``fake_hub.token`` (user ``fake_hub.username``) are what to push with.
    """
    import huggingface_hub

    root = tmp_path_factory.mktemp("fake_hub")
    hub = FakeHub(root / "storage").start()
    point_hub_client_at(hub.endpoint, root / "hf_home", monkeypatch)
    try:
        yield hub
    finally:
        hub.stop()
        huggingface_hub.close_session()  # drop pooled keep-alive connections to the stopped server


@contextlib.contextmanager
def echoing_error_server(status: int = 500) -> Iterator[str]:
    """An endpoint whose every answer is ``status`` with the request's headers (Authorization included) echoed in
    the JSON error body, as misconfigured proxies and debug builds of servers do. Yields its URL."""

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": f"internal error; request headers: {dict(self.headers)}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, format, *args):  # noqa: A002 - signature of the base class
            logger.debug("echo server: " + format, *args)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, args=(0.05,), name="echo-server", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
