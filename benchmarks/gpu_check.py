"""One self-checking run that proves the trainer on a GPU and measures the speed goals (issue 20).

    bash benchmarks/gpu_check.sh [options]    # on the GPU machine: installs carry/wheels, then runs this
    python benchmarks/gpu_check.py [--total 480] [--only prepare,tests,convmixer,stream,train]
        [--train-budget 240] [--train-epochs N] [--out DIR] [--work DIR] [--data DIR] [--carry DIR]
    python benchmarks/gpu_check.py --smoke --device cpu   # every step, tiny, on the CPU (what CI checks)

Steps, each a subprocess with its own timeout. A step that fails or runs out of time is reported and
the next one still runs; one summary table is printed at the end in every case.

  prepare    CIFAR-10 JPEG q75 copies -> EtC (block 16) JPEG q85 4:4:4 shards, 50,000 train / 10,000
             test, with the library's prepare job (in the background while `tests` runs). The copies
             come from --data, ../shared/data, or carry/data/cifar10-jpeg.tar.xz (gpu_carry.sh).
  tests      pytest -m gpu tests/test_dwconv.py: the Triton depthwise kernels against torch's conv
             (fp32, bf16; output and both gradients) and a patched ConvMixer training step.
  convmixer  benchmarks/bench_convmixer_gpu.py: training-step img/s of ConvMixer-256/8 (32 px, batch
             512) and ConvMixer-384/8 (224 px, batch 128) with torch's conv and the Triton kernels,
             and per-op times of the depthwise conv.
  stream     benchmarks/bench_trainer.py on the prepared shards: the streaming trainer's img/s (GPU
             JPEG decode) / the same steps fed from batches already on the GPU. Goal >= 0.95.
  train      `etc-data train` (python -m etc_data.cli) on the shards with the recipe of docs/gpu.md,
             epochs chosen from the measured img/s to fit --train-budget: test accuracy against wall
             time. The whole run keeps within --total seconds (default 480, from gpu_check.sh's start).

Without CUDA it says so and exits 0 having run nothing, unless ``--smoke --device cpu`` asks for the
tiny CPU run. Outputs (--out, default $OUT when set, else runs/gpu_check): one log per step,
summary.json (every figure, and the table), metrics.jsonl and curves.png of the training run.

Internal commands: ``prepare-shards`` (the prepare step), ``pack-data`` / ``unpack-data`` (the two
CIFAR-10 zips as one tar.xz and back: the same JPEG bytes in 28 % of the size; gpu_carry.sh packs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("prepare", "tests", "convmixer", "stream", "train")
GOALS = {"convmixer": 8000.0, "stream": 0.95, "accuracy": 0.927, "accuracy_minutes": 15}
ZIPS = ("cifar10-train-jpeg.zip", "cifar10-test-jpeg.zip")
PACKED = "cifar10-jpeg.tar.xz"
# (module, distribution) that the steps import on the GPU machine (found without importing them)
REQUIRED = (("torchvision", "torchvision"), ("triton", "triton"), ("timm", "timm"), ("numpy", "numpy"),
            ("PIL", "pillow"), ("simplejpeg", "simplejpeg"), ("cryptography", "cryptography"), ("click", "click"),
            ("tqdm", "tqdm"), ("yaml", "pyyaml"), ("fsspec", "fsspec"), ("matplotlib", "matplotlib"),
            ("pytest", "pytest"))


# ----------------------------------------------------------------------------- running a step

@dataclass
class Result:
    name: str
    status: str = "skipped"      # ok, FAIL, TIMEOUT, skipped
    seconds: float = 0.0
    summary: str = ""            # one line (or a few) for the table
    goal: str = ""
    details: dict = field(default_factory=dict)
    lines: list = field(default_factory=list, repr=False)  # (seconds since start, line) of the output


def run_command(cmd: list[str], timeout: float, log_path: Path, env: dict | None = None,
                echo: bool = False) -> tuple[int | None, float, list]:
    """Run cmd in its own process group with its output (stdout + stderr) in log_path; on timeout the
    whole group is ended (DataLoader and pool workers too). Returns (rc or None on timeout, seconds,
    [(seconds since start, line), ...])."""
    t0 = time.monotonic()
    lines: list = []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, cwd=REPO, start_new_session=True)

        def pump():
            for line in proc.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
                log.write(line)
                log.flush()
                if echo:
                    print("    " + line.rstrip("\n"), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
        if rc is None:
            log.write(f"\n[gpu_check] stopped after its timeout of {timeout:.0f} s\n")
    return rc, time.monotonic() - t0, lines


def json_lines(lines: list, must_have: str) -> list[dict]:
    """The JSON objects among a step's output lines that contain the key must_have."""
    out = []
    for _, line in lines:
        s = line.strip()
        if s.startswith("{") and f'"{must_have}"' in s:
            try:
                out.append(json.loads(s))
            except ValueError:
                pass
    return out


# ----------------------------------------------------------------------------- the data

def pack_data(zips: list[Path], out: Path) -> dict:
    """The members of the CIFAR-10 JPEG zips, in their order and with their bytes, as one tar.xz.
    Each 32 px JPEG repeats ~620 bytes of identical headers, which xz removes: 65 MB -> ~19 MB."""
    import io
    import lzma
    import tarfile
    import zipfile

    counts: dict[str, int] = {}
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for zpath in zips:
            with zipfile.ZipFile(zpath) as z:
                for info in z.infolist():
                    ti = tarfile.TarInfo(info.filename.rstrip("/"))
                    ti.mtime = 0
                    if info.is_dir():
                        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(ti)
                        continue
                    data = z.read(info)
                    ti.size, ti.mode = len(data), 0o644
                    tar.addfile(ti, io.BytesIO(data))
                    split = info.filename.split("/", 1)[0]
                    counts[split] = counts.get(split, 0) + 1
    tmp.replace(out)
    return counts


def unpack_data(packed: Path, dest: Path) -> dict:
    """Rebuild the zips pack_data read (cifar10-<split>-jpeg.zip in dest: same names, order and bytes,
    stored) from its archive; returns images per split. Refuses member names that are not relative."""
    import tarfile
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        with tarfile.open(packed, "r:xz") as tar:
            for m in tar:
                split = m.name.split("/", 1)[0]
                if m.name.startswith("/") or ".." in m.name.split("/") or not re.fullmatch(r"[A-Za-z0-9_]+", split):
                    raise ValueError(f"{packed}: unexpected member {m.name!r}")
                if split not in zips:
                    zips[split] = zipfile.ZipFile(dest / f"cifar10-{split}-jpeg.zip.part", "w", zipfile.ZIP_STORED)
                if m.isdir():
                    zips[split].writestr(m.name + "/", b"")
                elif m.isfile():
                    zips[split].writestr(m.name, tar.extractfile(m).read())
                    counts[split] = counts.get(split, 0) + 1
    finally:
        for z in zips.values():
            z.close()
    for split in zips:
        (dest / f"cifar10-{split}-jpeg.zip.part").replace(dest / f"cifar10-{split}-jpeg.zip")
    return counts


def shared_dir() -> Path | None:
    for cand in (os.environ.get("ETC_DATA_SHARED"), REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if cand and all((Path(cand) / z).exists() for z in ZIPS):
            return Path(cand)
    return None


def data_source(args) -> tuple[list[str] | None, str]:
    """(prepare sources, where they come from): the two zips (--data or the shared folder), or the
    carried archive, unpacked into the work folder by the prepare step."""
    if args.data and args.data.endswith(".tar.xz"):
        return ["packed:" + str(Path(args.data).resolve())], args.data
    if args.data:
        return [str(Path(args.data) / z) for z in ZIPS], f"--data {args.data}"
    shared = shared_dir()
    if shared:
        return [str(shared / z) for z in ZIPS], str(shared)
    packed = Path(args.carry) / "data" / PACKED
    if packed.exists():
        return ["packed:" + str(packed)], str(packed)
    return None, "no CIFAR-10 copies: give --data DIR, or run benchmarks/gpu_carry.sh and carry 'carry'"


def prepare_shards(argv: list[str]) -> int:
    """The prepare step (a subprocess: the prepare job's worker pool re-imports this file)."""
    p = argparse.ArgumentParser(prog="gpu_check.py prepare-shards")
    p.add_argument("--source", nargs="+", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int)
    a = p.parse_args(argv)
    from etc_data.keys import load_key, new_key_file
    from etc_data.prepare import PrepareConfig, prepare_dataset

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sources = a.source
    if sources[0].startswith("packed:"):
        counts = unpack_data(Path(sources[0][7:]), work / "data")
        print(f"unpacked {counts} from {sources[0][7:]} in {time.time() - t0:.1f} s", flush=True)
        sources = [str(work / "data" / z) for z in ZIPS]
    key, shards = work / "owner.key", work / "shards"
    if not key.exists():
        import shutil

        shutil.rmtree(shards, ignore_errors=True)  # shards of an older key would be refused
        new_key_file(key, "gpu-check")
    # whoever trains gets the owner's public key only (training needs no secret)
    (work / "owner.pub").write_text(load_key(key).public_key + "\n")
    t1 = time.time()
    s = prepare_dataset(PrepareConfig(source=sources, out=str(shards), dataset="cifar10", key_ref=str(key),
                                      scheme="etc", block_size=16, codec="jpeg:q=85,sub=444", limit=a.limit,
                                      shard_size=a.shard_size, workers=a.workers))
    dt = time.time() - t1
    n = {k: m.num_samples for k, m in s.manifests.items()}
    print(json.dumps({"prepared": n, "written": s.written, "seconds": round(dt, 1),
                      "img_s": round(sum(s.written.values()) / max(dt, 1e-9), 1),
                      "payload_bytes": s.payload_bytes, "shards": str(shards), "key": str(key)}), flush=True)
    return 0


# ----------------------------------------------------------------------------- the steps

PROBE_CUDA = """
import json, os, platform
d = {"python": platform.python_version(), "cpus": os.cpu_count(), "missing": []}
try:
    import torch
    d["torch"], d["cuda"] = torch.__version__, torch.cuda.is_available()
    if d["cuda"]:
        d["gpu"] = torch.cuda.get_device_name(0)
        d["capability"] = list(torch.cuda.get_device_capability(0))
except Exception as e:
    d["cuda"], d["torch_error"] = False, repr(e)
"""
PROBE_MODULES = """
import importlib.metadata as md, importlib.util
for m, dist in %r:
    if importlib.util.find_spec(m) is None:
        d["missing"].append(m)
    else:
        try:
            d[m] = md.version(dist)
        except md.PackageNotFoundError:
            d[m] = "?"
"""


def probe(py: str, env: dict, modules: bool) -> dict:
    """Python, torch, the GPU and (modules=True) which required modules import, from a fresh interpreter."""
    code = PROBE_CUDA + (PROBE_MODULES % (REQUIRED,) if modules else "") + "print(json.dumps(d))\n"
    try:
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"cuda": False, "torch_error": f"probe failed: {e!r}", "missing": []}


def parse_pytest(res: Result) -> None:
    text = "\n".join(line for _, line in res.lines)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)", text)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    res.details = {"counts": counts, "failed": failed}
    res.summary = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "deselected") or "no test summary"
    if failed:
        res.summary += "; failed: " + ", ".join(f.split("::")[-1] for f in failed[:6])
    if res.status == "ok" and counts.get("passed", 0) == 0:
        res.status, res.summary = "skipped", f"no GPU test ran ({res.summary})"


def triton_broken(tests: Result, convmixer: Result) -> str | None:
    """Why the Triton kernels must not be used for the trainer steps, or None: a failed MMA-kernel or
    training-step test (the direct kernels are not what the trainer uses), or a failed patched model."""
    bad = [f for f in tests.details.get("failed", []) if "direct" not in f]
    if bad:
        return "GPU tests failed: " + ", ".join(f.split("::")[-1] for f in bad[:3])
    for name, m in convmixer.details.get("models", {}).items():
        if "error" in m.get("patched", {}).get("auto", {}):
            return f"the patched {name} ConvMixer failed in the convmixer step"
    return None


def parse_convmixer(res: Result, json_path: Path) -> None:
    if not json_path.exists():
        text = " ".join(line for _, line in res.lines[-3:])
        if "no CUDA" in text and res.status == "ok":
            res.status = "skipped"
        res.summary = res.summary or text[:200]
        return
    d = json.loads(json_path.read_text())
    res.details = d
    rows = []
    for name, m in d.get("models", {}).items():
        spec = m["spec"]
        label = f"{spec['dim']}/{spec['depth']} {spec['img']} px b{m['batch']}"
        pat = m.get("patched", {}).get("auto", {})
        if "stock_img_s" in m:
            tri = f"triton {pat['img_s']:,.0f} (x{pat['ratio']:.2f})" if "img_s" in pat else \
                f"triton FAILED ({pat.get('error', '?')[:60]})"
            rows.append(f"{label}: torch {m['stock_img_s']:,.0f} img/s, {tri}")
        ops = m.get("ops", {})
        op = ", ".join(f"{k} {v['fwd_bwd_ms']:.2f}" for k, v in ops.items() if "fwd_bwd_ms" in v)
        errs = [max(v["err_y"], v["err_dx"], v["err_dw"]) for k, v in ops.items() if k != "torch" and "err_y" in v]
        if op:
            rows.append(f"  dwconv fwd+bwd ms: {op}" + (f"; max rel err vs torch {max(errs):.1e}" if errs else ""))
        if errs and max(errs) > 5e-2:
            res.details.setdefault("warnings", []).append(f"{name}: a Triton kernel differs from torch by "
                                                          f"{max(errs):.1e} (relative)")
    res.summary = "\n".join(rows) or "no figures"
    cifar = d.get("models", {}).get("cifar", {}).get("patched", {}).get("auto", {})
    if "img_s" in cifar:
        res.details["goal_met"] = cifar["img_s"] >= GOALS["convmixer"]


def parse_stream(res: Result) -> None:
    rows = json_lines(res.lines, "ratio")
    if not rows:
        text = " ".join(line for _, line in res.lines[-2:])
        if "no CUDA" in text and res.status == "ok":
            res.status = "skipped"
        res.summary = res.summary or text[:200]
        return
    r = rows[-1]
    res.details = r
    res.details["goal_met"] = r["ratio"] >= GOALS["stream"]
    res.summary = (f"streaming {r['streaming_img_s']:,.0f} / in-memory {r['in_memory_img_s']:,.0f} img/s "
                   f"= {r['ratio']:.3f} (batch {r['batch_size']})")


def fit_epochs(budget_s: float, img_s: float, n_train: int, n_test: int, startup_s: float = 25.0) -> tuple[int, float]:
    """(epochs, seconds per epoch) that fit a wall budget: an epoch trains n_train images at img_s and
    evaluates n_test at ~3x that rate, plus ~1 s for the checkpoint and the plot."""
    epoch_s = n_train / img_s + n_test / (3 * img_s) + 1.0
    return max(1, min(300, int((budget_s - startup_s) / epoch_s))), epoch_s


def parse_train(res: Result) -> None:
    rows = json_lines(res.lines, "test_acc")
    stamps = [t for t, line in res.lines if line.strip().startswith("{") and '"test_acc"' in line]
    for r, t in zip(rows, stamps):
        r["wall_s"] = round(t, 1)
    res.details["epochs"] = rows
    if not rows:
        res.summary = res.summary or "no epoch finished"
        return
    last, best = rows[-1], max(r["test_acc"] or 0 for r in rows)
    planned = res.details.get("planned_epochs")
    res.summary = (f"{len(rows)}{'/' + str(planned) if planned else ''} epochs in {last['wall_s']:.0f} s: "
                   f"test acc {100 * (last['test_acc'] or 0):.2f} % (best {100 * best:.2f} %), "
                   f"train {sum(r['img_per_s'] for r in rows[1:] or rows) / len(rows[1:] or rows):,.0f} img/s")
    res.details["goal_met"] = best >= GOALS["accuracy"] and last["wall_s"] <= 60 * GOALS["accuracy_minutes"]


# ----------------------------------------------------------------------------- the run

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
        self.py = sys.executable
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", MPLBACKEND="Agg",
                        TRITON_CACHE_AUTOTUNING="1",
                        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                            os.pathsep) if p]))
        self.results = {name: Result(name) for name in STEPS}
        self.info: dict = {}
        self.smoke = args.smoke
        self.dev = args.device

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.args.total - self.elapsed()

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {msg}", flush=True)

    def step(self, name: str, cmd: list[str], timeout: float, env: dict | None = None, goal: str = "",
             quiet: bool = False) -> Result:
        res = self.results[name]
        res.goal = goal
        timeout = min(timeout, max(5.0, self.left()))
        if not quiet:
            self.say(f"{name}: started (timeout {timeout:.0f} s)")
        rc, res.seconds, res.lines = run_command(cmd, timeout, self.out / f"{name}.log", env or self.env)
        res.status = "ok" if rc == 0 else ("TIMEOUT" if rc is None else "FAIL")
        if rc is None:
            res.summary = f"stopped after {timeout:.0f} s"
        elif rc != 0:
            res.summary = f"exit code {rc}: " + (res.lines[-1][1][:150] if res.lines else "")
        return res

    def report(self, res: Result) -> None:
        self.say(f"{res.name}: {res.status} in {res.seconds:.0f} s: {res.summary.splitlines()[0] if res.summary else ''}")
        if res.status in ("FAIL", "TIMEOUT"):
            for _, line in res.lines[-25:]:
                print("    | " + line[:200])

    # -- the five steps

    def start_prepare(self) -> threading.Thread | None:
        sources, where = data_source(self.args)
        res = self.results["prepare"]
        res.goal = "-"
        if sources is None:
            res.summary = where
            return None
        res.details["source"] = where
        cmd = [self.py, str(Path(__file__).resolve()), "prepare-shards", "--work", str(self.work), "--source", *sources]
        if self.smoke:
            cmd += ["--limit", "384", "--shard-size", "128", "--workers", "1"]
        else:
            cmd += ["--workers", str(max(1, (os.cpu_count() or 2) - 2))]

        def go():
            self.step("prepare", cmd, 240)
            rows = json_lines(res.lines, "prepared")
            if rows:
                r = res.details["prepared"] = rows[-1]
                splits = ", ".join(f"{k} {v:,}" for k, v in r["prepared"].items())
                res.summary = (f"{splits} -> EtC block 16 JPEG q85 shards, {r['img_s']:,.0f} img/s "
                               f"(with verification), from {where}")
            self.report(res)

        th = threading.Thread(target=go)
        th.start()
        return th

    def tests(self) -> None:
        env = dict(self.env, ETC_DATA_DWCONV_AUTOTUNE="0")  # correctness only: no autotune compiles
        res = self.step("tests", [self.py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
                                  "tests/test_dwconv.py"], 150, env=env, goal="all pass")
        parse_pytest(res)
        self.report(res)

    def convmixer(self) -> None:
        path = self.work / "convmixer.json"
        path.unlink(missing_ok=True)
        res = self.step("convmixer", [self.py, "benchmarks/bench_convmixer_gpu.py", "--json", str(path)], 180,
                        goal=f"256/8 >= {GOALS['convmixer']:,.0f} img/s")
        parse_convmixer(res, path)
        self.report(res)

    def trainer_env(self) -> dict:
        why = triton_broken(self.results["tests"], self.results["convmixer"])
        if why is None:
            return self.env
        self.info["dwconv_fallback"] = f"the trainer steps ran with torch's conv (ETC_DATA_DWCONV_IMPL=torch): {why}"
        self.say(self.info["dwconv_fallback"])
        return dict(self.env, ETC_DATA_DWCONV_IMPL="torch")

    def shards_ready(self, name: str) -> bool:
        if self.results["prepare"].status == "ok":
            return True
        self.results[name].summary = "no shards: the prepare step did not finish"
        return False

    def stream(self) -> None:
        if not self.shards_ready("stream"):
            return
        cmd = [self.py, "benchmarks/bench_trainer.py", "--model", "convmixer", "--shards", str(self.work / "shards"),
               "--key", str(self.work / "owner.key")]
        cmd += (["--device", "cpu", "--tiny", "--batch-size", "32", "--steps", "4", "--workers", "1"] if self.smoke
                else ["--batch-size", "512", "--steps", "90", "--workers", "8"])
        res = self.step("stream", cmd, 120, env=self.trainer_env(), goal=f">= {GOALS['stream']}")
        parse_stream(res)
        self.report(res)

    def train_img_s(self) -> tuple[float, str]:
        """The img/s the epochs are planned with: the stream step's, else the convmixer step's, else a guess."""
        s = self.results["stream"].details.get("streaming_img_s")
        if s:
            return float(s), "stream step"
        c = self.results["convmixer"].details.get("models", {}).get("cifar", {}).get("patched", {}).get("auto", {})
        if c.get("img_s"):
            return 0.9 * c["img_s"], "convmixer step x 0.9"
        return 1500.0, "a guess (timm + cuDNN on an H100: 1,650 img/s)"

    def train(self) -> None:
        res = self.results["train"]
        res.goal = f">= {100 * GOALS['accuracy']:.1f} % in <= {GOALS['accuracy_minutes']} min (docs/gpu.md)"
        if not self.shards_ready("train"):
            return
        budget = min(self.args.train_budget, self.left() - 45)
        if budget < 30:
            res.summary = f"skipped: {self.left():.0f} s left of --total {self.args.total:.0f}"
            return
        manifest = json.loads((self.work / "shards" / "train" / "manifest.json").read_text())
        n_test = json.loads((self.work / "shards" / "test" / "manifest.json").read_text())
        n_train, n_test = manifest_samples(manifest), manifest_samples(n_test)
        img_s, basis = self.train_img_s()
        epochs, epoch_s = fit_epochs(budget, img_s, n_train, n_test)
        if self.args.train_epochs:
            epochs = self.args.train_epochs
        res.details.update(planned_epochs=epochs, budget_s=round(budget), planned_img_s=round(img_s), basis=basis,
                           epoch_s_estimate=round(epoch_s, 1))
        self.say(f"train: {epochs} epochs planned for a {budget:.0f} s budget ({img_s:,.0f} img/s from {basis})")
        out = self.work / "train"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        model = ["--dim", "32", "--depth", "2", "--kernel", "5", "--patch", "2"] if self.smoke else \
            ["--dim", "256", "--depth", "8", "--kernel", "9", "--patch", "1"]
        cmd = [self.py, "-m", "etc_data.cli", "train", "--shards", str(self.work / "shards" / "train"),
               "--test-shards", str(self.work / "shards" / "test"), "--trust", str(self.work / "owner.pub"),
               "--model", "convmixer", *model, "--epochs", str(epochs), "--out", str(out),
               "--device", self.dev, *(["--batch-size", "32", "--workers", "1"] if self.smoke else
                                       ["--batch-size", "512", "--workers", "6"])]
        res.details["command"] = " ".join(cmd)
        self.step("train", cmd, budget + 90, env=self.trainer_env(), goal=res.goal, quiet=True)
        parse_train(res)
        for name in ("metrics.jsonl", "curves.png"):
            if (out / name).exists():
                shutil.copy(out / name, self.out / name)
        self.report(res)

    # -- the table

    def table(self) -> str:
        i = self.info
        head = (f"== gpu_check: {i.get('gpu', 'no GPU')}, torch {i.get('torch', '?')}, triton {i.get('triton', '?')}, "
                f"timm {i.get('timm', '?')}, python {i.get('python', '?')}, {i.get('cpus', '?')} cpus; "
                f"{self.elapsed():.0f} s in all{' (SMOKE: tiny CPU run, figures mean nothing)' if self.smoke else ''}")
        lines = [head, f"{'step':<10} {'status':<8} {'time':>6}  result", "-" * 110]
        for r in self.results.values():
            text = (r.summary or "-").splitlines() or ["-"]
            lines.append(f"{r.name:<10} {r.status:<8} {r.seconds:5.0f}s  {text[0]}")
            lines += [f"{'':<27}{t}" for t in text[1:]]
            if r.goal and r.goal != "-":
                met = None if self.smoke else r.details.get("goal_met")
                mark = "" if met is None else ("  [met]" if met else "  [NOT met]")
                lines.append(f"{'':<27}goal: {r.goal}{mark}")
        epochs = self.results["train"].details.get("epochs") or []
        if epochs:
            lines += ["", "train: test accuracy against wall time (since the trainer started)",
                      f"  {'epoch':>5} {'wall s':>7} {'img/s':>8} {'loss':>6} {'test acc':>9}"]
            pick = epochs if len(epochs) <= 40 else [epochs[k * (len(epochs) - 1) // 39] for k in range(40)]
            lines += [f"  {r['epoch'] + 1:5d} {r['wall_s']:7.1f} {r['img_per_s']:8,.0f} {r['train_loss']:6.3f} "
                      f"{100 * (r['test_acc'] or 0):8.2f}%" for r in pick]
        notes = [i[k] for k in ("missing_note", "dwconv_fallback") if i.get(k)]
        notes += [w for r in self.results.values() for w in r.details.get("warnings", [])]
        if notes:
            lines += [""] + [f"note: {n}" for n in notes]
        return "\n".join(lines)

    def finish(self) -> int:
        text = self.table()
        doc = {"info": self.info, "total_s": round(self.elapsed(), 1), "smoke": self.smoke, "table": text,
               "steps": {n: {k: v for k, v in asdict(r).items() if k != "lines"} for n, r in self.results.items()}}
        (self.out / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
        print("\n" + text, flush=True)
        return 0

    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.info = probe(self.py, self.env, modules=False)
        if self.dev == "cuda" and not self.info.get("cuda"):
            print(f"gpu_check: no GPU: no CUDA device is visible to torch "
                  f"({self.info.get('torch_error') or 'torch ' + str(self.info.get('torch')) + ': cuda unavailable'}); "
                  f"nothing was run (use --smoke --device cpu for the tiny CPU run).", flush=True)
            for r in self.results.values():
                r.summary = "not run: no GPU"
            return self.finish()
        self.info = probe(self.py, self.env, modules=True)
        if self.info.get("missing"):
            self.info["missing_note"] = ("missing modules: " + ", ".join(self.info["missing"]) +
                                         " (benchmarks/gpu_carry.sh puts their wheels in carry/wheels)")
        only = set(self.args.only.split(",")) if self.args.only else set(STEPS)
        if only & {"stream", "train"}:
            only.add("prepare")
        for r in self.results.values():
            if r.name not in only:
                r.summary = "not selected (--only)"
        self.say(f"gpu_check on {self.info.get('gpu', self.dev)}: steps {', '.join(s for s in STEPS if s in only)}; "
                 f"outputs in {self.out}")
        try:
            prep = self.start_prepare() if "prepare" in only else None
            if "tests" in only:
                self.tests()
            if prep is not None:
                prep.join()  # before the timed benchmarks: preparing takes every core
            for name in ("convmixer", "stream", "train"):
                if name in only:
                    getattr(self, name)()
        except Exception as e:  # the table is printed whatever happened
            self.info["driver_error"] = f"{type(e).__name__}: {e}"
            self.say(f"gpu_check driver error: {self.info['driver_error']}")
        return self.finish()


def manifest_samples(manifest: dict) -> int:
    return sum(int(s["samples"]) for s in manifest["shards"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total", type=float, default=480, help="wall seconds for everything (default 480)")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(STEPS))
    p.add_argument("--train-budget", type=float, default=240, help="wall seconds for the train step (default 240; "
                                                                     "less when --total leaves less)")
    p.add_argument("--train-epochs", type=int, help="epochs for the train step (default: fit --train-budget)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"),
                   help="logs, summary.json, metrics.jsonl, curves.png (default $OUT, else runs/gpu_check)")
    p.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "etc-gpu-check"),
                   help="shards, key, training run (default $TMPDIR/etc-gpu-check)")
    p.add_argument("--data", help="folder holding cifar10-train-jpeg.zip and cifar10-test-jpeg.zip, or the "
                                  "cifar10-jpeg.tar.xz of gpu_carry.sh")
    p.add_argument("--carry", default=str(REPO / "carry"), help="what gpu_carry.sh filled (default carry/)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (with --device cpu: a CPU run of every step)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu is only for the tiny --smoke run")
    if args.smoke and args.train_epochs is None:
        args.train_epochs = 2
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare-shards"]:
        return prepare_shards(argv[1:])
    if argv[:1] == ["pack-data"]:
        print(json.dumps(pack_data([Path(z) for z in argv[2:]], Path(argv[1]))))
        return 0
    if argv[:1] == ["unpack-data"]:
        print(json.dumps(unpack_data(Path(argv[1]), Path(argv[2]))))
        return 0
    return Run(parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
