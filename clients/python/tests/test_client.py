"""The sync client against the real binary and engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sandboxd_client as sc
from sandboxd_client import ROUTES, AsyncClient, Client

from .conftest import Server


@pytest.fixture()
def client(server: Server) -> Client:
    return Client(server.url, token=server.token, timeout=30)


def test_every_served_route_has_a_client_method(client: Client) -> None:
    doc = client.openapi()
    served = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    missing = served - set(ROUTES)
    assert not missing, f"routes without a client method: {sorted(missing)}"
    for name in ROUTES.values():
        assert callable(getattr(Client, name, None)), f"Client.{name}"
        assert callable(getattr(AsyncClient, name, None)), f"AsyncClient.{name}"


def test_the_readme_example_works_as_written(server: Server) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    # The project's README shows the same example.
    top = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    top_code = re.search(r"```python\n(.*?)```", top, re.S)
    assert top_code is not None and top_code.group(1) == code.group(1)
    lines = code.group(1).strip().splitlines()
    assert len(lines) <= 5, lines
    chat = server.new_chat()
    source = (
        code.group(1)
        .replace("http://127.0.0.1:8123", server.url)
        .replace('"s3cret"', repr(server.token))
        .replace("1b4e28ba-2fa1-11d2-883f-0016d3cca427", chat)
        .replace("/srv/volumes/v", server.volume)
    )
    printed: list[str] = []
    exec(compile(source, "README.md", "exec"), {"print": lambda *a: printed.append(" ".join(map(str, a)))})
    assert printed == ["hello from agent\n"]
    Client(server.url, token=server.token).delete(chat)


def test_the_old_contract_commands_and_files(server: Server, client: Client) -> None:
    chat = server.new_chat()
    box = client.sandbox(chat, "agent-a", server.volume)
    assert box.session is not None and box.session.status == "running"
    assert box.endpoint is not None and box.endpoint.port > 0
    # The live sandbox again while agent and volume match; another agent is a conflict.
    again = client.create(chat, "agent-a", server.volume)
    assert again.session_id == box.session.session_id
    with pytest.raises(sc.SandboxConflict) as conflict:
        client.create(chat, "agent-b", server.volume)
    assert conflict.value.status == 409 and conflict.value.detail == "sandbox_conflict"

    r = box.commands.run('echo "$AGENT_ID"; cat; echo oops >&2; exit 3', stdin="in\n", env={"X": "1"})
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"agent-a\nin\n", b"oops\n")
    assert box.commands.run(["sh", "-c", "printf '\\377'"]).stdout == b"\xff"
    assert box.commands.run("sleep 30", timeout=1).exit_code == 124
    items = list(box.commands.stream("echo one; echo two >&2"))
    chunks = [i for i in items if isinstance(i, sc.Chunk)]
    assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"one\n"
    assert isinstance(items[-1], sc.CommandResult) and items[-1].exit_code == 0

    written = box.files.write("dir/hello.txt", "hi", mode=0o600)
    assert written.bytes == 2 and written.mode == "0600"
    assert box.files.read_text("dir/hello.txt") == "hi"
    assert [e.name for e in box.files.list("dir")] == ["hello.txt"]
    with pytest.raises(sc.NotFound):
        box.files.read("dir/missing")
    with pytest.raises(sc.ValidationError) as bad:
        box.files.read("../../etc/passwd")
    assert bad.value.errors[0]["loc"] == ["query", "path"]

    assert box.kill().result == "deleted"
    assert client.delete(chat).result == "not_found"
    # A terminal refused before the upgrade is the same typed error.
    with pytest.raises(sc.NotFound) as gone:
        client.terminal(chat)
    assert gone.value.detail == "sandbox_not_found"
    with pytest.raises(sc.Unauthorized):
        Client(server.url, token="wrong").get(chat)


def test_declarative_state_hibernation_and_the_change_stream(server: Server, client: Client) -> None:
    chat = server.new_chat()
    applied = client.apply(chat, "agent", server.volume, ttl_seconds=600, wait=60)
    assert applied.outcome == "created" and applied.sandbox.phase == "running"
    assert client.get(chat).container_id == applied.sandbox.container_id
    assert chat in {s.chat_id for s in client.iter_sandboxes()}
    before = max(e.id for e in client.events(chat))
    assert client.pause(chat, wait=60).phase == "paused"
    assert client.resume(chat, wait=60).phase == "running"
    assert client.renew(chat, 900).chat_id == chat
    # The change stream from an id: what happened after it, in order, then live.
    seen = []
    for event in client.watch(chat, last_event_id=before):
        seen.append(event)
        if event.action == "resume":
            break
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids)) and ids[0] > before
    assert [e.action for e in seen if e.action in ("pause", "resume")] == ["pause", "resume"]
    # Resumed from the middle: exactly the rest.
    rest = []
    for event in client.watch(chat, last_event_id=ids[0]):
        rest.append(event.id)
        if event.id == ids[-1]:
            break
    assert rest == ids[1:]
    client.delete(chat)
    with pytest.raises(sc.NotFound):
        client.get(chat)


def test_processes_terminals_and_file_watch(server: Server, client: Client) -> None:
    box = client.sandbox(server.new_chat(), "agent", server.volume)
    proc = box.commands.start("i=0; while [ $i -lt 30 ]; do echo line$i; i=$((i+1)); sleep 0.02; done")
    assert proc.pid is not None
    # Read a little, leave, and come back from the offset reached: every line once.
    text, offset = b"", 0
    for item in proc.output(follow=True):
        if item.type == "output":
            text, offset = text + item.data, item.next
        if b"line3\n" in text:
            break
    for item in proc.output(since=offset, follow=True):
        if item.type == "output":
            text += item.data
    assert text == b"".join(b"line%d\n" % i for i in range(30))
    info, _, _ = proc.wait()
    assert (info.state, info.exit_code) == ("exited", 0)

    cat = box.commands.start(["cat"], stdin="a\n")
    cat.send_stdin(b"b\n", eof=True)
    info, out, _ = cat.wait()
    assert out == b"a\nb\n" and info.exit_code == 0
    sleeper = box.commands.start("trap '' TERM; sleep 100")
    assert sleeper.signal("TERM") >= 1
    assert sleeper.kill().state == "killed"
    assert {p.process_id for p in box.commands.list()} >= {proc.process_id, sleeper.process_id}
    with pytest.raises(sc.Conflict):
        sleeper.signal("INT")

    term = box.terminal(cols=90, rows=20)
    term.send("stty size\n")
    term.read_until("20 90")
    term.resize(100, 30)
    term.send("stty size\n")
    term.read_until("30 100")
    assert term.close()["reason"] == "closed"

    events = box.files.watch(recursive=True)
    ready = next(events)
    assert ready.type == "ready" and ready.path == "/workspace/chat"
    box.commands.run("touch watched.txt")
    created = next(events)
    assert (created.type, created.path) == ("create", "/workspace/chat/watched.txt")
    events.close()
    box.kill()


def test_chat_storage(server: Server, client: Client) -> None:
    ws = client.create_workspace("user-" + server.new_chat(), quota_bytes=4 << 20)
    assert client.get_workspace(ws.workspace_id).quota_bytes == 4 << 20
    chat = client.create_chat(ws.workspace_id)
    assert [c.chat_id for c in client.list_chats(ws.workspace_id)] == [chat.chat_id]
    client.put_history(chat.chat_id, "# hi\n")
    client.append_history(chat.chat_id, "more\n")
    assert client.get_history(chat.chat_id) == "# hi\nmore\n"
    att = client.put_attachment(chat.chat_id, "notes.txt", b"abc", "text/plain")
    assert att.size_bytes == 3
    assert client.get_attachment(chat.chat_id, "notes.txt") == b"abc"
    assert [a.name for a in client.list_attachments(chat.chat_id)] == ["notes.txt"]
    with pytest.raises(sc.PayloadTooLarge):
        client.put_attachment(chat.chat_id, "big.bin", b"x" * (5 << 20))
    client.delete_attachment(chat.chat_id, "notes.txt")
    with pytest.raises(sc.ValidationError):
        client.put_attachment(chat.chat_id, "history.md", b"no")
    client.delete_chat(chat.chat_id)
    with pytest.raises(sc.NotFound):
        client.get_chat(chat.chat_id)
