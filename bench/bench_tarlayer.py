"""Tar layers (issue 17): a real-shaped tar.gz mounted through its EROFS tar index.  Figures, not pass/fail.

The layer (built once into bench/work/tarlayer/, gitignored): ``tar -czf`` of this machine's
/usr/share/doc and /usr/lib/python3* plus one 100 MiB file of semi-compressible data
(/data/semi-100M.bin: a third random bytes, two thirds 16-symbol text), ~300 MB of tar.  A ~10 KB
file from the middle of the tar is the "small file".  Parts (``--only index,ttfb,lazy,seq``):

    index   indexing throughput: ``open_local_layer`` (index_layer + saving the index) into a fresh
            cache dir, vs ``gzip -dc LAYER | tar -t``; alternating, file in the page cache, medians
    ttfb    time to the first byte of the small file through the real CLI, clock from the command's
            start, page cache dropped first: ``erofs-mount --mode fuse LAYER MNT`` with an empty cache
            (indexing included) then with the index cached; the same from a docker-registry behind the
            20 ms-per-request fault proxy of tests/oci (``-o oci.layer=0,oci.insecure,oci.cache=DIR``):
            first mount, second mount (index and blob bytes cached), and a third with the blob's
            ``data``/``map`` removed from the cache entry (index cached, blob bytes not)
    lazy    in-process: ``open_tar_layer(OciBlobSource without disk cache, entry=cached index)`` + the
            pure reader, ``cat`` of the small file: compressed bytes fetched and round trips, beside the
            compressed size of a 4 MiB span (one gzip checkpoint's worth)
    seq     cold sequential read of the 100 MiB file: FUSE mount of the local tar.gz (index cached) vs
            ratarmount (installed by hand into its own venv, /opt/ratarmount-venv, never the project's:
            ``python3 -m venv /opt/ratarmount-venv && /opt/ratarmount-venv/bin/pip install ratarmount``),
            whose own index is built first (timed)

Round trips are counted at the proxy (every request it forwards, manifests included) and by the
daemon's published statistics (``requests`` + ``token_requests``).

    python -m bench tarlayer     (or: python -m bench.bench_tarlayer [--rounds 3] [--delay 0.02] [--only ...])
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
MB = 1e6
WORK = HERE / "work" / "tarlayer"
LAYER = WORK / "layer.tar.gz"
META = WORK / "layer.json"
BIG = "data/semi-100M.bin"
BIG_SIZE = 100 * MiB
SPAN = 4 << 20
RATAR = Path("/opt/ratarmount-venv/bin/ratarmount")
LAYER_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
PARTS = ("index", "ttfb", "lazy", "seq")


# ---------------------------------------------------------------------------------- the layer
def _semi(path: Path, size: int) -> None:
    rng = random.Random(17)
    text = bytes((0x61 + (b & 15)) for b in range(256))  # any byte -> one of 16 letters
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(3 * 4096)
            piece = block[:4096] + block[4096:].translate(text)
            f.write(piece[:left])
            left -= min(left, len(piece))


def build_layer() -> dict:
    """The tar.gz and its facts (the small file, the big one), built once."""
    if LAYER.exists() and META.exists():
        return json.loads(META.read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    extra = WORK / "extra"
    shutil.rmtree(extra, ignore_errors=True)
    (extra / "data").mkdir(parents=True)
    _semi(extra / BIG, BIG_SIZE)
    trees = ["usr/share/doc"] + sorted(p[1:] for p in glob.glob("/usr/lib/python3*") if os.path.isdir(p))
    tmp = LAYER.with_suffix(".tmp")
    print(f"building {LAYER} from /{', /'.join(trees)} + /{BIG}", flush=True)
    res = subprocess.run(["tar", "-czf", str(tmp), "--sort=name", "--warning=no-file-changed", "-C", "/", *trees,
                          "-C", str(extra), BIG], capture_output=True, text=True)
    if res.returncode not in (0, 1):  # 1: some file changed while read (a __pycache__): harmless here
        raise RuntimeError(f"tar failed: {res.stderr[-2000:]}")
    shutil.rmtree(extra, ignore_errors=True)
    members, tar_end, small, mid = 0, 0, None, None
    with tarfile.open(tmp, "r:gz") as tf:
        regs = []
        for m in tf:
            members += 1
            tar_end = max(tar_end, m.offset_data + m.size)
            if m.isreg():
                regs.append((m.offset_data, m.size, m.name))
    mid = tar_end / 2
    cands = [r for r in regs if 9000 <= r[1] <= 11000 and r[2].isascii() and " " not in r[2] and r[2] != BIG]
    small = min(cands, key=lambda r: abs(r[0] - mid))
    meta = {"small": small[2], "small_size": small[1], "small_offset": small[0], "big": BIG, "big_size": BIG_SIZE,
            "members": members, "trees": trees}
    os.rename(tmp, LAYER)
    META.write_text(json.dumps(meta, indent=1))
    return meta


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------- helpers
def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def _env(cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cache is not None:
        env["EROFS_MOUNT_CACHE_DIR"] = str(cache)
    return env


def _cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_mount", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _daemons(mnt: Path) -> list[int]:
    want = os.fsencode(str(mnt))
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if want in f.read().split(b"\0"):
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _wait_gone(mnt: Path) -> None:
    for _ in range(400):  # bounded: the daemon ends once unmounted
        if not _daemons(mnt) and not os.path.ismount(mnt):
            return
        time.sleep(0.05)


def _unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        res = _cli("-u", str(mnt), env=_env(), timeout=120)
        if res.returncode != 0 and os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
    _wait_gone(mnt)


def _published(mnt: Path, after: float) -> dict:
    from erofs_mount.backends.fuse import publish

    path = os.path.join(publish.stats_dir(), publish.key(str(mnt)))
    doc = None
    for _ in range(100):  # the daemon publishes every second: bounded wait for a fresh document
        doc = publish.read_json(path)
        if doc and doc.get("updated", 0) > after:
            break
        time.sleep(0.05)
    return (doc or {}).get("stats", {})


def _rt(st: dict) -> int:
    return int(st.get("requests") or 0) + int(st.get("token_requests") or 0)


def _net(st: dict) -> int:
    return int(st.get("bytes_fetched") or 0) + int(st.get("bytes_discarded") or 0)


def _med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


class ProxyLog:
    """The fault proxy in its own process (as the other benchmarks run it), each request it forwards
    written as one line of a file: round trips and the bytes ranges asked are counted there."""

    def __init__(self, upstream_port: int, delay: float, log: Path) -> None:
        self.path = log
        log.write_text("")
        self.proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "bench.bench_tarlayer",
                                      "--proxy-child", str(upstream_port), str(delay), str(log)],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True, env=_env())
        self.host = f"127.0.0.1:{int(self.proc.stdout.readline())}"

    def lines(self) -> list[list[str]]:
        return [ln.split("\t") for ln in self.path.read_text().splitlines()]

    def mark(self) -> int:
        return len(self.lines())

    def since(self, mark: int) -> tuple[int, int]:
        """(requests, bytes the blob GETs' ranges asked for) after ``mark``."""
        rows = self.lines()[mark:]
        asked = 0
        for row in rows:
            rng = row[2] if len(row) > 2 else ""
            if rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                asked += int(b) - int(a) + 1
        return len(rows), asked

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _proxy_child(upstream_port: int, delay: float, log: str) -> None:
    import trio

    from tests.oci._faultproxy import FaultProxy

    out = open(log, "a", buffering=1)

    class Ranges(list):  # the proxy logs the request, then its Range: the line is written on the Range
        def append(self, item) -> None:
            super().append(item)
            method, target, _ = proxy.log[-1]
            out.write(f"{method}\t{target}\t{item or ''}\n")

    proxy = FaultProxy("127.0.0.1", upstream_port, delay=delay, match=lambda m, t: True)
    proxy.ranges = Ranges()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            print(proxy.port, flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


def _push(base: str, layer: Path, digest: str, *, media_type: str = LAYER_MT, repo: str = "bench/tarlayer") -> str:
    import httpx

    from tests.oci._servers import Pusher

    p = Pusher(base)
    try:
        size = layer.stat().st_size
        if p.http.head(f"{base}/v2/{repo}/blobs/{digest}").status_code != 200:
            r = p.http.post(f"{base}/v2/{repo}/blobs/uploads/")
            loc = httpx.URL(base).join(r.headers["location"])
            with open(layer, "rb") as f:
                r = p.http.put(loc.copy_add_param("digest", digest), content=f, timeout=600,
                               headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
            assert r.status_code == 201, r.text
        cfg = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": p.blob(repo, cfg),
                          "size": len(cfg)},
               "layers": [{"mediaType": media_type, "digest": digest, "size": size}]}
        p.manifest(repo, "v1", doc)
        return repo
    finally:
        p.close()


# ---------------------------------------------------------------------------------- 1. indexing
def part_index(rounds: int, tmp: Path, rows: list[str]) -> dict:
    import trio

    from erofs_mount.sources.tarlayer.openlayer import open_local_layer

    size = LAYER.stat().st_size
    subprocess.run(["cat", str(LAYER)], stdout=subprocess.DEVNULL, check=True)  # warm: both read it from memory
    ours, theirs, tar_size = [], [], 0

    async def index_once(root: str):
        src = await open_local_layer(str(LAYER), "gzip", cache_root=root)
        try:
            return src.tar.size
        finally:
            await src.aclose()

    for _ in range(rounds):
        root = tmp / "idx-cache"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # its progress line, when stderr is a terminal
            tar_size = trio.run(index_once, str(root))
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", 'set -o pipefail; gzip -dc "$1" | tar -tf - >/dev/null', "-", str(LAYER)],
                       check=True)
        theirs.append(time.perf_counter() - t0)
    shutil.rmtree(tmp / "idx-cache", ignore_errors=True)
    o, g = _med(ours), _med(theirs)
    rows.append(f"1 index  layer {size / MB:.1f} MB gz, {tar_size / MB:.1f} MB tar (ratio {size / tar_size:.2f}), "
                f"page cache warm, median of {rounds}")
    rows.append(f"  open_local_layer (index_layer+save) {o:6.2f} s  {size / MB / o:6.1f} MB/s gz "
                f"({tar_size / MB / o:6.1f} MB/s tar)  runs " + " ".join(f"{x:.2f}" for x in ours))
    rows.append(f"  gzip -dc | tar -t                   {g:6.2f} s  {size / MB / g:6.1f} MB/s gz "
                f"({tar_size / MB / g:6.1f} MB/s tar)  runs " + " ".join(f"{x:.2f}" for x in theirs))
    rows.append(f"  ratio ours/gzip (throughput) {g / o:.2f}x  (goal >= 0.8x)")
    return {"index_s": o, "tar_size": tar_size}


# ---------------------------------------------------------------------------------- 2./3. CLI
def _cli_round(source: str, mnt: Path, small: str, env: dict, opts: str | None = None,
               proxy: ProxyLog | None = None) -> dict:
    mark = proxy.mark() if proxy else 0
    args = ["--mode", "fuse"] + (["-o", opts] if opts else []) + [source, str(mnt)]
    t0 = time.perf_counter()
    res = _cli(*args, env=env)
    t_mounted = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"erofs-mount {' '.join(args)} failed: {res.stderr.strip()[-2000:]}")
    with open(mnt / small, "rb") as f:
        data = f.read()
    t_first = time.perf_counter() - t0
    at_proxy = proxy.since(mark) if proxy else (None, None)
    stats = _published(mnt, time.time())
    _unmount(mnt)
    return {"first_s": t_first, "mounted_s": t_mounted, "len": len(data), "stats": stats,
            "proxy_requests": at_proxy[0], "proxy_asked": at_proxy[1]}


def _get_blob(proxy: ProxyLog, ref: str, digest: str) -> float:
    """Seconds to GET the whole blob through the proxy (one streaming request, bytes discarded)."""
    import httpx

    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    t0 = time.perf_counter()
    with httpx.Client(timeout=120) as c, c.stream("GET", f"http://{proxy.host}/v2/{repo}/blobs/{digest}",
                                                  follow_redirects=True) as r:
        r.raise_for_status()
        for _ in r.iter_bytes(4 * MiB):
            pass
    return time.perf_counter() - t0


def _ttfb_row(name: str, rs: list[dict], net: bool) -> str:
    line = (f"  {name:<27} first byte {_med(r['first_s'] for r in rs):6.2f} s "
            f"(mount cmd {_med(r['mounted_s'] for r in rs):5.2f} s)")
    if net:
        line += (f"  fetched {_med(_net(r['stats']) for r in rs) / MiB:7.2f} MiB, "
                 f"round trips {_med(_rt(r['stats']) for r in rs):.0f} (proxy {_med(r['proxy_requests'] for r in rs):.0f})")
    else:
        line += f"  layer file bytes read {_med(_net(r['stats']) for r in rs) / MiB:7.2f} MiB"
    return line


def part_ttfb(rounds: int, meta: dict, tmp: Path, rows: list[str], proxy: ProxyLog | None, ref: str | None,
              digest: str) -> dict:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    small = meta["small"]
    out: dict[str, list] = {"local-first": [], "local-second": [], "oci-first": [], "oci-second": [],
                            "oci-index-only": [], "oci-get": []}
    local_cache = tmp / "local-cache"
    for _ in range(rounds):
        shutil.rmtree(local_cache, ignore_errors=True)
        _drop_caches()
        out["local-first"].append(_cli_round(str(LAYER), mnt, small, _env(local_cache)))
        _drop_caches()
        out["local-second"].append(_cli_round(str(LAYER), mnt, small, _env(local_cache)))
        if ref is None:
            continue
        oci_cache = tmp / "oci-cache"
        shutil.rmtree(oci_cache, ignore_errors=True)
        opts = f"oci.layer=0,oci.insecure,oci.cache={oci_cache}"
        _drop_caches()
        out["oci-get"].append(_get_blob(proxy, ref, digest))
        _drop_caches()
        out["oci-first"].append(_cli_round(ref, mnt, small, _env(), opts, proxy))
        _drop_caches()
        out["oci-second"].append(_cli_round(ref, mnt, small, _env(), opts, proxy))
        entry = oci_cache / "sha256" / digest.split(":", 1)[1]
        for name in ("data", "map"):  # keep the tar index, forget the blob's bytes
            with contextlib.suppress(FileNotFoundError):
                (entry / name).unlink()
        _drop_caches()
        out["oci-index-only"].append(_cli_round(ref, mnt, small, _env(), opts, proxy))
    rows.append(f"2 ttfb   cat /{small} ({meta['small_size']} B) via `erofs-mount --mode fuse`, caches dropped, "
                f"median of {rounds}")
    rows.append(_ttfb_row("local, empty cache", out["local-first"], False))
    rows.append(_ttfb_row("local, index cached", out["local-second"], False))
    if ref is not None:
        g = _med(out["oci-get"])
        rows.append(f"  {'ref: GET whole blob (proxy)':<27} {g:6.2f} s, {LAYER.stat().st_size / MB / g:.1f} MB/s "
                    f"(httpx stream, discarded)")
        rows.append(_ttfb_row("oci 1st (indexes blob)", out["oci-first"], True))
        rows.append(_ttfb_row("oci 2nd (index+blob cached)", out["oci-second"], True))
        rows.append(_ttfb_row("oci 3rd (index, no data)", out["oci-index-only"], True))
        r = out["oci-index-only"][-1]
        gz = [k for k in ("gz_bytes_in", "spans_decoded", "tar_index_bytes") if k in r["stats"]]
        rows.append(f"     3rd mount: proxy ranges asked {r['proxy_asked'] / MiB:.2f} MiB, blob reads "
                    f"{r['stats'].get('reads')}; gzip counters published: {', '.join(gz) or 'none'}")
    return {"local_cache": local_cache, "oci_cache": tmp / "oci-cache"}


# ---------------------------------------------------------------------------------- 3. lazy, in-process
def part_lazy(meta: dict, rows: list[str], proxy: ProxyLog, ref: str, digest: str, index_root: Path) -> None:
    import trio

    from erofs_mount.erofs.image import Image
    from erofs_mount.gzindex import from_zinfo
    from erofs_mount.sources.bridge import SyncReadAt
    from erofs_mount.sources.oci.blob import OciBlobSource
    from erofs_mount.sources.oci.client import RegistryClient
    from erofs_mount.sources.oci.manifest import select_layer
    from erofs_mount.sources.oci.options import OciOptions
    from erofs_mount.sources.oci.reference import parse_reference
    from erofs_mount.sources.oci.resolve import resolve
    from erofs_mount.sources.tarlayer.openlayer import open_tar_layer
    from erofs_mount.sources.tarlayer.store import digest_dir

    entry = digest_dir(str(index_root), digest)
    if not os.path.exists(os.path.join(entry, "tarindex.json")):
        rows.append("3 lazy   skipped: no cached tar index (the ttfb part makes it)")
        return
    small = "/" + meta["small"]

    async def run() -> dict:
        options = OciOptions(insecure=True)
        r = parse_reference(ref)
        client = RegistryClient(r, options)
        res = await resolve(client, r, options)
        index, desc = select_layer(res.manifest, layer=0, blob=None)
        blob = OciBlobSource(client, digest=desc.digest, size=desc.size, media_type=desc.media_type, ref=res.ref,
                             platform=res.platform, layer_index=index, manifest_digest=res.manifest_digest,
                             options=options)  # no attach_disk_cache: every blob byte comes over the network
        resolved = (_rt(blob.stats()), _net(blob.stats()))
        mark = proxy.mark()
        t0 = time.perf_counter()
        src = await open_tar_layer(blob, "gzip", what=ref, digest=desc.digest, entry=entry)
        try:
            bridge = SyncReadAt.here(src)

            def cat() -> bytes:
                img = Image(bridge, size=src.size)
                nid = img.resolve(small)
                return img.read(nid, 0, 1 << 20)

            data = await trio.to_thread.run_sync(cat)
            dt = time.perf_counter() - t0
            st = src.stats()
            return {"len": len(data), "secs": dt, "rt": _rt(st) - resolved[0], "net": _net(st) - resolved[1],
                    "resolve_rt": resolved[0], "proxy": proxy.since(mark), "stats": st, "gz": src.tar.index}
        finally:
            await src.aclose()

    r = trio.run(run)
    gz = r["gz"]
    cps = gz.checkpoints
    spans = [cps[i + 1].in_offset - cps[i].in_offset for i in range(len(cps) - 1)] + \
            [gz.compressed_size - cps[-1].in_offset]
    k = gz.position(meta["small_offset"])
    st = r["stats"]
    rows.append(f"3 lazy   in-process open_tar_layer(OciBlobSource, no disk cache, index cached) + reader, "
                f"cat /{meta['small']} over the proxy")
    rows.append(f"  {r['len']} B in {r['secs']:.3f} s: fetched {r['net'] / MiB:.3f} MiB ({r['net']} B), round trips "
                f"{r['rt']} after resolve ({r['resolve_rt']} to resolve); proxy {r['proxy'][0]} req, "
                f"{r['proxy'][1] / MiB:.3f} MiB asked")
    rows.append(f"  gz_bytes_in {int(st.get('gz_bytes_in') or 0) / MiB:.3f} MiB, spans decoded {st.get('spans_decoded')}"
                f"; compressed 4 MiB span: this file's (#{k}) {spans[k] / MiB:.3f} MiB, median "
                f"{_med(spans) / MiB:.3f} MiB, max {max(spans) / MiB:.3f} MiB ({len(cps)} checkpoints); "
                f"target <= 2 spans = {2 * spans[k] / MiB:.3f} MiB -> {r['net'] / max(1, spans[k]):.2f} spans")


# ---------------------------------------------------------------------------------- 4. sequential
def _read_all(path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            n += len(chunk)
    return n, time.perf_counter() - t0


def _ratar_mount(mnt: Path, index: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([str(RATAR), *extra, "--index-file", str(index), str(LAYER), str(mnt)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"ratarmount failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")
    for _ in range(200):  # bounded: the daemon has just forked
        if os.path.ismount(mnt):
            break
        time.sleep(0.05)
    return time.perf_counter() - t0


def _ratar_unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
    _wait_gone(mnt)


def part_seq(rounds: int, meta: dict, tmp: Path, rows: list[str], local_cache: Path, index_s: float | None) -> None:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    env = _env(local_cache)
    ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
    note = None
    ratar_index_s = None
    if not RATAR.exists():
        note = (f"ratarmount skipped: {RATAR} not found (install it into its own venv: python3 -m venv "
                f"/opt/ratarmount-venv && /opt/ratarmount-venv/bin/pip install ratarmount)")
    else:
        ridx = tmp / "ratarmount.index.sqlite"
        try:
            subprocess.run(["cat", str(LAYER)], stdout=subprocess.DEVNULL, check=True)  # warm, as in part 1
            ratar_index_s = _ratar_mount(mnt, ridx, "--recreate-index")
            _ratar_unmount(mnt)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            note = f"ratarmount skipped: {exc}"
            _ratar_unmount(mnt)
    res = _cli("--mode", "fuse", str(LAYER), str(mnt), env=env)  # the index is cached (made now if not)
    if res.returncode != 0:
        raise RuntimeError(f"erofs-mount failed: {res.stderr.strip()[-2000:]}")
    _unmount(mnt)
    rss = []
    for _ in range(rounds):
        _drop_caches()
        res = _cli("--mode", "fuse", str(LAYER), str(mnt), env=env)
        if res.returncode != 0:
            raise RuntimeError(f"erofs-mount failed: {res.stderr.strip()[-2000:]}")
        n, dt, cpu = _timed_read(mnt)
        rss.append(_hwm(_daemons(mnt)))
        _unmount(mnt)
        assert n == meta["big_size"], n
        ours.append(dt)
        ours_cpu.append(cpu)
        if note is None:
            _drop_caches()
            try:
                _ratar_mount(mnt, tmp / "ratarmount.index.sqlite")
                n, dt, cpu = _timed_read(mnt)
                assert n == meta["big_size"], n
                theirs.append(dt)
                theirs_cpu.append(cpu)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                note = f"ratarmount skipped: {exc}"
            finally:
                _ratar_unmount(mnt)
    o = _med(ours)
    rows.append(f"4 seq    cold read of /{BIG} ({meta['big_size'] / MiB:.0f} MiB), 1 MiB reads, caches dropped, "
                f"median of {rounds}")
    rows.append(f"  erofs-mount fuse (index cached) {o:6.2f} s {meta['big_size'] / MB / o:7.1f} MB/s  runs "
                + " ".join(f"{x:.2f}" for x in ours) + f"  daemon CPU {_med(ours_cpu):.2f} s, VmHWM {_med(rss):.0f} MiB")
    if theirs:
        t = _med(theirs)
        rows.append(f"  ratarmount {_ratar_version()}       {t:6.2f} s {meta['big_size'] / MB / t:7.1f} MB/s  runs "
                    + " ".join(f"{x:.2f}" for x in theirs) + f"  daemon CPU {_med(theirs_cpu):.2f} s")
        rows.append(f"  ratio erofs-mount/ratarmount (throughput) {t / o:.2f}x; index build: ratarmount "
                    f"{ratar_index_s:.2f} s (mount cmd, warm)"
                    + (f", erofs-mount {index_s:.2f} s (part 1)" if index_s else ""))
    if note:
        rows.append("  " + note)


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _timed_read(mnt: Path) -> tuple[int, float, float]:
    """(bytes, seconds, CPU seconds of the serving daemon) of reading the big file."""
    pids = _daemons(mnt)
    c0 = _cpu(pids)
    n, dt = _read_all(mnt / BIG)
    return n, dt, _cpu(pids) - c0


def _hwm(pids: list[int]) -> float | None:
    best = None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        best = max(best or 0, kb)
        except OSError:
            pass
    return best / 1024 if best else None


def _ratar_version() -> str:
    res = subprocess.run([str(RATAR), "--version"], capture_output=True, text=True, timeout=60)
    first = (res.stdout or "").splitlines()[:1]
    return first[0].split()[-1] if first else "?"


# ---------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_tarlayer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.020, help="seconds the proxy adds to every request")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    ap.add_argument("--proxy-child", nargs=3, metavar=("PORT", "DELAY", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.proxy_child:
        _proxy_child(int(args.proxy_child[0]), float(args.proxy_child[1]), args.proxy_child[2])
        return 0
    parts = set(args.only.split(","))
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("gzip") is None:
        print("bench_tarlayer skipped: needs root (drop_caches), /dev/fuse, gzip, tar")
        return 0
    from tests.oci._servers import REGISTRY_BIN, start_registry

    t_start = time.monotonic()
    meta = build_layer()
    rows: list[str] = []
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    reg = proxy = None
    index_s = None
    try:
        if "index" in parts:
            index_s = part_index(args.rounds, tmp, rows)["index_s"]
        ref = None
        digest = _sha256_file(LAYER)
        if ("ttfb" in parts or "lazy" in parts) and REGISTRY_BIN is not None:
            reg = start_registry(tmp / "registry", WORK / "storage")
            repo = _push(reg.url, LAYER, digest)
            proxy = ProxyLog(reg.port, args.delay, tmp / "proxy.log")
            ref = f"{proxy.host}/{repo}:v1"
        elif REGISTRY_BIN is None:
            rows.append("registry parts skipped: no docker-registry (apt-get install docker-registry)")
        caches = {"local_cache": tmp / "local-cache", "oci_cache": tmp / "oci-cache"}
        if "ttfb" in parts:
            caches = part_ttfb(args.rounds, meta, tmp, rows, proxy, ref, digest)
        if "lazy" in parts and ref is not None:
            if "ttfb" not in parts:  # make the index: one mount of the registry layer
                (tmp / "mnt").mkdir(exist_ok=True)
                _cli_round(ref, tmp / "mnt", meta["small"], _env(),
                           f"oci.layer=0,oci.insecure,oci.cache={caches['oci_cache']}", proxy)
            part_lazy(meta, rows, proxy, ref, digest, caches["oci_cache"])
        if "seq" in parts:
            part_seq(args.rounds, meta, tmp, rows, caches["local_cache"], index_s)
    finally:
        for m in (tmp / "mnt",):
            if m.exists() and os.path.ismount(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True, timeout=60)
        if proxy is not None:
            proxy.stop()
        if reg is not None:
            reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tar layer {LAYER.name}: {LAYER.stat().st_size / MB:.1f} MB gz, {meta['members']} members "
          f"(/{', /'.join(meta['trees'])} + /{BIG}); proxy +{args.delay * 1000:.0f} ms per request; "
          f"{time.monotonic() - t_start:.0f} s in all")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
