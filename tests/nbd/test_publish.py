"""Host-side units for issue 7's NBD pieces: tuning options kept in OCI records, the status
statistics document (publish.py) and its summary."""

from __future__ import annotations

import os

import trio

from erofs_mount.backends.nbd import publish, state
from erofs_mount.backends.nbd.recovery import OciLayerRecord, format_record, parse_record
from erofs_mount.backends.nbd.source import oci_options_from_record, pinned_record, record_for_oci
from erofs_mount.sources.oci.options import OciOptions

DIGEST = "sha256:" + "cd" * 32
OTHER = "sha256:" + "ef" * 32


def test_tuning_options_survive_the_record_only_when_not_default():
    rec = record_for_oci("reg/app:v1", "linux/amd64", DIGEST, OciOptions(retries=20, retry_time=90.0, insecure=True))
    text = format_record(rec)
    assert "retries=20" in text and "retry_time=90.0" in text and "timeout" not in text
    back = oci_options_from_record(parse_record(text))
    assert (back.retries, back.retry_time, back.timeout) == (20, 90.0, OciOptions().timeout)


class FakeOci:  # a stand-in source: only the attributes publish reads
    ref, platform, digest, manifest_digest = "reg/app:v1@" + OTHER, "linux/amd64", DIGEST, OTHER

    def __init__(self, **counters):
        self.counters = counters

    def stats(self):
        return {"bytes_fetched": 0, "retries": 0, "cache_hits": 0, "cache_misses": 0, "disk_hits": 0,
                **self.counters}


def test_layer_record_pinned_keeps_credentials_and_options():
    rec = OciLayerRecord("reg/app:v1", "linux/amd64", 0, "alice", "pw", (("insecure", "1"),))
    pinned = pinned_record(rec, FakeOci())
    text = format_record(pinned)
    # the first line as erofs-utils parses it (no @digest); the manifest pin on its own line
    assert text.startswith(f"OCI_NATIVE_BLOB reg/app:v1 linux/amd64 {DIGEST} ")
    back = parse_record(text)
    assert (back.username, back.password, back.options) == ("alice", "pw", (("insecure", "1"), ("manifest", OTHER)))


def test_document_summary_and_carried_totals():
    rec = parse_record(f"OCI_NATIVE_BLOB reg/app:v1 linux/amd64 {DIGEST}\n")
    first = publish.snapshot(publish.base_document(3, rec, FakeOci(), None), FakeOci(
        bytes_fetched=1000, retries=2, cache_hits=6, cache_misses=4, disk_hits=0), publish.ServerStats())
    s = publish.summary(first)
    assert s["bytes_fetched"] == 1000 and s["retries"] == 2 and s["cache_hit_ratio"] == 0.6 and s["daemons"] == 1
    assert first["digest"] == DIGEST and first["pid"] == os.getpid() and "pw" not in str(first)
    # a reattached daemon carries the dead one's figures
    second = publish.snapshot(publish.base_document(3, rec, FakeOci(), first), FakeOci(
        bytes_fetched=0, cache_hits=0, cache_misses=10, disk_hits=10), publish.ServerStats())
    s = publish.summary(second)
    assert (s["bytes_fetched"], s["bytes_fetched_total"], s["retries_total"], s["daemons"]) == (0, 1000, 2, 2)
    assert s["cache_hit_ratio"] == 1.0
    # another device or digest: nothing carried
    assert publish.base_document(4, rec, FakeOci(), first)["carried"]["daemons"] == 0
    assert publish.summary(None)["cache_hit_ratio"] is None


def test_serve_published_writes_until_the_connection_ends(tmp_path):
    import socket

    path = str(tmp_path / "mountnbd_nbd0.stats")
    rec = parse_record(f"OCI_NATIVE_BLOB reg/app:v1 linux/amd64 {DIGEST}\n")

    class Src(FakeOci):
        size = 4096

        async def read_at(self, off, n):
            return bytes(n)

    async def main():
        ours, theirs = socket.socketpair()
        src = Src(bytes_fetched=5)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                await n.start(lambda task_status: publish.serve_published(
                    trio.socket.from_stdlib_socket(ours), src, publish.base_document(0, rec, src, None), path,
                    export_size=4096, zero_copy="off", interval=0.01, task_status=task_status))
                while not os.path.exists(path):
                    await trio.sleep(0.01)
                theirs.close()  # EOF: the server returns and the publisher stops with it
        return state.read_json(path)

    doc = trio.run(main)
    assert doc["stats"]["bytes_fetched"] == 5 and doc["digest"] == DIGEST
    assert os.stat(path).st_mode & 0o777 == 0o600
