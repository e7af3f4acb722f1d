"""A fake Hugging Face Hub on loopback, for testing downloads without the network.

It speaks just enough of the hub's file protocol for `huggingface_hub.hf_hub_download`:
HEAD and GET on `/{repo_id}/resolve/{revision}/{filename}`, answered with the headers
the client reads (X-Repo-Commit, ETag / X-Linked-Etag, Content-Length / X-Linked-Size)
and, for failures, the X-Error-Code / X-Error-Message the client maps to its
exceptions (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). No Xet headers
are ever sent, so the client downloads over plain HTTP.

Use the fixtures (import them into a test module: `from fakehub import fake_hub`):

    def test_download(fake_hub, tmp_path):
        (tmp_path / "model.safetensors").write_bytes(b"...")
        fake_hub.serve_repos({"facebook/deit-tiny-patch16-224": tmp_path})
        path = hf_hub_download("facebook/deit-tiny-patch16-224", "model.safetensors")
        assert fake_hub.count("GET") == 1

`hf_env` alone gives an isolated, empty cache (and no endpoint that answers);
`fake_hub` adds the server and points HF_ENDPOINT at it.

It also takes uploads, as `HfApi.create_repo`, `create_branch` and `upload_folder` (or
`create_commit`) make them: POST /api/repos/create, /api/models/{repo}/branch/{branch},
/api/models/{repo}/preupload/{revision} (every file "regular": its bytes travel in the
commit, so no LFS or Xet storage is needed) and /api/models/{repo}/commit/{revision} (an
ndjson of a header and the files). Writes need a token that `allow_writes` named (else
401, as the hub answers a missing or invalid token); each commit becomes a new revision
of the repo, served by the download endpoints like any other, and is recorded:

    fake_hub.allow_writes("hf_write")
    HfApi(token="hf_write").create_repo("me/model")
    HfApi(token="hf_write").upload_folder(repo_id="me/model", folder_path=folder)
    assert fake_hub.pushed[-1].files["config.json"] == (folder / "config.json").read_bytes()
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

# huggingface_hub reads these env vars once, at import, into huggingface_hub.constants.
_ENV_VARS = (
    "HF_ENDPOINT",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_XET_CACHE",
    "HF_HUB_DISABLE_XET",
)


@dataclass
class Repo:
    revisions: dict[str, Path]  # branch / tag name -> directory of files
    gated: bool = False
    private: bool = False
    token: str | None = None  # the token that unlocks a gated or private repo
    commits: dict[str, str] = field(default_factory=dict)  # revision name -> commit hash

    def resolve(self, revision: str) -> tuple[str, Path] | None:
        """(commit hash, directory) for a branch, a tag or a commit hash."""
        if revision in self.revisions:
            return self.commits[revision], self.revisions[revision]
        for name, commit in self.commits.items():
            if revision == commit:
                return commit, self.revisions[name]
        return None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Pushed:
    """One commit the fake hub received: where, its message, and every file it added."""

    repo_id: str
    revision: str
    commit: str
    summary: str
    description: str
    files: dict[str, bytes]  # path in the repo -> the bytes that arrived
    deleted: list[str] = field(default_factory=list)


class FakeHub:
    """An HTTP server serving model repos from local directories.

    `repos`: repo_id -> a directory (served as "main") or a dict revision -> directory.
    Every file under a directory is served (subfolders too). `requests` records what
    reached the server; `fail_with = 503` makes every request answer that status.
    """

    def __init__(self, repos: dict | None = None):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.fail_with: int | None = None
        self.write_tokens: set[str] = set()  # tokens that may create repos and commit
        self.licenses: set[str] | None = None  # the license ids a README.md may name (None: any)
        self.created: list[dict] = []  # the create_repo payloads that made a repo
        self.pushed: list[Pushed] = []  # the commits received, in order
        self._upload_root: Path | None = None
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for repo_id, spec in (repos or {}).items():
            self.add_repo(repo_id, spec)

    # --- repos ---

    def add_repo(
        self,
        repo_id: str,
        spec,
        *,
        gated: bool = False,
        private: bool = False,
        token: str | None = None,
    ) -> Repo:
        """Serve a repo. `spec`: a directory (branch "main") or {revision: directory}.
        A gated repo answers 401 (no token) or 403 (another token) with the GatedRepo
        error code, a private one 401 RepoNotFound; both are served when the request
        carries `token` (if given)."""
        revisions = (
            {"main": Path(spec)}
            if isinstance(spec, (str, os.PathLike))
            else {name: Path(path) for name, path in spec.items()}
        )
        commits = {name: hashlib.sha1(f"{repo_id}@{name}".encode()).hexdigest() for name in revisions}
        repo = Repo(revisions=revisions, gated=gated, private=private, token=token, commits=commits)
        self.repos[repo_id] = repo
        return repo

    def serve_repos(self, repos: dict) -> FakeHub:
        for repo_id, spec in repos.items():
            self.add_repo(repo_id, spec)
        return self

    def commit(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id].commits[revision]

    # --- uploads ---

    def allow_writes(self, *tokens: str) -> FakeHub:
        """Let requests bearing one of `tokens` create repos, branches and commits."""
        self.write_tokens.update(tokens)
        return self

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of a repo at a revision: path -> bytes."""
        root = self.repos[repo_id].revisions[revision]
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def _new_snapshot(self, repo_id: str, like: Path | None = None) -> Path:
        """A directory for a new revision of `repo_id` (a copy of `like`)."""
        if self._upload_root is None:
            self._upload_root = Path(tempfile.mkdtemp(prefix="fakehub-"))
        parent = self._upload_root / repo_id.replace("/", "--")
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=parent))
        if like is not None and like.is_dir():
            shutil.copytree(like, path, dirs_exist_ok=True)
        return path

    # --- requests ---

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if method is None or r.method == method)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    # --- environment (with the fixture's monkeypatch) ---

    monkeypatch: pytest.MonkeyPatch | None = None
    cache: Path | None = None  # the isolated hub cache (fixture)

    def set_offline(self, offline: bool = True) -> None:
        """HF_HUB_OFFLINE on or off for the rest of the test."""
        set_offline(self._mp(), offline)

    def fast_retries(self) -> None:
        """No backoff waits in huggingface_hub's retries (see `no_retry_sleep`)."""
        no_retry_sleep(self._mp())

    def _mp(self) -> pytest.MonkeyPatch:
        assert self.monkeypatch is not None, "only on the fake_hub fixture"
        return self.monkeypatch

    # --- server ---

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake hub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
        if self._upload_root is not None:
            shutil.rmtree(self._upload_root, ignore_errors=True)
            self._upload_root = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()

    def log_message(self, format, *args):  # quiet
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def do_POST(self):
        hub = self.fake_hub
        path = urlsplit(self.path).path
        hub._record(Request(self.command, path, dict(self.headers.items())))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if hub.fail_with is not None:
            return self._error(hub.fail_with, None, "fake hub failure")
        if path == "/api/validate-yaml":  # upload_folder asks before it uploads a README.md
            return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in hub.write_tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        token = auth[len("Bearer ") :]
        parts = [unquote(p) for p in path.lstrip("/").split("/")]
        if parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"), token)
        # /api/models/{org}/{name}/{preupload|commit|branch}/{revision...}
        if len(parts) < 6 or parts[:2] != ["api", "models"] or parts[4] not in ("preupload", "commit", "branch"):
            return self._error(404, None, "Not found")
        repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if action == "branch":
            return self._create_branch(repo, revision)
        if revision not in repo.revisions:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if action == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._json(200, {"files": modes, "commitOid": repo.commits[revision]})
        return self._commit(repo_id, repo, revision, body)

    def _validate_yaml(self, content: str) -> None:
        """What the hub checks of a README.md's front matter, in part: YAML, a mapping, and a
        model-index that huggingface_hub itself can read back."""
        import yaml
        from huggingface_hub.repocard_data import model_index_to_eval_results

        errors = []
        if content.startswith("---\n"):
            head, sep, _ = content[4:].partition("\n---\n")
            try:
                meta = yaml.safe_load(head) if sep else None
                if not isinstance(meta, dict):
                    errors.append("the front matter is not a YAML mapping")
                else:
                    if "model-index" in meta:
                        model_index_to_eval_results(meta["model-index"])
                    licenses = self.fake_hub.licenses
                    if licenses is not None and meta.get("license") not in licenses:
                        errors.append(f'"license" must be one of the Hub\'s license ids, not {meta.get("license")!r}')
            except Exception as e:  # noqa: BLE001 - any failure is the README's
                errors.append(f"{type(e).__name__}: {e}")
        if errors:
            return self._json(400, {"error": errors[0], "errors": [{"message": m} for m in errors], "warnings": []})
        return self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, payload: dict, token: str) -> None:
        hub = self.fake_hub
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        url = f"{hub.url}/{repo_id}"
        if repo_id in hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub.add_repo(repo_id, hub._new_snapshot(repo_id), private=private, token=token if private else None)
        hub.created.append(payload)
        return self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, repo: Repo, branch: str) -> None:
        if branch in repo.revisions:
            return self._json(409, {"error": f"Reference already exists: refs/heads/{branch}"})
        repo.revisions[branch] = repo.revisions["main"]
        repo.commits[branch] = repo.commits["main"]
        return self._json(200, {})

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
        hub = self.fake_hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), None)
        if header is None:
            return self._error(400, None, "The commit has no header")
        files, deleted = {}, []
        for item in lines:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key != "header":  # lfsFile, copies: never asked for (preupload says "regular")
                return self._error(400, None, f"The fake hub takes no {key!r} in a commit")
        root = hub._new_snapshot(repo_id, like=repo.revisions[revision])
        for name in deleted:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for name, data in files.items():
            target = (root / name).resolve()
            if ".." in name.split("/") or root.resolve() not in target.parents:
                return self._error(400, None, f"Bad path {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        with hub._lock:
            commit = hashlib.sha1(f"{repo_id}@{revision}#{len(hub.pushed)}".encode()).hexdigest()
            repo.revisions[revision], repo.commits[revision] = root, commit
            hub.pushed.append(
                Pushed(
                    repo_id, revision, commit, header.get("summary", ""), header.get("description", ""), files, deleted
                )
            )
        return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit}", "commitOid": commit})

    def _json(self, status: int, obj: dict) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status >= 400 and "error" in obj:
            self.send_header("X-Error-Message", obj["error"])
        self.end_headers()
        self.wfile.write(payload)

    def _answer(self, body: bool) -> None:
        hub = self.fake_hub
        path = urlsplit(self.path).path
        hub._record(Request(self.command, path, dict(self.headers.items())))
        if hub.fail_with is not None:
            return self._error(hub.fail_with, None, "fake hub failure")
        # /{org}/{name}/resolve/{revision}/{filename...}  (revision is URL-quoted, "/" too)
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, None, "Not found")
        repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
        revision = unquote(parts[3])
        filename = "/".join(unquote(p) for p in parts[4:])
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo.gated or repo.private:
            auth = self.headers.get("Authorization")
            if not (repo.token and auth == f"Bearer {repo.token}"):
                if repo.private:
                    return self._error(401, "RepoNotFound", "Repository not found")
                message = (
                    f"Access to model {repo_id} is restricted. You must have access to it"
                    " and be authenticated to access it. Please log in."
                )
                return self._error(401 if auth is None else 403, "GatedRepo", message)
        resolved = repo.resolve(revision)
        if resolved is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit, root = resolved
        file = (root / filename).resolve()
        if ".." in filename.split("/") or not file.is_file() or root.resolve() not in file.parents:
            return self._error(404, "EntryNotFound", f'{filename} does not exist on "{revision}"', commit=commit)
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


# --- environment -------------------------------------------------------------------------


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Make huggingface_hub talk to `url` (env var and the constants read at import)."""
    from huggingface_hub import constants

    url = url.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """HF_HUB_OFFLINE on or off (env var and constant)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries a failed metadata request 5 times with backoff (1+2+4+8+8 s)
    before giving up; make those waits instant (only huggingface_hub's, not time.sleep)."""
    import time

    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fast.sleep = lambda seconds: None
    monkeypatch.setattr(_http, "time", fast)
    monkeypatch.setattr(file_download, "time", fast)


def isolate_hf(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """An empty hub cache under `home`, no token, online, an endpoint that is not the
    real hub (nothing listens on it). Returns the hub cache directory."""
    from huggingface_hub import constants

    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name, value in {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "default_cache_path": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # Never the real hub, even if a test forgets to start the fake one: port 9 (discard)
    # on loopback refuses connections.
    point_hub_at(monkeypatch, "http://127.0.0.1:9")
    return cache


@pytest.fixture
def hf_env(monkeypatch, tmp_path_factory) -> Path:
    """An isolated huggingface_hub environment; the hub cache directory (empty)."""
    return isolate_hf(monkeypatch, tmp_path_factory.mktemp("hf_home"))


@pytest.fixture
def fake_hub(monkeypatch, hf_env):
    """A running FakeHub (no repos yet: `fake_hub.serve_repos({...})`), with
    huggingface_hub pointed at it and an isolated cache (`fake_hub.cache`)."""
    with FakeHub() as hub:
        point_hub_at(monkeypatch, hub.url)
        hub.cache = hf_env
        hub.monkeypatch = monkeypatch
        yield hub
