"""``python -m bench --gpu``: the GPU check of issue 18 in one time-boxed run (about 8 minutes on an H100/H200).

Stages, in order, each with its own time limit inside the run's budget (``--budget``, default 480 s); every stage's
results are written as soon as it ends, so a run cut short still reports what it measured:

1. **setup**: installs the carried wheels (``bench/wheels``: diffusers, transformers, the reference ``sdnq`` ... for a
   machine with torch and Triton but no network) into a private folder with ``pip --no-index``;
2. **machine**: GPU, driver, torch, Triton and library versions;
3. **bit-exact**: every integer width, every float code type and the layout variants decoded by the Triton kernels
   against the torch codec on the same GPU (and the GPU codec against the CPU one), in parallel processes;
4. **GPU tests** (in the background during 3-5): the CUDA-marked tests of the suite (Triton kernels, CUDA graphs,
   offloaded tiny pipelines in every mode against the plain pipeline, quantizing on the GPU);
5. **quantize**: the FLUX.2-Klein-4B-shaped transformer (seeded random weights) quantized by this package's writer
   layer by layer on the GPU (model on the CPU), uint4 + SVD rank 32, saved;
6. **forward**: at 4096 + 512 tokens in bfloat16, each implementation in its own process: dense (eager and
   ``compile_repeated_blocks``), ours (eager, compiled, group offloading with a CUDA stream) and the reference
   ``sdnq`` (its compiled dequantizer, eager and compiled), forward time, peak VRAM, output difference;
7. **extras** while time is left: ours with ``svd=weight``, the reference without torch.compile, an int8 checkpoint
   (written with ``use_quantized_matmul``) with the quantized-matmul forward where this package has one
   (:data:`OURS_EXTRA_MODES`).

The report goes to ``bench/RESULTS-gpu.md`` and, when ``$OUT`` is set (the device tool), to ``$OUT`` with the raw
JSON and the log. ``--dry-run`` runs every stage on the CPU with the tiny model, Triton's interpreter and short
limits (what ``tests/test_bench_smoke.py`` checks). ``--download-wheels`` fills ``bench/wheels`` (needs network).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "bench" / "wheels"

#: What the GPU image lacks (or has too old) for this package, the reference and the tests, pinned to the versions
#: the project is tested with. torch, Triton, numpy, Pillow, PyYAML, safetensors, tokenizers, psutil, tqdm,
#: packaging, filelock, fsspec, requests, typer and pytest are on the image and are not carried.
WHEEL_PINS = (
    "diffusers==0.42.1", "transformers==5.25.0", "huggingface_hub==2.4.0", "accelerate==1.16.0", "peft==0.21.2",
    "sdnq==0.2.8", "importlib_metadata==10.2.0", "zipp==4.1.2", "httpx2==2.16.2", "httpcore2==2.16.2",
    "truststore==0.10.5", "idna==3.20", "anyio==4.16.0", "h11==0.16.0", "kernels==0.19.1", "tomlkit==0.15.3",
    "click==8.5.1", "hf_xet==1.8.0", "regex==2026.11.19", "typing_extensions==4.16.0",
)
#: The GPU image's Python (KINDS.md: 3.12) and platforms, for ``pip download``.
WHEEL_TARGET = ("--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64")

#: Extra modes of our forward, run when the installed package has the option (name, ForwardOptions field, mode).
#: The quantized matmul (issue 17) plugs in here: the int8 checkpoint is written with use_quantized_matmul.
OURS_EXTRA_MODES = (
    ("quantized_matmul", "options:quantized_matmul=true"),
)

TOKENS = (4096, 512)


def download_wheels(target: Path = WHEELS) -> int:
    """Fill ``bench/wheels`` with :data:`WHEEL_PINS` for the GPU image (run where pip reaches an index)."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *WHEEL_TARGET,
           "-d", str(target), *WHEEL_PINS]
    proc = subprocess.run(cmd)
    if proc.returncode == 0:
        total = sum(f.stat().st_size for f in target.glob("*.whl"))
        print(f"{len(list(target.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {target}")
    return proc.returncode


# ---------------------------------------------------------------------------------------------------------- runner
class Runner:
    """Budget, child processes, incremental results and the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.time()
        self.deadline = self.started + args.budget
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        self.results: dict = {"stages": {}, "argv": args.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.site = self.work / "site"
        self.log_path = (self.out or self.work) / "bench-gpu.log"
        self.log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    def log(self, msg: str) -> None:
        line = f"[bench-gpu {time.time() - self.started:6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def remaining(self) -> float:
        return self.deadline - time.time()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        paths = [str(ROOT / "src"), str(ROOT)]
        if self.site.is_dir():
            paths.append(str(self.site))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_SDNQ_AUTOLOAD": "0",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
               "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
               "DIFFUSERS_SDNQ_CACHE": str(self.work / "cache"), "DIFFUSERS_SDNQ_TEST_CACHE": str(self.work / "tests"),
               "SDNQ_USE_TORCH_COMPILE": "0"}
        if self.args.dry_run:
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        env.update(extra or {})
        return env

    def spawn(self, args: list[str], env: dict[str, str] | None = None, log_name: str = "child") -> subprocess.Popen:
        err = open(self.work / f"{log_name}.stderr", "w", encoding="utf-8")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen([sys.executable, *args], cwd=str(ROOT), env=self.env(env), stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        proc.log_name = log_name  # type: ignore[attr-defined]
        return proc

    def collect(self, proc: subprocess.Popen, timeout: float) -> dict:
        """Wait up to ``timeout`` s; on time out stop the child (and its children). Returns its JSON lines, exit
        code, whether it timed out, and the end of its stderr."""
        timed_out = False
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                proc.kill()
            stdout, _ = proc.communicate()
        records = []
        for line in (stdout or "").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        err_file = self.work / f"{proc.log_name}.stderr"  # type: ignore[attr-defined]
        tail = err_file.read_text(encoding="utf-8", errors="replace")[-3000:] if err_file.is_file() else ""
        return {"records": records, "rc": proc.returncode, "timed_out": timed_out, "stderr_tail": tail}

    def run_child(self, args: list[str], timeout: float, env: dict[str, str] | None = None,
                  log_name: str = "child") -> dict:
        return self.collect(self.spawn(args, env, log_name), timeout)

    def stage(self, name: str, fn, cap: float, minimum: float = 10.0) -> None:
        budget = min(cap, self.remaining())
        if budget < minimum:
            self.results["stages"][name] = {"status": "skipped", "why": f"out of time ({self.remaining():.0f} s left)"}
            self.log(f"{name}: skipped (out of time)")
            self.save()
            return
        self.log(f"{name}: start (limit {budget:.0f} s)")
        t0 = time.time()
        try:
            info = fn(self, budget) or {}
            status = info.pop("status", "done")
        except Exception as exc:  # one stage's failure must not lose the others
            import traceback

            info, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}, \
                "failed"
        info.update(status=status, seconds=round(time.time() - t0, 1))
        self.results["stages"][name] = info
        self.log(f"{name}: {status} in {info['seconds']} s")
        self.save()

    def save(self) -> None:
        data = json.dumps(self.results, indent=1, default=str)
        report = render(self.results, self.args)
        targets = [(self.work / "results-gpu.json", data), (Path(self.args.results), report)]
        if self.out is not None:
            targets += [(self.out / "results-gpu.json", data), (self.out / "RESULTS-gpu.md", report)]
        for path, text in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)

    def finish(self) -> None:
        self.results["wall_s"] = round(time.time() - self.started, 1)
        self.save()
        self.log(f"report written to {self.args.results}" + (f" and {self.out}" if self.out else ""))
        self.log_file.close()


# ---------------------------------------------------------------------------------------------------------- stages
def setup(r: Runner, budget: float) -> dict:
    wheels = sorted(WHEELS.glob("*.whl"))
    if r.args.dry_run or r.args.no_install:
        return {"installed": [], "note": "using the current environment"}
    if not wheels:
        probe = subprocess.run([sys.executable, "-c", "import diffusers, sdnq, transformers"], env=r.env(),
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return {"installed": [], "note": "no bench/wheels; diffusers, transformers and sdnq already importable"}
        raise RuntimeError("bench/wheels is empty and diffusers/transformers/sdnq are not installed: run "
                           "`python -m bench.gpu --download-wheels` where pip reaches an index, and carry bench/wheels")
    deadline = time.time() + budget

    def install(batch: list[Path]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(r.site), *map(str, batch)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, deadline - time.time()))

    proc = install(wheels)
    skipped: list[str] = []
    if proc.returncode != 0:  # e.g. a wheel built for another Python: install the others, report that one
        r.log(f"setup: pip install of all wheels failed, installing one by one:\n{proc.stderr[-1500:]}")
        for wheel in wheels:
            if install([wheel]).returncode != 0:
                skipped.append(wheel.name)
    info = {"installed": [w.name for w in wheels if w.name not in skipped],
            "megabytes": round(sum(w.stat().st_size for w in wheels) / 2**20, 1)}
    if skipped:
        info.update(status="partial", not_installed=skipped)
    return info


def machine(r: Runner, budget: float) -> dict:
    res = r.run_child(["-m", "bench.gpu_child", "machine"], budget, log_name="machine")
    if not res["records"]:
        raise RuntimeError(f"machine probe failed (rc {res['rc']}): {res['stderr_tail']}")
    info = res["records"][0]
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or "unknown"
    except OSError:
        info["commit"] = "unknown"
    r.results["machine"] = info
    return {"status": "done" if info.get("gpu") or r.args.dry_run else "no GPU"}


def start_tests(r: Runner) -> subprocess.Popen | None:
    """The CUDA-marked tests, in the background: fixtures built first (the reference quantizes tiny models). The
    pytest output goes to ``tests.log`` (in ``$OUT`` when set) as it runs, so a run cut short still shows it."""
    if r.args.dry_run or r.args.no_tests:
        return None
    log = (r.out or r.work) / "tests.log"
    script = ("import json, os, subprocess, sys\n"
              "root = os.path.join(os.environ['DIFFUSERS_SDNQ_TEST_CACHE'], 'models')\n"
              f"log = open({str(log)!r}, 'w')\n"
              "b = subprocess.run([sys.executable, 'tests/tiny_models.py', root, 'flux2_klein', 'zimage', "
              "'--variants', 'dense', 'uint4_svd', 'dynamic'], stdout=log, stderr=subprocess.STDOUT)\n"
              "files = ['tests/test_triton_decode.py', 'tests/test_compile.py', 'tests/test_offload.py', "
              "'tests/test_writer_devices.py', 'tests/test_loading.py']\n"
              "log.flush()\n"
              "t = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rA', "
              "'-k', 'cuda', *files], stdout=log, stderr=subprocess.STDOUT)\n"
              "print(json.dumps({'fixtures_rc': b.returncode, 'rc': t.returncode}), flush=True)\n")
    proc = r.spawn(["-c", script], log_name="tests")
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def bit_exact(r: Runner, budget: float) -> dict:
    shards = 1 if r.args.dry_run else max(1, min(8, (os.cpu_count() or 2) // 2))
    device = "cpu" if r.args.dry_run else "cuda"
    extra = ["6"] if r.args.dry_run else []
    procs = [r.spawn(["-m", "bench.gpu_child", "bitexact", str(i), str(shards), device, *extra],
                     log_name=f"bitexact{i}") for i in range(shards)]
    deadline = time.time() + budget
    cases, decoders, problems = [], [], []
    for proc in procs:
        res = r.collect(proc, deadline - time.time())
        for rec in res["records"]:
            (decoders if "decoder" in rec else cases).append(rec)
        if res["timed_out"] or res["rc"] != 0:
            problems.append(f"{proc.log_name}: rc {res['rc']}{' (timed out)' if res['timed_out'] else ''} "
                            f"{res['stderr_tail'][-800:]}")
    r.results["bit_exact"] = {"cases": cases, "decoders": decoders, "problems": problems}
    checks = [v for c in cases for v in c.get("results", {}).values()]
    ok = bool(checks) and all(v["kernel"] and v["kernel_eq_torch"] for v in checks) and \
        not any("error" in c for c in cases)
    return {"status": "done" if ok and not problems else "problems", "cases": len(cases), "checks": len(checks)}


def _spec(r: Runner, **kw) -> dict:
    base = {"size": "quick" if r.args.dry_run else "klein-full", "tokens": None if r.args.dry_run else TOKENS,
            "device": "cpu" if r.args.dry_run else "cuda", "seed": 0, "outputs": str(r.work / "outputs"),
            "warmup": 1 if r.args.dry_run else 2, "iters": 2 if r.args.dry_run else r.args.iters}
    base.update(kw)
    return base


def quantize(r: Runner, budget: float, variant: str = "uint4_svd") -> dict:
    spec = _spec(r, out=str(r.work / "checkpoints"), variants=[variant])
    res = r.run_child(["-m", "bench.gpu_child", "build", json.dumps(spec)], budget, log_name=f"build-{variant}")
    if not res["records"]:
        raise RuntimeError(f"quantizing {variant} failed (rc {res['rc']}, timed out {res['timed_out']}): "
                           f"{res['stderr_tail']}")
    r.results.setdefault("checkpoints", {})[variant] = res["records"][0]
    return dict(res["records"][0])


def _measure(r: Runner, budget: float, label: str, impl: str, modes: list[str], variant: str | None = None,
             env: dict | None = None, fullgraph: bool = True) -> dict:
    if r.args.dry_run:  # the reference's own torch.compile on a CPU would take minutes
        env = {**(env or {}), "SDNQ_USE_TORCH_COMPILE": "0"}
    spec = _spec(r, impl=impl, label=label, modes=modes, env=env or {}, fullgraph=fullgraph,
                 path=str(r.work / "checkpoints" / variant) if variant else None)
    if r.args.dry_run and "compiled" in modes:
        spec["backend"] = "eager"  # the dry run checks the plumbing, not Inductor's compile time
    res = r.run_child(["-m", "bench.gpu_child", "measure", json.dumps(spec)], budget, env=env,
                      log_name=f"measure-{label}")
    for rec in res["records"]:
        rec["variant"] = variant or "dense"
    r.results.setdefault("forward", []).extend(res["records"])
    done = {rec["mode"] for rec in res["records"]}
    missing = [m for m in modes if m not in done]
    info = {"modes": sorted(done), "errors": [f"{x['mode']}: {x['error']}" for x in res["records"] if "error" in x]}
    if missing:
        info["missing"] = missing
        info["why"] = "timed out" if res["timed_out"] else f"rc {res['rc']}: {res['stderr_tail'][-1500:]}"
    info["status"] = "done" if not missing and not info["errors"] else "partial"
    return info


def wait_tests(r: Runner, proc: subprocess.Popen | None, budget: float) -> dict:
    if proc is None:
        return {"status": "skipped", "why": "dry run" if r.args.dry_run else "--no-tests"}
    res = r.collect(proc, budget)
    rec = res["records"][0] if res["records"] else {}
    log = Path(proc.log_file)  # type: ignore[attr-defined]
    summary = log.read_text(encoding="utf-8", errors="replace")[-6000:] if log.is_file() else ""
    r.results["tests"] = {"timed_out": res["timed_out"], **rec, "summary": summary,
                          "stderr_tail": res["stderr_tail"][-1500:]}
    if res["timed_out"]:
        return {"status": "timed out"}
    return {"status": "passed" if rec.get("rc") == 0 else f"failed (pytest rc {rec.get('rc')})"}


def has_option(name: str, r: Runner) -> bool:
    code = ("import dataclasses, sys; from diffusers_sdnq.layers.forward import ForwardOptions; "
            f"sys.exit(0 if {name!r} in {{f.name for f in dataclasses.fields(ForwardOptions)}} else 1)")
    return subprocess.run([sys.executable, "-c", code], env=r.env(), capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------------------- report
def _f(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _rel_l2(a_file: str, b_file: str) -> float | None:
    try:
        import torch

        a, b = torch.load(a_file), torch.load(b_file)
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    except Exception:
        return None


def render(res: dict, args: argparse.Namespace) -> str:
    m = res.get("machine", {})
    wall = f", wall time {res['wall_s']} s" if "wall_s" in res else ""
    lines = ["# GPU results (issue 18)", "",
             f"`python -m bench --gpu {' '.join(args.argv)}` on commit `{m.get('commit', '?')}`, started "
             f"{res.get('started')}{wall}."
             + (" **Dry run on CPU** (tiny model, Triton interpreter): plumbing only, no GPU figures."
                if args.dry_run else ""), "",
             "## Machine", "",
             f"- GPU: {m.get('gpu', 'none')} ({m.get('gpu_memory_gib', '-')} GiB, compute capability "
             f"{m.get('capability', '-')}, {m.get('multiprocessors', '-')} SMs); nvidia-smi: {m.get('nvidia_smi', '-')}",
             f"- Python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('cuda')}), Triton {m.get('triton')}; "
             f"diffusers {m.get('diffusers')}, transformers {m.get('transformers')}, accelerate {m.get('accelerate')}, "
             f"sdnq (reference) {m.get('sdnq')}; {m.get('cpu_count')} CPU cores", "",
             "## Stages", "", "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, info in res.get("stages", {}).items():
        notes = {k: v for k, v in info.items() if k not in ("status", "seconds", "traceback")}
        text = json.dumps(notes, default=str)[:400].replace("|", "/")
        lines.append(f"| {name} | {info.get('status')} | {info.get('seconds', '-')} | {text} |")
    lines += ["", *render_bit_exact(res), "", *render_forward(res), "", *render_tests(res), ""]
    return "\n".join(lines)


def render_bit_exact(res: dict) -> list[str]:
    be = res.get("bit_exact")
    if not be:
        return ["## Bit-exactness", "", "not run"]
    cases = be["cases"]
    checks = [(c, dt, v) for c in cases for dt, v in c.get("results", {}).items()]
    good = [x for x in checks if x[2]["kernel"] and x[2]["kernel_eq_torch"]]
    bad = [x for x in checks if not (x[2]["kernel"] and x[2]["kernel_eq_torch"])]
    cross = [x for x in checks if not x[2]["torch_device_eq_cpu"]]
    fused = {json.dumps(d.get("decoder")) for d in be.get("decoders", [])}
    lines = ["## Bit-exactness: Triton kernels vs the torch codec on the same device", "",
             f"{len(cases)} layers ({len({c['weights_dtype'] for c in cases})} weight types, per row and grouped, "
             f"plus layout variants), {len(checks)} (layer, output dtype) checks: **{len(good)} bit-exact**, "
             f"{len(bad)} not. Decoder chosen by the self-check: {', '.join(sorted(fused))}. "
             f"torch codec on the GPU vs on the CPU: {len(checks) - len(cross)} equal, {len(cross)} differ "
             "(the CPU's own rounding of the multiply-add; not a kernel property)."]
    if bad:
        lines += ["", "| layer | dtype | kernel ran | equal |", "|---|---|---|---|"]
        lines += [f"| {c['case']} | {dt} | {v['kernel']} | {v['kernel_eq_torch']} |" for c, dt, v in bad[:60]]
    errors = [c for c in cases if "error" in c]
    if errors:
        lines += ["", "Errors: " + "; ".join(f"{c['case']}: {c['error']}" for c in errors[:20])]
    if be.get("problems"):
        lines += ["", "Child problems: " + " / ".join(p[:300] for p in be["problems"])]
    return lines


def render_forward(res: dict) -> list[str]:
    rows = res.get("forward", [])
    ck = res.get("checkpoints", {})
    lines = ["## Forward: FLUX.2-Klein-4B-shaped transformer (5 + 20 blocks), 4096 + 512 tokens, bfloat16", ""]
    for variant, info in ck.items():
        lines.append(f"- checkpoint `{variant}` {json.dumps(info.get('options', {}))}: "
                     f"{_gib(info.get('disk_bytes'))} GiB on disk, quantized on the GPU in "
                     f"{_f(info.get('quantize_s'), '{:.1f}')} s (peak VRAM while quantizing "
                     f"{_gib(info.get('quantize_peak_vram'))} GiB), {info.get('quantized_layers', '-')} layers")
    if not rows:
        return [*lines, "", "not measured"]
    dense = next((x for x in rows if x["impl"] == "dense" and x["mode"] == "eager" and "forward_s" in x), None)
    lines += ["", "| impl | checkpoint | mode | forward ms (median) | / dense eager | peak VRAM GiB | weights GiB "
              "| rel L2 vs dense | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if "forward_s" not in x:
            lines.append(f"| {x['label']} | {x.get('variant')} | {x['mode']} | - | - | - | - | - | "
                         f"{x.get('error', '')[:200]} |")
            continue
        ratio = x["forward_s"] / dense["forward_s"] if dense else None
        rel = _rel_l2(x["output"], dense["output"]) if dense and x.get("output") else None
        notes = []
        if "equal_to_eager" in x:
            notes.append(f"equal to its eager output: {x['equal_to_eager']} (max |diff| {x['max_abs_vs_eager']:.2e})")
        lines.append(f"| {x['label']} | {x.get('variant')} | {x['mode']} | {1000 * x['forward_s']:.1f} "
                     f"| {_f(ratio, '{:.2f}')} | {_gib(x.get('peak'))} | {_gib(x.get('weights_bytes'))} "
                     f"| {_f(rel, '{:.2e}')} | {'; '.join(notes)} |")
    lines += ["", "### Goals of issue 18 (this run)", "", *goals(rows, ck)]
    return lines


def goals(rows: list[dict], ck: dict) -> list[str]:
    def get(label: str, mode: str, variant: str = "uint4_svd") -> dict | None:
        return next((x for x in rows if x["label"] == label and x["mode"] == mode and "forward_s" in x
                     and (x.get("variant") == variant or label == "dense")), None)

    out = []
    dense, ours, ours_c = get("dense", "eager"), get("ours", "eager"), get("ours", "compiled")
    ref_c = get("reference", "compiled") or get("reference", "eager")
    best = min((x for x in (ours, ours_c) if x), key=lambda x: x["forward_s"], default=None)
    if dense and best:
        ratio = best["forward_s"] / dense["forward_s"]
        out.append(f"- ours ({best['mode']}) / dense bf16 eager: {ratio:.2f} (goal <= 1.10) "
                   f"{'met' if ratio <= 1.10 else 'NOT met'}")
    if ref_c and best:
        ratio = best["forward_s"] / ref_c["forward_s"]
        out.append(f"- ours ({best['mode']}) / reference ({ref_c['mode']}, its compiled dequantizer): {ratio:.2f} "
                   f"(goal <= 1.00) {'met' if ratio <= 1.0 else 'NOT met'}")
    info = ck.get("uint4_svd", {})
    if ours and dense and info.get("disk_bytes") and ours.get("peak") and dense.get("peak"):
        activations = dense["peak"] - (dense.get("weights_bytes") or 0)
        limit = info["disk_bytes"] + activations + 2 * info.get("largest_layer_numel", 0)
        out.append(f"- ours peak VRAM {_gib(ours['peak'])} GiB vs checkpoint {_gib(info['disk_bytes'])} + activations "
                   f"{_gib(activations)} + one dense layer {_gib(2 * info.get('largest_layer_numel', 0))} = "
                   f"{_gib(limit)} GiB: {'met' if ours['peak'] <= limit else 'NOT met'}")
    off = get("ours", "group_offload")
    if off and ours:
        out.append(f"- group offloading (block level, CUDA stream): output equal to the resident model's: "
                   f"{off.get('equal_to_eager')}; peak VRAM {_gib(off.get('peak'))} GiB; "
                   f"{off['forward_s'] / ours['forward_s']:.2f}x its forward time")
    return out or ["- not measured"]


def render_tests(res: dict) -> list[str]:
    t = res.get("tests")
    if not t:
        return ["## GPU tests", "", "not run"]
    summary = t.get("summary", "")
    tail = "\n".join(summary.strip().splitlines()[-40:])
    return ["## GPU tests (`pytest -k cuda`: Triton kernels, CUDA graphs, offloaded pipelines, quantizing on the GPU)",
            "", f"fixtures rc {t.get('fixtures_rc')}, pytest rc {t.get('rc')}, timed out: {t.get('timed_out')}", "",
            "```", tail or t.get("stderr_tail", ""), "```"]


# ---------------------------------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --gpu", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    p.add_argument("--iters", type=int, default=5, help="timed forwards per mode")
    p.add_argument("--workdir", default=None, help="checkpoints, outputs, logs (default: a temporary folder)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-gpu.md"))
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny model, short limits")
    p.add_argument("--no-install", action="store_true", help="use the current environment, not bench/wheels")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA-marked tests")
    p.add_argument("--download-wheels", action="store_true", help="fill bench/wheels (needs network) and exit")
    args = p.parse_args(argv)
    args.argv = argv
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="sdnq-bench-gpu-")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if args.download_wheels:
        return download_wheels()
    r = Runner(args)
    r.stage("setup", setup, cap=120)
    r.stage("machine", machine, cap=60)
    tests = start_tests(r) if r.results["stages"].get("setup", {}).get("status") in ("done", "partial") else None
    r.stage("bit-exact", bit_exact, cap=120)
    r.stage("quantize", lambda rr, b: quantize(rr, b, "uint4_svd"), cap=180)
    ready = r.results["stages"].get("quantize", {}).get("status") == "done"
    # timing only once the background tests are done (they share the GPU): wait for them, up to a limit
    r.stage("gpu-tests", lambda rr, b: wait_tests(rr, tests, b), cap=120 if not args.dry_run else 5, minimum=1)
    # a dry run compiles only ours (with the eager backend): the other compiled modes are the same code path
    both = ["eager"] if args.dry_run else ["eager", "compiled"]
    r.stage("dense", lambda rr, b: _measure(rr, b, "dense", "dense", both), cap=120)
    if ready:
        r.stage("ours", lambda rr, b: _measure(rr, b, "ours", "ours", ["eager", "compiled", "group_offload"],
                                               "uint4_svd"), cap=150)
        r.stage("reference", lambda rr, b: _measure(rr, b, "reference", "reference", both, "uint4_svd",
                                                    env={"SDNQ_USE_TORCH_COMPILE": "1"}, fullgraph=False), cap=150)
        if not args.dry_run:  # the same code paths as above: only worth their time on a GPU
            r.stage("ours-exact", lambda rr, b: _measure(rr, b, "ours-exact", "ours", ["options:svd=weight"],
                                                         "uint4_svd"), cap=60)
            r.stage("reference-eager", lambda rr, b: _measure(rr, b, "reference-nocompile", "reference", ["eager"],
                                                              "uint4_svd"), cap=60)
    if not args.dry_run:
        r.stage("quantize-int8", lambda rr, b: quantize(rr, b, "int8"), cap=90)
    if r.results["stages"].get("quantize-int8", {}).get("status") == "done":
        extra = [mode for option, mode in OURS_EXTRA_MODES if has_option(option, r)]
        r.stage("ours-int8", lambda rr, b: _measure(rr, b, "ours", "ours", ["eager", *extra], "int8"), cap=60)
        if not args.dry_run:
            r.stage("reference-int8", lambda rr, b: _measure(rr, b, "reference", "reference", ["eager"], "int8",
                                                             env={"SDNQ_USE_TORCH_COMPILE": "1"}), cap=60)
    r.finish()
    failed = [n for n, s in r.results["stages"].items() if s.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
