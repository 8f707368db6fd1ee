"""Prepare throughput and memory against a bare decode + encode loop over the same images, on the
same cores, measured side by side in one run (rounds interleaved, so a busy machine slows both).

Data sets (from ../shared/data):
- ``cifar``: all 60,000 CIFAR-10 JPEGs (32 px) of the two zips;
- ``imagenette``: the Imagenette subset, 4,925 images at 224 px (``--resize 224``);
- ``imagenette40k``: that subset repeated 8 times under distinct names (39,400 images) in one
  stored zip, built once into ``benchmarks/.data/`` (git-ignored).

Timed in each round, in this order:
- bare: read every JPEG with zipfile, decode it with simplejpeg, encode it at QF85 4:2:0, nothing
  else, in one process per core;
- library: ``prepare_dataset`` (EtC block 16, JPEG QF85 4:2:0, default shard size and workers,
  verification included) in a fresh Python process; the time is taken inside it (pool start, plan,
  shards, manifest, verify), the peak RSS (VmHWM) of it and of each of its worker processes from
  outside;
- cli (``--cli``): ``etc-data prepare`` end to end (Python start, Prefect's ephemeral API, the flow
  with one task per shard, manifest, verify), after one tiny warm-up run that pays Prefect's
  one-time database creation (timed apart);
- cli on a running server (``--cli-server``): the same command with ``PREFECT_API_URL`` set to a
  ``prefect server start`` started once before the rounds (what an owner serving scheduled flows
  runs): no ephemeral API to boot.
Prints each round and the ratios library/bare and cli/bare (best of the rounds and per round).
Goals (issue 17): library <= 1.3x bare at 32 and 224 px; cli <= 1.5x bare on the 40k set; peak RSS
of every process on the 40k set <= 1.2x that on the 4,925-image set, workers <= 1 GB.

    python benchmarks/bench_prepare.py [--only cifar imagenette imagenette40k] [--rounds 2] [--cli] [--cli-server]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ETC_DATA_SHARED", ROOT.parent / "shared" / "data"))
DATA = ROOT / "benchmarks" / ".data"


def build_40k(src: Path, dest: Path, copies: int = 8) -> Path:
    """The Imagenette subset repeated ``copies`` times under distinct names, in a stored zip."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        names = [n for n in zin.namelist() if n.lower().endswith((".jpeg", ".jpg"))]
        for n in names:
            data = zin.read(n)
            head, base = n.rsplit("/", 1)
            for k in range(copies):
                zout.writestr(f"{head}/r{k}_{base}", data)
    os.replace(tmp, dest)
    return dest


def _bare_part(zips: list[str], part: int, parts: int) -> int:
    """Decode + encode every ``parts``-th image of the zips, starting at ``part``."""
    import simplejpeg

    n = 0
    for zp in zips:
        with zipfile.ZipFile(zp) as z:
            names = sorted(x for x in z.namelist() if x.lower().endswith((".jpg", ".jpeg")))
            for name in names[part::parts]:
                img = simplejpeg.decode_jpeg(z.read(name), colorspace="rgb")
                simplejpeg.encode_jpeg(img, quality=85, colorspace="rgb", colorsubsampling="420")
                n += 1
    return n


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bare(zips: list[Path], workers: int) -> tuple[float, int, float]:
    """(wall seconds, images, CPU seconds of the worker processes)."""
    c, t = _children_cpu(), time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as ex:
        n = sum(ex.map(_bare_part, [[str(z) for z in zips]] * workers, range(workers), [workers] * workers))
    return time.perf_counter() - t, n, _children_cpu() - c


class PeakRSS:
    """Polls /proc for a process and its descendants; keeps each one's VmHWM (peak resident set)."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, peak bytes)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _hwm(pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _role(self, pid: int) -> str:
        if pid == self.pid:
            return "main"
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "?"
        if "multiprocessing" in cmd or "spawn_main" in cmd:
            return "worker"
        return "prefect-server" if "prefect" in cmd else "child"

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                pids = [self.pid] + [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
            except psutil.Error:
                pids = [self.pid]
            for pid in pids:
                v = self._hwm(pid)
                if v is not None:
                    role = self.peaks.get(pid, (None, 0))[0] or self._role(pid)
                    self.peaks[pid] = (role, max(v, self.peaks.get(pid, ("", 0))[1]))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, list[int]]:
        self._stop.set()
        self._t.join()
        out: dict[str, list[int]] = {}
        for role, peak in self.peaks.values():
            out.setdefault(role, []).append(peak)
        return out


LIB = """
import json, sys, time
from etc_data.prepare import PrepareConfig, prepare_dataset
t = time.perf_counter()
s = prepare_dataset(PrepareConfig(**json.loads(sys.argv[1])))
print(json.dumps({"seconds": time.perf_counter() - t, "images": sum(m.num_samples for m in s.manifests.values())}))
"""


def run_watched(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, dict]:
    """Run a command, watching the peak RSS of it and its children; peaks["cpu"]: CPU seconds of
    the command and its children (what a busy machine inflates least)."""
    c, t = _children_cpu(), time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mon = PeakRSS(p.pid)
    out, err = p.communicate()
    dt = time.perf_counter() - t
    peaks = mon.stop()
    peaks["cpu"] = _children_cpu() - c
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{out}\n{err}")
    return r, dt, peaks


def library(zips, key, out: Path, resize, env, shard_size, workers=None) -> tuple[float, int, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = dict(source=[str(z) for z in zips], out=str(out), dataset="bench", scheme="etc", block_size=16,
               codec="jpeg:q=85,sub=420", key_ref=str(key), resize=resize, shard_size=shard_size, workers=workers)
    r, _, peaks = run_watched([sys.executable, "-c", LIB, json.dumps(cfg)], env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["seconds"], res["images"], peaks


def cli(zips, key, out: Path, resize, env, shard_size) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "etc_data.cli", "prepare", "--key", str(key), "--out", str(out), "--dataset", "bench",
           "--scheme", "etc", "--block-size", "16", "--codec", "jpeg:q=85,sub=420", "--shard-size", str(shard_size)]
    for z in zips:
        cmd += ["--source", str(z)]
    if resize:
        cmd += ["--resize", str(resize)]
    _, dt, peaks = run_watched(cmd, env)
    return dt, peaks


def listing_bytes_per_image(zips: list[Path]) -> float:
    """Python memory the opened source and its sorted listings hold, per image (tracemalloc)."""
    import gc
    import tracemalloc

    from etc_data.sources import open_source

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    src = open_source([str(z) for z in zips])
    n = sum(len(src.items(sp)) for sp in src.splits)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del src
    return held / n


def _mb(peaks: dict, role: str) -> str:
    v = peaks.get(role)
    return "-" if not v else "/".join(f"{x / 2**20:.0f}" for x in sorted(v, reverse=True))


class RunningServer:
    """``prefect server start`` on 127.0.0.1 (a free port) for ``--cli-server``: what a data owner
    who serves scheduled flows already runs, so the CLI skips booting Prefect's ephemeral API."""

    def __init__(self, env: dict):
        import socket
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(port)], env=dict(env, PREFECT_UI_ENABLED="0"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        sys.exit("prefect server start did not answer within 120 s")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run(name, zips, key, tmp, resize, env, rounds, with_cli, shard_size, workers=None, server=None) -> dict:
    cores = len(os.sched_getaffinity(0))
    print(f"\n== {name}: {', '.join(z.name for z in zips)} on {cores} cores, {rounds} rounds interleaved; library "
          f"workers={workers} ==")
    rows = []
    for r in range(rounds):
        tb, n, cb = bare(zips, cores)
        tl, nl, pl = library(zips, key, tmp / f"{name}-lib", resize, env, shard_size, workers)
        row = {"bare": tb, "lib": tl, "lib_peaks": pl, "n": n, "cpu_ratio": pl["cpu"] / cb}
        line = (f"round {r + 1}: bare {tb:.2f} s ({n / tb:.0f} img/s, CPU {cb:.1f} s) | library {tl:.2f} s "
                f"({nl / tl:.0f} img/s, {tl / tb:.2f}x; CPU {pl['cpu']:.1f} s, {pl['cpu'] / cb:.2f}x, Python start "
                f"included) peak RSS MB main {_mb(pl, 'main')}, workers {_mb(pl, 'worker')}")
        if with_cli:
            tc, pc = cli(zips, key, tmp / f"{name}-cli", resize, env, shard_size)
            row.update(cli=tc, cli_peaks=pc)
            line += (f" | cli {tc:.2f} s ({tc / tb:.2f}x; CPU {pc['cpu']:.1f} s, {pc['cpu'] / cb:.2f}x) peak RSS MB main "
                     f"{_mb(pc, 'main')}, workers {_mb(pc, 'worker')}, Prefect server {_mb(pc, 'prefect-server')}")
        if server is not None:
            ts, ps = cli(zips, key, tmp / f"{name}-cli-server", resize, dict(env, PREFECT_API_URL=server.url), shard_size)
            row.update(cli_server=ts)
            line += f" | cli on a running server {ts:.2f} s ({ts / tb:.2f}x; CPU {ps['cpu']:.1f} s)"
        rows.append(row)
        print(line, flush=True)
    best = {k: min(x[k] for x in rows) for k in ("bare", "lib", *(("cli",) if with_cli else ()),
                                                 *(("cli_server",) if server is not None else ()))}
    ratios = [x["lib"] / x["bare"] for x in rows]
    print(f"{name}: best bare {best['bare']:.2f} s, library {best['lib']:.2f} s -> {best['lib'] / best['bare']:.2f}x "
          f"(per round {', '.join(f'{q:.2f}' for q in ratios)}; median {sorted(ratios)[len(ratios) // 2]:.2f}x; "
          f"CPU time per round {', '.join(format(x['cpu_ratio'], '.2f') for x in rows)}x)")
    if with_cli:
        print(f"{name}: best cli {best['cli']:.2f} s -> {best['cli'] / best['bare']:.2f}x "
              f"(per round {', '.join(format(x['cli'] / x['bare'], '.2f') for x in rows)})")
    if server is not None:
        print(f"{name}: best cli on a running Prefect server {best['cli_server']:.2f} s -> "
              f"{best['cli_server'] / best['bare']:.2f}x "
              f"(per round {', '.join(format(x['cli_server'] / x['bare'], '.2f') for x in rows)})")
    peak = {role: max(max(x["lib_peaks"].get(role, [0])) for x in rows) for role in ("main", "worker")}
    return {"n": rows[0]["n"], "best": best, "peak": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=["cifar", "imagenette", "imagenette40k"],
                    default=["cifar", "imagenette", "imagenette40k"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cli", action="store_true", help="also time etc-data prepare (Prefect flow) in each round")
    ap.add_argument("--cli-server", action="store_true",
                    help="also time etc-data prepare against a running `prefect server start` (no ephemeral API boot)")
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=None, help="library: worker processes (default: as prepare decides)")
    a = ap.parse_args()
    from etc_data.keys import new_key_file

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    server = None
    try:
        key = tmp / "owner.key"
        new_key_file(key, "bench")
        env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_LOGGING_LEVEL="WARNING",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        from etc_data.schemes import native_available

        print("EtC transform: " + ("compiled run kernel (etc_data._runs)" if native_available()
                                   else "numpy gather (etc_data._runs not compiled)"))
        if a.cli or a.cli_server:
            # Prefect's first use of a home creates and migrates its database (seconds); users pay
            # that once, so it is timed apart: a tiny plain run on a fresh home.
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "etc_data.cli", "prepare", "--source",
                                str(SHARED / "cifar10-test-jpeg.zip"), "--scheme", "plain", "--key", str(key),
                                "--limit", "10", "--out", str(tmp / "warm"), "--codec", "png"],
                               env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"warm-up run failed:\n{r.stderr}")
            print(f"first Prefect use on a fresh PREFECT_HOME (10 images, plain): {time.perf_counter() - t:.2f} s")
        if a.cli_server:
            server = RunningServer(env)
        sets = {"cifar": ([SHARED / "cifar10-train-jpeg.zip", SHARED / "cifar10-test-jpeg.zip"], None),
                "imagenette": ([SHARED / "imagenette-224-subset.zip"], 224)}
        if "imagenette40k" in a.only:
            t = time.perf_counter()
            z = build_40k(SHARED / "imagenette-224-subset.zip", DATA / "imagenette-224-x8.zip")
            print(f"40k set: {z} ({time.perf_counter() - t:.1f} s to build or find)")
            sets["imagenette40k"] = ([z], 224)
        res = {}
        for name in a.only:
            zips, resize = sets[name]
            res[name] = run(name, zips, key, tmp, resize, env, a.rounds, a.cli, a.shard_size, a.workers, server)
        if "imagenette" in res and "imagenette40k" in res:
            small, big = res["imagenette"], res["imagenette40k"]
            top_s, top_b = max(small["peak"].values()), max(big["peak"].values())
            print(f"\npeak RSS of the largest process (library), 40k vs 4,925 images: {top_b / 2**20:.0f} / "
                  f"{top_s / 2**20:.0f} MB = {top_b / top_s:.2f}x (goal <= 1.2x); main {big['peak']['main'] / 2**20:.0f} / "
                  f"{small['peak']['main'] / 2**20:.0f} MB, workers {big['peak']['worker'] / 2**20:.0f} / "
                  f"{small['peak']['worker'] / 2**20:.0f} MB (0: chunks ran on threads in the main process)")
        if "imagenette40k" in res:
            per = listing_bytes_per_image(sets["imagenette40k"][0])
            print(f"source listing (tracemalloc, 40k set): {per:.0f} B per image, held by every process that opens "
                  f"the source (the planner and each worker) -> 1.28 M images: {per * 1_281_167 / 2**30:.2f} GB each")
        print("\n(ratios are measured side by side in one run; the machine may be shared with other work)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
