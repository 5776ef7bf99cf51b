"""The synchronous client: ``Client`` (one method per route) and the ``Sandbox`` object
(``commands``, ``files``, processes, a terminal) that most code uses."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Generator, List, Optional, TypeVar, Union

import httpx
from websockets.sync.client import ClientConnection, connect as ws_connect

from . import _ops as ops
from . import models as m
from .errors import SandboxdError, error_for, error_from

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8123"


class Client:
    """sandboxd's API. ``token`` goes in ``token_header`` (``security.api_token``)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: Optional[str] = None,
        *,
        token_header: str = "X-API-Token",
        timeout: float = 60.0,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_header = token_header
        self.timeout = timeout
        headers = {token_header: token} if token else {}
        self._http = http or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, op: ops.Op[T]) -> T:
        r = self._http.request(
            op.method,
            op.path,
            params=op.params,
            json=op.json,
            content=op.content,
            headers=op.headers,
            timeout=self.timeout + op.holds,
        )
        if r.status_code >= 400:
            raise error_for(r)
        return op.parse(r)

    def _lines(self, method: str, path: str, **kw: Any) -> Iterator[str]:
        with self._http.stream(method, path, timeout=httpx.Timeout(self.timeout, read=None), **kw) as r:
            if r.status_code >= 400:
                r.read()
                raise error_for(r)
            yield from r.iter_lines()

    # --- operations and the old contract -------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._run(ops.health())

    def ready(self) -> dict[str, Any]:
        """Readiness: raises ``Unavailable`` naming the failed check."""
        return self._run(ops.ready())

    def metrics(self) -> str:
        return self._run(ops.metrics())

    def openapi(self) -> dict[str, Any]:
        return self._run(ops.openapi())

    def create(self, chat_id: str, agent_id: str, volume_host_path: str, profile: Optional[str] = None) -> m.Session:
        """The old contract: the chat's live sandbox, started if needed (``SandboxConflict``
        when a live one has another agent or volume)."""
        return self._run(ops.create(chat_id, agent_id, volume_host_path, profile))

    def delete(self, chat_id: str) -> m.Deleted:
        """Removes the chat's sandbox; ``result`` is ``deleted`` or ``not_found``."""
        return self._run(ops.delete(chat_id))

    # --- the declarative API -------------------------------------------------------------

    def apply(
        self,
        chat_id: str,
        agent_id: str,
        volume_host_path: str,
        *,
        ttl_seconds: Optional[int] = None,
        profile: Optional[str] = None,
        state: Optional[str] = None,
        wait: Optional[float] = None,
    ) -> m.Applied:
        """Declares the chat's sandbox; with ``wait`` the answer comes once it converged."""
        return self._run(ops.apply(chat_id, agent_id, volume_host_path, ttl_seconds, profile, state, wait))

    def get(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return self._run(ops.get(chat_id, wait))

    def list(
        self,
        *,
        phase: Optional[str] = None,
        agent_id: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> m.Page:
        """One page; see ``iter_sandboxes`` for all of them."""
        return self._run(ops.list_page(phase, agent_id, limit, cursor))

    def iter_sandboxes(self, *, phase: Optional[str] = None, agent_id: Optional[str] = None) -> Iterator[m.SandboxView]:
        cursor: Optional[str] = None
        while True:
            page = self.list(phase=phase, agent_id=agent_id, cursor=cursor, limit=500)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def renew(self, chat_id: str, ttl_seconds: Optional[int] = None) -> m.SandboxView:
        return self._run(ops.renew(chat_id, ttl_seconds))

    def pause(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return self._run(ops.shortcut(chat_id, "pause", wait))

    def hibernate(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return self._run(ops.shortcut(chat_id, "hibernate", wait))

    def resume(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return self._run(ops.shortcut(chat_id, "resume", wait))

    def events(self, chat_id: str) -> List[m.Event]:
        """The chat's recent history, newest first."""
        return self._run(ops.events(chat_id))

    def watch(
        self,
        chat_id: Optional[str] = None,
        *,
        last_event_id: Optional[int] = None,
        reconnect: bool = True,
    ) -> Generator[m.Event, None, None]:
        """The change stream (every chat, or one). A dropped connection, or a ``resync``
        for a reader that fell behind, is resumed from the last id seen: no gap, no
        duplicate. Ends when sandboxd ends it and ``reconnect`` is false."""
        path = "/api/v1/sandboxes" + (f"/{ops.seg(chat_id)}" if chat_id else "")
        last = last_event_id
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            parser = ops.SseParser()
            try:
                for line in self._lines("GET", path, params={"watch": "true"}, headers=headers):
                    ev = parser.feed(line)
                    if ev is None:
                        continue
                    name, _, data = ev
                    if name == "change":
                        event = m.Event.from_json(data)
                        last = event.id
                        yield event
                    elif name == "resync":
                        last = int(data.get("last_event_id", last or 0))
                        break
            except httpx.TransportError:
                if not reconnect:
                    raise
                time.sleep(0.5)
            else:
                if not reconnect:
                    return

    # --- the data plane ------------------------------------------------------------------

    def exec(
        self,
        chat_id: str,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
        timeout: Optional[int] = None,
    ) -> m.CommandResult:
        return self._run(ops.exec_(chat_id, cmd, env, cwd, stdin, timeout, False))

    def exec_stream(
        self,
        chat_id: str,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
        timeout: Optional[int] = None,
    ) -> Generator[Union[m.Chunk, m.CommandResult], None, None]:
        """Output chunks as they come, then the result (its output fields empty). Leaving
        the loop early kills the command."""
        op = ops.exec_(chat_id, cmd, env, cwd, stdin, timeout, True)
        for line in self._lines(op.method, op.path, json=op.json):
            if line.strip():
                item = ops.exec_chunk(json.loads(line))
                if item is not None:
                    yield item

    def write_file(self, chat_id: str, path: str, data: Union[bytes, str], *, mode: Optional[int] = None) -> m.Written:
        raw = data.encode() if isinstance(data, str) else data
        return self._run(ops.write_file(chat_id, path, raw, mode))

    def read_file(self, chat_id: str, path: str) -> bytes:
        return self._run(ops.read_file(chat_id, path))

    def list_dir(self, chat_id: str, path: Optional[str] = None) -> List[m.DirEntry]:
        return self._run(ops.list_dir(chat_id, path))

    def watch_files(self, chat_id: str, path: Optional[str] = None, *, recursive: bool = False) -> Generator[m.FileEvent, None, None]:
        """File events under a path of the sandbox's mounts: first ``ready`` (its ``path`` the
        watched one) once the watch is armed, so what changes after it is seen; then each
        change, until ``resync`` (events were lost: the last one) or the end."""
        parser = ops.SseParser()
        params: dict[str, str] = {"recursive": "true" if recursive else "false"}
        if path is not None:
            params["path"] = path
        for line in self._lines("GET", f"/api/v1/sandboxes/{ops.seg(chat_id)}/files/watch", params=params):
            ev = parser.feed(line)
            if ev is None:
                continue
            event = ops.file_event(ev[0], ev[2])
            yield event
            if event.type == "resync":
                return

    def start_process(
        self,
        chat_id: str,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
    ) -> m.ProcessInfo:
        return self._run(ops.start_process(chat_id, cmd, env, cwd, stdin))

    def list_processes(self, chat_id: str) -> List[m.ProcessInfo]:
        return self._run(ops.list_processes(chat_id))

    def get_process(self, chat_id: str, process_id: str) -> m.ProcessInfo:
        return self._run(ops.get_process(chat_id, process_id))

    def kill_process(self, chat_id: str, process_id: str) -> m.ProcessInfo:
        return self._run(ops.kill_process(chat_id, process_id))

    def process_stdin(self, chat_id: str, process_id: str, data: Union[str, bytes], *, eof: bool = False) -> m.ProcessInfo:
        return self._run(ops.process_stdin(chat_id, process_id, data, eof))

    def signal_process(self, chat_id: str, process_id: str, signal: Union[str, int]) -> int:
        """Sends a signal to the process's whole tree; how many processes got it."""
        return self._run(ops.signal_process(chat_id, process_id, signal))

    def process_output(
        self, chat_id: str, process_id: str, *, since: int = 0, follow: bool = False
    ) -> Generator[m.OutputItem, None, None]:
        """The output from byte ``since``; with ``follow``, until the process ends. The last
        item is ``end``; a reader that was cut off goes on from the ``next`` it last saw."""
        params = {"since": str(since), "follow": "true" if follow else "false"}
        for line in self._lines("GET", ops.process_path(chat_id, process_id) + "/output", params=params):
            if line.strip():
                yield m.OutputItem.from_json(json.loads(line))

    def terminal(
        self,
        chat_id: str,
        *,
        cols: int = 80,
        rows: int = 24,
        command: Optional[str] = None,
        terminal_id: Optional[str] = None,
    ) -> "Terminal":
        """Opens (or, with ``terminal_id``, re-attaches to) a terminal over WebSocket."""
        params = {"cols": str(cols), "rows": str(rows)}
        if command is not None:
            params["command"] = command
        if terminal_id is not None:
            params = {"terminal_id": terminal_id}
        url = httpx.URL(self.base_url.replace("http", "ws", 1) + f"/api/v1/sandboxes/{ops.seg(chat_id)}/pty", params=params)
        headers = {self.token_header: self.token} if self.token else None
        try:
            socket = ws_connect(str(url), additional_headers=headers, open_timeout=self.timeout)
        except Exception as e:  # the HTTP answer before the upgrade
            raise _refused(e) from e
        return Terminal(socket)

    # --- chat storage --------------------------------------------------------------------

    def create_workspace(self, user_id: str, quota_bytes: Optional[int] = None) -> m.Workspace:
        return self._run(ops.create_workspace(user_id, quota_bytes))

    def list_workspaces(self, user_id: Optional[str] = None) -> List[m.Workspace]:
        return self._run(ops.list_workspaces(user_id))

    def get_workspace(self, workspace_id: str) -> m.Workspace:
        return self._run(ops.get_workspace(workspace_id))

    def set_quota(self, workspace_id: str, quota_bytes: int) -> m.Workspace:
        return self._run(ops.set_quota(workspace_id, quota_bytes))

    def create_chat(self, workspace_id: str, chat_id: Optional[str] = None) -> m.Chat:
        return self._run(ops.create_chat(workspace_id, chat_id))

    def list_chats(self, workspace_id: str) -> List[m.Chat]:
        return self._run(ops.list_chats(workspace_id))

    def get_chat(self, chat_id: str) -> m.Chat:
        return self._run(ops.get_chat(chat_id))

    def delete_chat(self, chat_id: str) -> None:
        self._run(ops.delete_chat(chat_id))

    def get_history(self, chat_id: str) -> str:
        return self._run(ops.get_history(chat_id))

    def put_history(self, chat_id: str, text: str) -> int:
        return self._run(ops.put_history(chat_id, text, append=False))

    def append_history(self, chat_id: str, text: str) -> int:
        return self._run(ops.put_history(chat_id, text, append=True))

    def put_attachment(
        self, chat_id: str, name: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> m.Attachment:
        return self._run(ops.put_attachment(chat_id, name, data, content_type))

    def get_attachment(self, chat_id: str, name: str) -> bytes:
        return self._run(ops.get_attachment(chat_id, name))

    def delete_attachment(self, chat_id: str, name: str) -> None:
        self._run(ops.delete_attachment(chat_id, name))

    def list_attachments(self, chat_id: str) -> List[m.Attachment]:
        return self._run(ops.list_attachments(chat_id))

    # --- the Sandbox object ----------------------------------------------------------------

    def sandbox(self, chat_id: str, agent_id: str, volume_host_path: str, profile: Optional[str] = None) -> "Sandbox":
        """The chat's sandbox, created (or reused) through the old contract."""
        session = self.create(chat_id, agent_id, volume_host_path, profile)
        return Sandbox(self, chat_id, session)

    def connect(self, chat_id: str) -> "Sandbox":
        """A handle on an existing sandbox."""
        return Sandbox(self, chat_id, None)


def _refused(e: Exception) -> SandboxdError:
    """A WebSocket upgrade the server answered with an HTTP error, as its typed error."""
    response = getattr(e, "response", None)
    status = int(getattr(response, "status_code", 0) or 0)
    body = getattr(response, "body", b"") or b""
    try:
        detail: Any = json.loads(body).get("detail", body.decode(errors="replace"))
    except Exception:
        detail = str(e)
    return error_from(status, detail) if status else SandboxdError(0, str(e))


class Terminal:
    """A terminal over WebSocket. ``recv`` gives output bytes, or a control message
    (``dict``: ``exit``, ``error``, ``dropped``, ``taken_over``)."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        ready = self._control()
        self.terminal_id: str = ready["terminal_id"]
        self.pid: Optional[int] = ready.get("pid")
        self.exit: Optional[dict[str, Any]] = None

    def _control(self) -> dict[str, Any]:
        while True:
            frame = self._socket.recv(timeout=30)
            if isinstance(frame, str):
                message: dict[str, Any] = json.loads(frame)
                return message

    def send(self, keys: Union[str, bytes]) -> None:
        self._socket.send(keys.encode() if isinstance(keys, str) else keys)

    def resize(self, cols: int, rows: int) -> None:
        self._socket.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def recv(self, timeout: Optional[float] = None) -> Union[bytes, dict[str, Any]]:
        frame = self._socket.recv(timeout=timeout)
        if isinstance(frame, bytes):
            return frame
        message: dict[str, Any] = json.loads(frame)
        if message.get("type") == "exit":
            self.exit = message
        return message

    def read_until(self, text: str, timeout: float = 30.0) -> str:
        """Output until it contains ``text``."""
        seen, deadline = "", time.monotonic() + timeout
        while text not in seen:
            frame = self.recv(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(frame, bytes):
                seen += frame.decode(errors="replace")
            elif frame.get("type") == "exit":
                raise SandboxdError(0, f"the terminal ended before {text!r}: {frame}")
        return seen

    def close(self) -> dict[str, Any]:
        """Closes the terminal (its process tree is killed); the ``exit`` message."""
        self._socket.send(json.dumps({"type": "close"}))
        while self.exit is None:
            self.recv(timeout=30)
        self._socket.close()
        return self.exit

    def detach(self) -> None:
        """Drops the socket only: the terminal waits to be re-attached by id."""
        self._socket.close()


class Process:
    """A background process of a sandbox."""

    def __init__(self, sandbox: "Sandbox", info: m.ProcessInfo) -> None:
        self.sandbox = sandbox
        self.info = info
        self.process_id = info.process_id

    @property
    def pid(self) -> Optional[int]:
        return self.info.pid

    def refresh(self) -> m.ProcessInfo:
        self.info = self.sandbox.client.get_process(self.sandbox.chat_id, self.process_id)
        return self.info

    def output(self, *, since: int = 0, follow: bool = True) -> Generator[m.OutputItem, None, None]:
        return self.sandbox.client.process_output(self.sandbox.chat_id, self.process_id, since=since, follow=follow)

    def wait(self) -> tuple[m.ProcessInfo, bytes, bytes]:
        """Follows the output to the end: the process as it ended, stdout and stderr (what
        the ring still held)."""
        out, err = bytearray(), bytearray()
        for item in self.output(follow=True):
            if item.type == "output":
                (out if item.stream == "stdout" else err).extend(item.data)
            elif item.type == "end" and item.process is not None:
                self.info = item.process
        return self.info, bytes(out), bytes(err)

    def send_stdin(self, data: Union[str, bytes], *, eof: bool = False) -> None:
        self.info = self.sandbox.client.process_stdin(self.sandbox.chat_id, self.process_id, data, eof=eof)

    def signal(self, signal: Union[str, int]) -> int:
        return self.sandbox.client.signal_process(self.sandbox.chat_id, self.process_id, signal)

    def kill(self) -> m.ProcessInfo:
        self.info = self.sandbox.client.kill_process(self.sandbox.chat_id, self.process_id)
        return self.info


class Commands:
    def __init__(self, sandbox: "Sandbox") -> None:
        self._s = sandbox

    def run(
        self,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
        timeout: Optional[int] = None,
    ) -> m.CommandResult:
        """Runs to the end (or ``timeout``: then it and every process it started are
        killed, exit code 124)."""
        return self._s.client.exec(self._s.chat_id, cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout)

    def stream(self, cmd: Union[str, List[str]], **kw: Any) -> Generator[Union[m.Chunk, m.CommandResult], None, None]:
        return self._s.client.exec_stream(self._s.chat_id, cmd, **kw)

    def start(
        self,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
    ) -> Process:
        """Starts a background process: it outlives this call and this client."""
        return Process(self._s, self._s.client.start_process(self._s.chat_id, cmd, env=env, cwd=cwd, stdin=stdin))

    def list(self) -> List[Process]:
        return [Process(self._s, p) for p in self._s.client.list_processes(self._s.chat_id)]

    def connect(self, process_id: str) -> Process:
        return Process(self._s, self._s.client.get_process(self._s.chat_id, process_id))


class Files:
    def __init__(self, sandbox: "Sandbox") -> None:
        self._s = sandbox

    def write(self, path: str, data: Union[bytes, str], *, mode: Optional[int] = None) -> m.Written:
        return self._s.client.write_file(self._s.chat_id, path, data, mode=mode)

    def read(self, path: str) -> bytes:
        return self._s.client.read_file(self._s.chat_id, path)

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def list(self, path: Optional[str] = None) -> List[m.DirEntry]:
        return self._s.client.list_dir(self._s.chat_id, path)

    def watch(self, path: Optional[str] = None, *, recursive: bool = False) -> Generator[m.FileEvent, None, None]:
        return self._s.client.watch_files(self._s.chat_id, path, recursive=recursive)


class Sandbox:
    """One chat's sandbox: ``commands``, ``files``, ``terminal()``, and its lifecycle."""

    def __init__(self, client: Client, chat_id: str, session: Optional[m.Session]) -> None:
        self.client = client
        self.chat_id = chat_id
        self.session = session
        self.commands = Commands(self)
        self.files = Files(self)

    @property
    def endpoint(self) -> Optional[m.Endpoint]:
        return self.session.endpoint if self.session else self.info().endpoint

    def info(self) -> m.SandboxView:
        return self.client.get(self.chat_id)

    def renew(self, ttl_seconds: Optional[int] = None) -> m.SandboxView:
        return self.client.renew(self.chat_id, ttl_seconds)

    def pause(self, wait: float = 60) -> m.SandboxView:
        return self.client.pause(self.chat_id, wait=wait)

    def hibernate(self, wait: float = 60) -> m.SandboxView:
        return self.client.hibernate(self.chat_id, wait=wait)

    def resume(self, wait: float = 60) -> m.SandboxView:
        return self.client.resume(self.chat_id, wait=wait)

    def terminal(self, *, cols: int = 80, rows: int = 24, command: Optional[str] = None) -> Terminal:
        return self.client.terminal(self.chat_id, cols=cols, rows=rows, command=command)

    def kill(self) -> m.Deleted:
        """Removes the sandbox (the old contract's delete)."""
        return self.client.delete(self.chat_id)
