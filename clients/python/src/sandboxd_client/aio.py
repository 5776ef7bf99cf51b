"""The asynchronous client: the same methods as ``Client`` (awaitable, async iterators for
streams), and ``AsyncSandbox``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, AsyncGenerator, List, Optional, TypeVar, Union

import httpx
from websockets.asyncio.client import ClientConnection, connect as ws_connect

from . import _ops as ops
from . import models as m
from .client import DEFAULT_URL, _refused
from .errors import SandboxdError, error_for

T = TypeVar("T")


class AsyncClient:
    """sandboxd's API, async (httpx). Method for method as ``Client``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: Optional[str] = None,
        *,
        token_header: str = "X-API-Token",
        timeout: float = 60.0,
        http: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_header = token_header
        self.timeout = timeout
        headers = {token_header: token} if token else {}
        self._http = http or httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _run(self, op: ops.Op[T]) -> T:
        r = await self._http.request(
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

    async def _lines(self, method: str, path: str, **kw: Any) -> AsyncIterator[str]:
        async with self._http.stream(method, path, timeout=httpx.Timeout(self.timeout, read=None), **kw) as r:
            if r.status_code >= 400:
                await r.aread()
                raise error_for(r)
            async for line in r.aiter_lines():
                yield line

    async def health(self) -> dict[str, Any]:
        return await self._run(ops.health())

    async def ready(self) -> dict[str, Any]:
        return await self._run(ops.ready())

    async def metrics(self) -> str:
        return await self._run(ops.metrics())

    async def openapi(self) -> dict[str, Any]:
        return await self._run(ops.openapi())

    async def create(self, chat_id: str, agent_id: str, volume_host_path: str, profile: Optional[str] = None) -> m.Session:
        return await self._run(ops.create(chat_id, agent_id, volume_host_path, profile))

    async def delete(self, chat_id: str) -> m.Deleted:
        return await self._run(ops.delete(chat_id))

    async def apply(
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
        return await self._run(ops.apply(chat_id, agent_id, volume_host_path, ttl_seconds, profile, state, wait))

    async def get(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return await self._run(ops.get(chat_id, wait))

    async def list(
        self,
        *,
        phase: Optional[str] = None,
        agent_id: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> m.Page:
        return await self._run(ops.list_page(phase, agent_id, limit, cursor))

    async def iter_sandboxes(
        self, *, phase: Optional[str] = None, agent_id: Optional[str] = None
    ) -> AsyncGenerator[m.SandboxView, None]:
        cursor: Optional[str] = None
        while True:
            page = await self.list(phase=phase, agent_id=agent_id, cursor=cursor, limit=500)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def renew(self, chat_id: str, ttl_seconds: Optional[int] = None) -> m.SandboxView:
        return await self._run(ops.renew(chat_id, ttl_seconds))

    async def pause(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return await self._run(ops.shortcut(chat_id, "pause", wait))

    async def hibernate(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return await self._run(ops.shortcut(chat_id, "hibernate", wait))

    async def resume(self, chat_id: str, *, wait: Optional[float] = None) -> m.SandboxView:
        return await self._run(ops.shortcut(chat_id, "resume", wait))

    async def events(self, chat_id: str) -> List[m.Event]:
        return await self._run(ops.events(chat_id))

    async def watch(
        self, chat_id: Optional[str] = None, *, last_event_id: Optional[int] = None, reconnect: bool = True
    ) -> AsyncGenerator[m.Event, None]:
        """The change stream, resumed from the last id seen (see ``Client.watch``)."""
        path = "/api/v1/sandboxes" + (f"/{ops.seg(chat_id)}" if chat_id else "")
        last = last_event_id
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            parser = ops.SseParser()
            try:
                async for line in self._lines("GET", path, params={"watch": "true"}, headers=headers):
                    ev = parser.feed(line)
                    if ev is None:
                        continue
                    if ev[0] == "change":
                        event = m.Event.from_json(ev[2])
                        last = event.id
                        yield event
                    elif ev[0] == "resync":
                        last = int(ev[2].get("last_event_id", last or 0))
                        break
            except httpx.TransportError:
                if not reconnect:
                    raise
                await asyncio.sleep(0.5)
            else:
                if not reconnect:
                    return

    async def exec(
        self,
        chat_id: str,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
        timeout: Optional[int] = None,
    ) -> m.CommandResult:
        return await self._run(ops.exec_(chat_id, cmd, env, cwd, stdin, timeout, False))

    async def exec_stream(
        self,
        chat_id: str,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
        timeout: Optional[int] = None,
    ) -> AsyncGenerator[Union[m.Chunk, m.CommandResult], None]:
        op = ops.exec_(chat_id, cmd, env, cwd, stdin, timeout, True)
        async for line in self._lines(op.method, op.path, json=op.json):
            if line.strip():
                item = ops.exec_chunk(json.loads(line))
                if item is not None:
                    yield item

    async def write_file(self, chat_id: str, path: str, data: Union[bytes, str], *, mode: Optional[int] = None) -> m.Written:
        raw = data.encode() if isinstance(data, str) else data
        return await self._run(ops.write_file(chat_id, path, raw, mode))

    async def read_file(self, chat_id: str, path: str) -> bytes:
        return await self._run(ops.read_file(chat_id, path))

    async def list_dir(self, chat_id: str, path: Optional[str] = None) -> List[m.DirEntry]:
        return await self._run(ops.list_dir(chat_id, path))

    async def watch_files(
        self, chat_id: str, path: Optional[str] = None, *, recursive: bool = False
    ) -> AsyncGenerator[m.FileEvent, None]:
        parser = ops.SseParser()
        params: dict[str, str] = {"recursive": "true" if recursive else "false"}
        if path is not None:
            params["path"] = path
        async for line in self._lines("GET", f"/api/v1/sandboxes/{ops.seg(chat_id)}/files/watch", params=params):
            ev = parser.feed(line)
            if ev is None:
                continue
            event = ops.file_event(ev[0], ev[2])
            yield event
            if event.type == "resync":
                return

    async def start_process(
        self,
        chat_id: str,
        cmd: Union[str, List[str]],
        *,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[None, str, bytes] = None,
    ) -> m.ProcessInfo:
        return await self._run(ops.start_process(chat_id, cmd, env, cwd, stdin))

    async def list_processes(self, chat_id: str) -> List[m.ProcessInfo]:
        return await self._run(ops.list_processes(chat_id))

    async def get_process(self, chat_id: str, process_id: str) -> m.ProcessInfo:
        return await self._run(ops.get_process(chat_id, process_id))

    async def kill_process(self, chat_id: str, process_id: str) -> m.ProcessInfo:
        return await self._run(ops.kill_process(chat_id, process_id))

    async def process_stdin(
        self, chat_id: str, process_id: str, data: Union[str, bytes], *, eof: bool = False
    ) -> m.ProcessInfo:
        return await self._run(ops.process_stdin(chat_id, process_id, data, eof))

    async def signal_process(self, chat_id: str, process_id: str, signal: Union[str, int]) -> int:
        return await self._run(ops.signal_process(chat_id, process_id, signal))

    async def process_output(
        self, chat_id: str, process_id: str, *, since: int = 0, follow: bool = False
    ) -> AsyncGenerator[m.OutputItem, None]:
        params = {"since": str(since), "follow": "true" if follow else "false"}
        async for line in self._lines("GET", ops.process_path(chat_id, process_id) + "/output", params=params):
            if line.strip():
                yield m.OutputItem.from_json(json.loads(line))

    async def terminal(
        self,
        chat_id: str,
        *,
        cols: int = 80,
        rows: int = 24,
        command: Optional[str] = None,
        terminal_id: Optional[str] = None,
    ) -> "AsyncTerminal":
        params = {"cols": str(cols), "rows": str(rows)}
        if command is not None:
            params["command"] = command
        if terminal_id is not None:
            params = {"terminal_id": terminal_id}
        url = httpx.URL(self.base_url.replace("http", "ws", 1) + f"/api/v1/sandboxes/{ops.seg(chat_id)}/pty", params=params)
        headers = {self.token_header: self.token} if self.token else None
        try:
            socket = await ws_connect(str(url), additional_headers=headers, open_timeout=self.timeout)
        except Exception as e:  # the HTTP answer before the upgrade
            raise _refused(e) from e
        return await AsyncTerminal.ready(socket)

    async def create_workspace(self, user_id: str, quota_bytes: Optional[int] = None) -> m.Workspace:
        return await self._run(ops.create_workspace(user_id, quota_bytes))

    async def list_workspaces(self, user_id: Optional[str] = None) -> List[m.Workspace]:
        return await self._run(ops.list_workspaces(user_id))

    async def get_workspace(self, workspace_id: str) -> m.Workspace:
        return await self._run(ops.get_workspace(workspace_id))

    async def set_quota(self, workspace_id: str, quota_bytes: int) -> m.Workspace:
        return await self._run(ops.set_quota(workspace_id, quota_bytes))

    async def create_chat(self, workspace_id: str, chat_id: Optional[str] = None) -> m.Chat:
        return await self._run(ops.create_chat(workspace_id, chat_id))

    async def list_chats(self, workspace_id: str) -> List[m.Chat]:
        return await self._run(ops.list_chats(workspace_id))

    async def get_chat(self, chat_id: str) -> m.Chat:
        return await self._run(ops.get_chat(chat_id))

    async def delete_chat(self, chat_id: str) -> None:
        await self._run(ops.delete_chat(chat_id))

    async def get_history(self, chat_id: str) -> str:
        return await self._run(ops.get_history(chat_id))

    async def put_history(self, chat_id: str, text: str) -> int:
        return await self._run(ops.put_history(chat_id, text, append=False))

    async def append_history(self, chat_id: str, text: str) -> int:
        return await self._run(ops.put_history(chat_id, text, append=True))

    async def put_attachment(
        self, chat_id: str, name: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> m.Attachment:
        return await self._run(ops.put_attachment(chat_id, name, data, content_type))

    async def get_attachment(self, chat_id: str, name: str) -> bytes:
        return await self._run(ops.get_attachment(chat_id, name))

    async def delete_attachment(self, chat_id: str, name: str) -> None:
        await self._run(ops.delete_attachment(chat_id, name))

    async def list_attachments(self, chat_id: str) -> List[m.Attachment]:
        return await self._run(ops.list_attachments(chat_id))

    async def sandbox(self, chat_id: str, agent_id: str, volume_host_path: str, profile: Optional[str] = None) -> "AsyncSandbox":
        session = await self.create(chat_id, agent_id, volume_host_path, profile)
        return AsyncSandbox(self, chat_id, session)


class AsyncTerminal:
    """A terminal over WebSocket (see ``Terminal``)."""

    def __init__(self, socket: ClientConnection, ready: dict[str, Any]) -> None:
        self._socket = socket
        self.terminal_id: str = ready["terminal_id"]
        self.pid: Optional[int] = ready.get("pid")
        self.exit: Optional[dict[str, Any]] = None

    @classmethod
    async def ready(cls, socket: ClientConnection) -> "AsyncTerminal":
        while True:
            frame = await asyncio.wait_for(socket.recv(), 30)
            if isinstance(frame, str):
                return cls(socket, json.loads(frame))

    async def send(self, keys: Union[str, bytes]) -> None:
        await self._socket.send(keys.encode() if isinstance(keys, str) else keys)

    async def resize(self, cols: int, rows: int) -> None:
        await self._socket.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def recv(self) -> Union[bytes, dict[str, Any]]:
        frame = await self._socket.recv()
        if isinstance(frame, bytes):
            return frame
        message: dict[str, Any] = json.loads(frame)
        if message.get("type") == "exit":
            self.exit = message
        return message

    async def read_until(self, text: str, timeout: float = 30.0) -> str:
        async def read() -> str:
            seen = ""
            while text not in seen:
                frame = await self.recv()
                if isinstance(frame, bytes):
                    seen += frame.decode(errors="replace")
                elif frame.get("type") == "exit":
                    raise SandboxdError(0, f"the terminal ended before {text!r}: {frame}")
            return seen

        return await asyncio.wait_for(read(), timeout)

    async def close(self) -> dict[str, Any]:
        await self._socket.send(json.dumps({"type": "close"}))
        while self.exit is None:
            await asyncio.wait_for(self.recv(), 30)
        await self._socket.close()
        return self.exit


class AsyncProcess:
    def __init__(self, sandbox: "AsyncSandbox", info: m.ProcessInfo) -> None:
        self.sandbox = sandbox
        self.info = info
        self.process_id = info.process_id

    def output(self, *, since: int = 0, follow: bool = True) -> AsyncGenerator[m.OutputItem, None]:
        return self.sandbox.client.process_output(self.sandbox.chat_id, self.process_id, since=since, follow=follow)

    async def wait(self) -> tuple[m.ProcessInfo, bytes, bytes]:
        out, err = bytearray(), bytearray()
        async for item in self.output(follow=True):
            if item.type == "output":
                (out if item.stream == "stdout" else err).extend(item.data)
            elif item.type == "end" and item.process is not None:
                self.info = item.process
        return self.info, bytes(out), bytes(err)

    async def send_stdin(self, data: Union[str, bytes], *, eof: bool = False) -> None:
        self.info = await self.sandbox.client.process_stdin(self.sandbox.chat_id, self.process_id, data, eof=eof)

    async def signal(self, signal: Union[str, int]) -> int:
        return await self.sandbox.client.signal_process(self.sandbox.chat_id, self.process_id, signal)

    async def kill(self) -> m.ProcessInfo:
        self.info = await self.sandbox.client.kill_process(self.sandbox.chat_id, self.process_id)
        return self.info


class AsyncCommands:
    def __init__(self, sandbox: "AsyncSandbox") -> None:
        self._s = sandbox

    async def run(self, cmd: Union[str, List[str]], **kw: Any) -> m.CommandResult:
        return await self._s.client.exec(self._s.chat_id, cmd, **kw)

    def stream(self, cmd: Union[str, List[str]], **kw: Any) -> AsyncGenerator[Union[m.Chunk, m.CommandResult], None]:
        return self._s.client.exec_stream(self._s.chat_id, cmd, **kw)

    async def start(self, cmd: Union[str, List[str]], **kw: Any) -> AsyncProcess:
        return AsyncProcess(self._s, await self._s.client.start_process(self._s.chat_id, cmd, **kw))

    async def list(self) -> List[AsyncProcess]:
        return [AsyncProcess(self._s, p) for p in await self._s.client.list_processes(self._s.chat_id)]


class AsyncFiles:
    def __init__(self, sandbox: "AsyncSandbox") -> None:
        self._s = sandbox

    async def write(self, path: str, data: Union[bytes, str], *, mode: Optional[int] = None) -> m.Written:
        return await self._s.client.write_file(self._s.chat_id, path, data, mode=mode)

    async def read(self, path: str) -> bytes:
        return await self._s.client.read_file(self._s.chat_id, path)

    async def list(self, path: Optional[str] = None) -> List[m.DirEntry]:
        return await self._s.client.list_dir(self._s.chat_id, path)

    def watch(self, path: Optional[str] = None, *, recursive: bool = False) -> AsyncGenerator[m.FileEvent, None]:
        return self._s.client.watch_files(self._s.chat_id, path, recursive=recursive)


class AsyncSandbox:
    def __init__(self, client: AsyncClient, chat_id: str, session: Optional[m.Session]) -> None:
        self.client = client
        self.chat_id = chat_id
        self.session = session
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)

    async def info(self) -> m.SandboxView:
        return await self.client.get(self.chat_id)

    async def renew(self, ttl_seconds: Optional[int] = None) -> m.SandboxView:
        return await self.client.renew(self.chat_id, ttl_seconds)

    async def pause(self, wait: float = 60) -> m.SandboxView:
        return await self.client.pause(self.chat_id, wait=wait)

    async def hibernate(self, wait: float = 60) -> m.SandboxView:
        return await self.client.hibernate(self.chat_id, wait=wait)

    async def resume(self, wait: float = 60) -> m.SandboxView:
        return await self.client.resume(self.chat_id, wait=wait)

    async def terminal(self, *, cols: int = 80, rows: int = 24, command: Optional[str] = None) -> AsyncTerminal:
        return await self.client.terminal(self.chat_id, cols=cols, rows=rows, command=command)

    async def kill(self) -> m.Deleted:
        return await self.client.delete(self.chat_id)
