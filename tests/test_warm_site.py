"""The warm site (issue: deployment as fast as simulation): its local channel and its forwarder.

A real site process (``python -m fedspecialists.site.warm``) serves real ClientApp messages of a
tiny FL-TAC run; each test stops the processes it started by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import app
from fedspecialists.config import AdapterRunConfig, load_config_as
from fedspecialists.models.lora import initial_adapter
from fedspecialists.protocol.fltac import Instruction
from fedspecialists.protocol.packing import unpack_content
from fedspecialists.protocol.records import record_to_numpy, state_to_record
from fedspecialists.site.channel import (
    ChannelRefusedError,
    admit,
    call,
    listen,
    pack,
    proof,
    read_secret,
    recv_frame,
    send_frame,
    serve_one,
    unpack,
    write_secret,
)
from fedspecialists.site.warm import (
    SECRET_KEY,
    SOCKET_KEY,
    decode_response,
    encode_error,
    healthy,
)

OVERRIDES = "model=tiny_bert suite=tiny_text federation.num_clients=3 train.num_threads=1"


# -- the channel ----------------------------------------------------------------------------------
def test_pack_and_unpack_are_inverse_and_refuse_truncation() -> None:
    parts = [b"", b"a", bytes(range(256)) * 3]
    assert unpack(pack(parts)) == parts
    assert pack([b"ab"]) == b"\x00\x00\x00\x02ab"  # a 4-byte big-endian length, then the bytes
    with pytest.raises(ValueError, match="truncated"):
        unpack(pack([b"abc"])[:-1])


def test_the_secret_file_is_the_owners_only(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "s" / "secret")
    assert len(secret) == 32 and read_secret(tmp_path / "s" / "secret") == secret
    assert (tmp_path / "s" / "secret").stat().st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "s" / "secret", 0o640)
    with pytest.raises(PermissionError, match="readable by other users"):
        read_secret(tmp_path / "s" / "secret")


def _site_thread(path: Path, secret: bytes, count: int) -> tuple[threading.Thread, list[object]]:
    """``count`` connections served in a thread; what each returned is collected."""
    server = listen(path)
    results: list[object] = []

    def run() -> None:
        with server:
            for _ in range(count):
                results.append(serve_one(server, secret, lambda request: request[::-1]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


def test_the_channel_answers_its_secret_holder_and_refuses_a_wrong_secret(tmp_path: Path) -> None:
    path, secret = tmp_path / "site" / "sock", os.urandom(32)
    thread, results = _site_thread(path, secret, 2)
    assert (path.parent.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o600)
    assert call(path, secret, b"abc", timeout=10) == b"cba"
    with pytest.raises(ChannelRefusedError, match="wrong secret"):
        call(path, os.urandom(32), b"abc", timeout=10)
    thread.join(10)
    assert results == [None, "wrong secret"]


def test_the_socket_goes_only_into_a_folder_of_its_owners(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        listen(shared / "sock")
    assert shared.stat().st_mode & 0o777 == 0o755  # left as it was


def test_a_peer_of_another_user_is_refused() -> None:
    """The kernel's peer credentials: a peer whose user id is not the site's is refused even
    with the right secret (the test plays a site expecting another user)."""
    site, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    secret = os.urandom(32)
    with site, peer:
        answered = threading.Thread(
            target=lambda: send_frame(peer, proof(secret, recv_frame(peer))), daemon=True
        )
        answered.start()
        reason = admit(site, secret, uid=os.getuid() + 1)
        answered.join(10)
        assert reason == f"peer user {os.getuid()} is not the site's user {os.getuid() + 1}"
        assert recv_frame(peer) == f"refused: {reason}".encode()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_another_user_cannot_even_connect(tmp_path: Path) -> None:
    path = tmp_path / "site" / "sock"
    server = listen(path)
    with server:
        child = os.fork()
        if child == 0:  # the other user: nobody
            try:
                os.setuid(65534)
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(str(path))
                os._exit(0)
            except PermissionError:
                os._exit(13)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 13  # EACCES: the folder is the site's only


# -- the forwarder and a real site ---------------------------------------------------------------
def _context(node_config: dict[str, object] | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3, **(node_config or {})},  # type: ignore[dict-item]
        state=RecordDict(),
        run_config={"overrides": OVERRIDES},
    )


def _train_message(overrides: str = OVERRIDES) -> Message:
    cfg = load_config_as(AdapterRunConfig, overrides)
    v0 = {k: v.numpy() for k, v in initial_adapter(cfg, 5).items()}
    instruction = Instruction(server_round=1, globals={"v0": state_to_record(v0)})
    return Message(content=instruction.to_record(), dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A warm site process; stopped by PID at the end."""
    path, secret = tmp_path / "site" / "sock", tmp_path / "site.secret"
    command = [sys.executable, "-m", "fedspecialists.site.warm", "--socket", str(path)]
    with (tmp_path / "site.log").open("wb") as log:
        process = subprocess.Popen(
            [*command, "--secret-file", str(secret)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert path.exists(), "the warm site did not start"
    assert healthy(path, secret)
    yield path, secret, process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def _arrays(reply: Message) -> dict[str, dict[str, np.ndarray]]:
    content = unpack_content(reply.content)  # the app packs its replies (federation.pack_arrays)
    return {name: record_to_numpy(r) for name, r in content.array_records.items()}


def test_forwarded_messages_get_the_replies_of_the_in_process_path(
    site: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    """Same message, same seed: the site's reply is the in-process one, bit for bit, and the
    context's state comes back as the in-process handler left it."""
    path, secret, _ = site
    here_context = _context()
    here = app(_train_message(), here_context)
    warm_context = _context({SOCKET_KEY: str(path), SECRET_KEY: str(secret)})
    for _ in range(2):  # the second message finds everything loaded
        started = time.time()
        warm = app(_train_message(), warm_context)
        seconds = time.time() - started
    assert not warm.has_error() and warm.metadata.message_type == MessageType.TRAIN
    assert warm.content.config_records.keys() == here.content.config_records.keys()
    metrics = [{k: dict(v) for k, v in r.content.metric_records.items()} for r in (warm, here)]
    assert metrics[0] == metrics[1]
    a, b = _arrays(warm), _arrays(here)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key])
    assert warm_context.state.keys() == here_context.state.keys()
    assert seconds < 60
    # The site did the work (a site that did not listen would have left it to this process).
    assert (path.parent.parent / "site.log").read_text().count("train of run 1 in") == 2


def test_without_a_site_listening_the_clientapp_does_the_work(tmp_path: Path) -> None:
    context = _context({SOCKET_KEY: str(tmp_path / "nobody" / "sock")})
    reply = app(Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context)
    assert not reply.has_error()


def test_a_site_killed_mid_message_fails_that_message_and_applies_nothing(
    site: tuple[Path, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, secret, process = site
    hang = f"{OVERRIDES} faults.kind=hang faults.fraction=1.0 federation.reply_timeout_s=60"
    context = _context({SOCKET_KEY: str(path), SECRET_KEY: str(secret)})
    context.run_config = {"overrides": hang}
    context.state["kept"] = ConfigRecord({"rounds": 1})
    before = {k: dict(v) for k, v in context.state.items()}
    killer = threading.Timer(3.0, lambda: os.killpg(process.pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(RuntimeError, match="failed mid-message"):
        app(_train_message(hang), context)
    killer.join()
    assert {k: dict(v) for k, v in context.state.items()} == before
    # With the site gone (its socket left behind), the next message is done here, cold.
    assert process.wait(10) == -signal.SIGKILL
    assert not healthy(path, secret)
    reply = app(Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context)
    assert not reply.has_error()


def test_a_clientapp_with_the_wrong_secret_is_told_so(tmp_path: Path) -> None:
    path = tmp_path / "site" / "sock"
    thread, results = _site_thread(path, os.urandom(32), 1)
    write_secret(tmp_path / "other.secret")
    context = _context({SOCKET_KEY: str(path), SECRET_KEY: str(tmp_path / "other.secret")})
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    with pytest.raises(RuntimeError, match="refused this ClientApp: refused: wrong secret"):
        app(query, context)
    thread.join(10)
    assert results == ["wrong secret"]


def test_the_sites_errors_and_malformed_responses_are_raised_here() -> None:
    with pytest.raises(RuntimeError, match="on the warm site: ValueError: bad"):
        decode_response(encode_error("ValueError: bad"))
    with pytest.raises(RuntimeError, match="malformed"):
        decode_response(pack([b"reply"]))
