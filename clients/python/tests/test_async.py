"""The async client against the real binary and engine."""

from __future__ import annotations

import sandboxd_client as sc
from sandboxd_client import AsyncClient

from .conftest import Server


async def test_the_async_client_covers_the_same_ground(server: Server) -> None:
    async with AsyncClient(server.url, token=server.token, timeout=30) as client:
        assert (await client.health())["status"] == "ok"
        box = await client.sandbox(server.new_chat(), "agent", server.volume)
        assert (await box.commands.run("echo $((40+2))")).stdout == b"42\n"
        chunks = [i async for i in box.commands.stream(["echo", "streamed"])]
        assert isinstance(chunks[0], sc.Chunk) and chunks[0].data == b"streamed\n"
        await box.files.write("a.txt", b"bytes")
        assert await box.files.read("a.txt") == b"bytes"
        proc = await box.commands.start("echo bg; exit 5")
        info, out, _ = await proc.wait()
        assert (out, info.exit_code) == (b"bg\n", 5)
        term = await box.terminal(cols=70, rows=10)
        await term.send("stty size\n")
        await term.read_until("10 70")
        assert (await term.close())["reason"] == "closed"
        watch = box.files.watch()
        assert (await watch.__anext__()).type == "ready"
        await box.commands.run("touch seen")
        event = await watch.__anext__()
        assert event.path == "/workspace/chat/seen"
        await watch.aclose()
        slept = await client.hibernate(box.chat_id, wait=60)
        assert slept.phase == "hibernated"
        # A call on a hibernated sandbox resumes it first.
        assert (await box.commands.run("echo back")).stdout == b"back\n"
        assert (await box.kill()).result == "deleted"
        try:
            await client.get(box.chat_id)
        except sc.NotFound as e:
            assert e.status == 404
        else:
            raise AssertionError("still there")
