"""Benchmark: dense vs the reference ``sdnq`` 0.2.8 vs ours on a FLUX.2-Klein-shaped transformer slice.

``python -m bench`` (or ``python bench/run.py``) builds the dense model (seeded random weights), quantizes it with
the reference in a child process (uint4 + SVD r32, dynamic mixed widths, int8), then measures each
(implementation, model dtype) in its own fresh interpreter: forward latency (median of ``--iters`` after
``--warmup``), time to first forward from ``from_pretrained``, peak RSS above the pre-load baseline during load and
during forward, bytes on disk, and the output's difference from the bfloat16 dense output. It prints ratios
(ours / reference, ours / dense) and writes them, with the machine description, to ``bench/RESULTS.md``.

Timings on shared machines are noisy: compare ratios from one run only, never across runs.
``--quick`` runs a tiny model in well under a minute (CI smoke run; its table goes to the work dir, not RESULTS.md).
``--gpu`` runs the GPU check instead (:mod:`bench.gpu`: ``python -m bench --gpu --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("dense", "reference", "ours", "ours-exact", "reference-qmm", "ours-qmm", "ours-qmm-cache")
#: Environment of each quantized implementation's child ("ours-exact": our bit-exact forward, SVD added to the
#: weight as the reference does; "ours" runs the default, SVD as a low-rank branch on the activations;
#: "*-qmm": the quantized matmul switched on after loading, "ours-qmm-cache" keeping re-quantized int8 codes).
IMPL_ENV = {"ours-exact": {"DIFFUSERS_SDNQ_FORWARD": "svd=weight"},
            "ours-qmm-cache": {"DIFFUSERS_SDNQ_FORWARD": "quantized_matmul_cache=1"}}
#: Variants each "switched on after loading" implementation runs on (issue 17: uint4 + SVD with the option on; on
#: int8_qmm, saved with it, switching on changes nothing, and ours-qmm-cache packs the int8 codes at once instead of
#: after a few forwards).
QMM_SWITCH_VARIANTS = ("uint4_svd", "int8_qmm")
DTYPES = ("float32", "bfloat16")
VARIANTS = ("uint4_svd", "dynamic", "int8", "int8_qmm")
FORMAT_VERSION = 2  # bump when the model builder or the quantization variants change


def _env() -> dict[str, str]:
    # DIFFUSERS_SDNQ_AUTOLOAD=0: our start-up hook would otherwise load the reference's checkpoints with *our*
    # layers in the reference's child; ours imports diffusers_sdnq explicitly
    env = {**os.environ, "DIFFUSERS_SDNQ_AUTOLOAD": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


#: OpenMP wait policy of every child. PASSIVE: with other jobs on the cores, spinning OpenMP workers made a tiny
#: 2-thread forward 60x slower (0.6 s instead of 10 ms) on the 2-core development machine.
OMP_WAIT_POLICY = "PASSIVE"


def _python(args: list[str], threads: int, timeout: float, extra_env: dict[str, str] | None = None) -> str:
    env = {**_env(), "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": OMP_WAIT_POLICY, **(extra_env or {})}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in:\n{stdout[-2000:]}")


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------------- preparation
def prepare(size_name: str, work: Path, variants: tuple[str, ...], threads: int, log) -> dict[str, dict]:
    """Dense checkpoint, inputs and one reference-quantized checkpoint per variant (reused when present)."""
    missing = [v for v in variants if not (work / v / "bench_summary.json").is_file()]
    if missing or not (work / "dense" / "config.json").is_file():
        log(f"building / quantizing with the reference (child process): {missing or 'dense only'} in {work}")
        _python(["-m", "bench.prepare", size_name, str(work), *missing], threads, 7200,
                {"SDNQ_USE_TORCH_COMPILE": "0"})
    return {v: json.loads((work / v / "bench_summary.json").read_text()) for v in variants}


# ------------------------------------------------------------------------------------------------------- measurement
def measure(impl: str, dtype: str, folder: Path, work: Path, args: argparse.Namespace) -> dict:
    tag = f"{folder.name}-{impl}-{dtype}"
    spec = {"impl": impl, "dtype": dtype, "path": str(folder), "inputs": str(work / "inputs.safetensors"),
            "output": str(work / "outputs" / f"{tag}.safetensors"), "warmup": args.warmup, "iters": args.iters,
            "threads": args.threads, "env": {"SDNQ_USE_TORCH_COMPILE": "1" if args.ref_compile else "0",
                                             **IMPL_ENV.get(impl, {})}}
    (work / "outputs").mkdir(exist_ok=True)
    result = _last_json(_python(["-m", "bench.child", json.dumps(spec)], args.threads, args.timeout))
    result.update(impl=impl, dtype=dtype, variant=folder.name, disk_bytes=_disk_bytes(folder), output=spec["output"])
    if impl != "dense" and not result["quantized_layers"]:
        raise RuntimeError(f"{impl} loaded {folder} without any of its own quantized layers: {result}")
    return result


#: Peak RSS of a dense child per byte of the (bfloat16) dense checkpoint, measured on klein-slice: the float32
#: load holds the mapped file and its float32 copy (3.0x); bfloat16 uses the file's pages (1.06x).
DENSE_PEAK_PER_DISK_BYTE = {"float32": 3.1, "bfloat16": 1.2}


def dense_memory_estimate(folder: Path, dtype: str) -> float:
    return DENSE_PEAK_PER_DISK_BYTE[dtype] * _disk_bytes(folder)


def meminfo_bytes(field: str) -> int | None:
    """A ``/proc/meminfo`` field (``MemTotal``, ``MemAvailable``) in bytes; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    return meminfo_bytes("MemAvailable")


def add_errors(results: list[dict]) -> None:
    """Relative L2 and max-abs difference of every output from the bf16 and fp32 dense outputs."""
    import torch
    from safetensors.torch import load_file

    refs = {r["dtype"]: load_file(r["output"])["output"] for r in results if r["impl"] == "dense"}
    for r in results:
        out = load_file(r["output"])["output"]
        for dt, ref in refs.items():
            key = "bf16" if dt == "bfloat16" else "fp32"
            r[f"rel_l2_vs_dense_{key}"] = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
            r[f"max_abs_vs_dense_{key}"] = float((out - ref).abs().max())


# ------------------------------------------------------------------------------------------------------- reporting
def machine() -> dict:
    import torch

    model = platform.processor()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    total = meminfo_bytes("MemTotal")
    mem = f"{total / 2**30:.0f} GiB" if total else ""
    interesting = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                   if f in flags]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    import diffusers

    from diffusers_sdnq.layers import native

    decoder = native.get()
    decode = "torch operations (no compiled decoder)" if decoder is None else \
        f"compiled decoder ({'OpenMP' if decoder.threaded else 'one thread'}, fused={decoder.fused})"
    return {"decoder": decode, "cpu": model, "cores": os.cpu_count(), "flags": interesting, "memory": mem,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "loadavg": os.getloadavg()}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 1 else f"{x:.2f}")


def _fmt_e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def tables(results: list[dict]) -> str:
    by = {(r["impl"], r["dtype"], r["variant"]): r for r in results}
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in results)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    lines = ["### Ratios (one run)", "",
             "| dtype | variant | forward ours/ref | forward ours/dense | TTFF ours/ref | TTFF ours/dense "
             "| peak RSS ours/ref | peak RSS ours/dense | ours peak RSS / disk | ref peak RSS / disk |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dt in dtypes:
        dense = by.get(("dense", dt, "dense"), {})
        for v in variants:
            ours, ref = by.get(("ours", dt, v), {}), by.get(("reference", dt, v), {})
            disk = ours.get("disk_bytes") or ref.get("disk_bytes")
            lines.append(
                f"| {dt} | {v} | {_ratio(ours.get('forward_s'), ref.get('forward_s'))} "
                f"| {_ratio(ours.get('forward_s'), dense.get('forward_s'))} "
                f"| {_ratio(ours.get('ttff_s'), ref.get('ttff_s'))} | {_ratio(ours.get('ttff_s'), dense.get('ttff_s'))} "
                f"| {_ratio(ours.get('peak_mib'), ref.get('peak_mib'))} "
                f"| {_ratio(ours.get('peak_mib'), dense.get('peak_mib'))} "
                f"| {_ratio(ours.get('peak_mib'), disk / 2**20 if disk else None)} "
                f"| {_ratio(ref.get('peak_mib'), disk / 2**20 if disk else None)} |")
    exact = [(dt, v) for dt in dtypes for v in variants if ("ours-exact", dt, v) in by]
    if exact:
        lines += ["", "Opt-in bit-exact forward (`ours-exact`, `svd=weight`: the SVD product added to every weight "
                  "block as the reference does; the default `ours` applies it as a low-rank branch on the "
                  "activations, equal up to float rounding, see the error columns below):", "",
                  "| dtype | variant | forward exact/ref | forward exact/dense | forward exact/ours default |",
                  "|---|---|---|---|---|"]
        for dt, v in exact:
            ex, ref, ours = by[("ours-exact", dt, v)], by.get(("reference", dt, v), {}), by.get(("ours", dt, v), {})
            dense = by.get(("dense", dt, "dense"), {})
            lines.append(f"| {dt} | {v} | {_ratio(ex['forward_s'], ref.get('forward_s'))} "
                         f"| {_ratio(ex['forward_s'], dense.get('forward_s'))} "
                         f"| {_ratio(ex['forward_s'], ours.get('forward_s'))} |")
    switched = [(dt, v, impl) for dt in dtypes for v in variants for impl in ("ours-qmm", "ours-qmm-cache")
                if (impl, dt, v) in by]
    if switched:
        lines += ["", "Quantized matmul switched on after loading (`apply_sdnq_options_to_model(model, "
                  "use_quantized_matmul=True)` in each library; on `int8_qmm`, saved with it, that changes nothing; "
                  "`ours-qmm-cache`: `quantized_matmul_cache=1`, int8 codes packed at once and re-quantized ones "
                  "kept):", "",
                  "| dtype | variant | impl | forward /ref switched on | forward /dense | forward /ours default "
                  "| peak RSS / disk |", "|---|---|---|---|---|---|---|"]
        for dt, v, impl in switched:
            r, ref = by[(impl, dt, v)], by.get(("reference-qmm", dt, v), {})
            dense, ours = by.get(("dense", dt, "dense"), {}), by.get(("ours", dt, v), {})
            lines.append(f"| {dt} | {v} | {impl} | {_ratio(r['forward_s'], ref.get('forward_s'))} "
                         f"| {_ratio(r['forward_s'], dense.get('forward_s'))} "
                         f"| {_ratio(r['forward_s'], ours.get('forward_s'))} "
                         f"| {_ratio(r['peak_mib'] * 2**20, r['disk_bytes'])} |")
    lines += ["", "### Absolute numbers", "",
              "| dtype | variant | impl | forward s (median) | min s | TTFF s | load s | peak RSS load MiB "
              "| peak RSS forward MiB | disk MiB | rel L2 vs dense bf16 | rel L2 vs dense fp32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dt in dtypes:
        for v in ["dense", *variants]:
            for impl in IMPLS:
                r = by.get((impl, dt, v))
                if r is None:
                    continue
                lines.append(
                    f"| {dt} | {v} | {impl} | {_fmt_s(r['forward_s'])} | {_fmt_s(r['forward_min_s'])} "
                    f"| {_fmt_s(r['ttff_s'])} | {_fmt_s(r['load_s'])} | {r['peak_load_mib']:.0f} "
                    f"| {r['peak_forward_mib']:.0f} | {r['disk_bytes'] / 2**20:.0f} "
                    f"| {_fmt_e(r.get('rel_l2_vs_dense_bf16'))} | {_fmt_e(r.get('rel_l2_vs_dense_fp32'))} |")
    return "\n".join(lines)


def goals(results: list[dict], micro: dict | None) -> str:
    """The issue's 'done when' checks, computed from this run."""
    by = {(r["impl"], r["dtype"], r["variant"]): r for r in results}
    out = []

    def check(label: str, value: float | None, limit: float, better: str) -> None:
        if value is None:
            out.append(f"- {label}: not measured")
            return
        ok = value <= limit if better == "<=" else value >= limit
        out.append(f"- {label}: {value:.2f} (goal {better} {limit}) {'met' if ok else 'NOT met'}")

    def get(impl: str, dt: str, v: str, key: str) -> float | None:
        return by.get((impl, dt, v), {}).get(key)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for impl, label in (("ours", "ours (default)"), ("ours-exact", "ours svd=weight (bit-exact opt-in)")):
        check(f"fp32 uint4+SVD forward {label}/dense", ratio(get(impl, "float32", "uint4_svd", "forward_s"),
                                                            get("dense", "float32", "dense", "forward_s")), 1.10, "<=")
        check(f"bf16 uint4+SVD forward {label}/reference", ratio(get(impl, "bfloat16", "uint4_svd", "forward_s"),
                                                                get("reference", "bfloat16", "uint4_svd",
                                                                    "forward_s")), 0.40, "<=")
    for dt in DTYPES:
        r = by.get(("ours", dt, "uint4_svd"))
        if r:
            check(f"{dt} uint4+SVD ours peak RSS / bytes on disk", r["peak_mib"] * 2**20 / r["disk_bytes"], 1.3, "<=")
    # issue 17: the quantized matmul
    for dt in DTYPES:
        check(f"{dt} int8_qmm forward ours/reference", ratio(get("ours", dt, "int8_qmm", "forward_s"),
                                                            get("reference", dt, "int8_qmm", "forward_s")), 0.9, "<=")
    for dt in DTYPES:
        check(f"{dt} int8_qmm forward ours-qmm-cache (packed at once)/reference",
              ratio(get("ours-qmm-cache", dt, "int8_qmm", "forward_s"), get("reference", dt, "int8_qmm", "forward_s")),
              0.9, "<=")
    for impl in ("ours", "ours-qmm-cache"):
        check(f"bf16 int8_qmm forward {impl}/dense", ratio(get(impl, "bfloat16", "int8_qmm", "forward_s"),
                                                           get("dense", "bfloat16", "dense", "forward_s")), 0.65, "<=")
    for dt in DTYPES:
        r = by.get(("ours", dt, "int8_qmm"))
        if r:
            check(f"{dt} int8_qmm ours peak RSS / bytes on disk", r["peak_mib"] * 2**20 / r["disk_bytes"], 1.3, "<=")
    for impl in ("ours-qmm", "ours-qmm-cache"):
        check(f"bf16 uint4+SVD {impl} (switched on)/dense", ratio(get(impl, "bfloat16", "uint4_svd", "forward_s"),
                                                                  get("dense", "bfloat16", "dense", "forward_s")),
              1.0, "<=")
    check("bf16 uint4+SVD ours default path/dense", ratio(get("ours", "bfloat16", "uint4_svd", "forward_s"),
                                                          get("dense", "bfloat16", "dense", "forward_s")), 1.10, "<=")
    if micro:
        row = next((r for r in micro["rows"] if r["dtype"] == "uint4"), None)
        if row:
            best = max(row["codec_gbs"], row.get("forward_gbs", 0.0))
            check("uint4 dequant / memcpy bandwidth", best / micro["memcpy_gbs"], 0.5, ">=")
    return "\n".join(out)


def report(args: argparse.Namespace, mach: dict, quant: dict, results: list[dict], micro: dict | None,
           micro_table: str, started: float) -> str:
    from .model import SIZES

    size = SIZES[args.size]
    lines = [
        "# Benchmark results", "",
        f"Measured on commit `{mach['commit']}` with `{' '.join(['python -m bench', *args.argv])}`.", "",
        "## Machine", "",
        f"- CPU: {mach['cpu']}, {mach['cores']} logical cores ({', '.join(mach['flags'])}); memory {mach['memory']}",
        f"- torch {mach['torch']}, diffusers {mach['diffusers']}, Python {mach['python']}; "
        f"{args.threads} torch threads per child, OMP_WAIT_POLICY={OMP_WAIT_POLICY}",
        f"- ours decodes integer codes with: {mach['decoder']}",
        f"- load average at start {tuple(round(x, 2) for x in mach['loadavg'])}, at end "
        f"{tuple(round(x, 2) for x in os.getloadavg())} (other jobs share this machine: compare ratios only)",
        f"- wall time {time.time() - started:.0f} s", "",
        "## Model", "",
        f"`{args.size}`: Flux2Transformer2DModel, {size.num_layers} double + {size.num_single_layers} single blocks, "
        f"{size.heads} heads x {size.head_dim}, joint_attention_dim {size.joint_attention_dim}, mlp_ratio "
        f"{size.mlp_ratio}, {size.image_tokens} image + {size.text_tokens} text tokens, seeded random weights "
        "(dense checkpoint saved in bfloat16). Quantized by the reference `sdnq` 0.2.8 "
        f"(torch.compile {'on' if args.ref_compile else 'off'} for its forward):", "",
    ]
    for v, q in quant.items():
        lines.append(f"- `{v}`: {json.dumps(q['kwargs'])} -> layer dtypes {json.dumps(q['dtypes'])}")
    lines += ["", "## Forward, load and memory", "",
              f"Forward: median of {args.iters} after {args.warmup} warm-up forward(s), `torch.inference_mode`. "
              "TTFF: `from_pretrained` + first forward. Peak RSS: `VmHWM` above the `VmRSS` after imports, load "
              "and forward (the forward peak includes the loaded model). Disk: the checkpoint's safetensors bytes "
              "(dense: the bf16 checkpoint, also used for the fp32 dense load).", "",
              tables(results), "", *[f"- {line}" for line in getattr(args, "skipped", [])],
              "", "## Goals of issues 8 and 17 (this run)", "", goals(results, micro), ""]
    if micro_table:
        lines += ["## Dequantization throughput", "", micro_table, ""]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.is_file() and not args.quick:  # the analysis of the goals, kept across re-runs
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, float32 and uint4_svd only (unless given), 1 thread, 2 iterations")
    p.add_argument("--size", default=None, help="quick | klein-slice (default) | klein-full")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints and outputs go (reused)")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown report (default bench/RESULTS.md; with --quick: WORKDIR/RESULTS.md)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all cores)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES)
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS[1:],
                   help="quantized implementations to measure (dense is always measured); ours-exact: ours with "
                        "the bit-exact svd=weight forward, SVD variants only; *-qmm: the quantized matmul switched "
                        "on after loading, on the uint4_svd variant (default: all; --quick: reference and ours)")
    p.add_argument("--ref-compile", action="store_true", help="let the reference torch.compile its dequantizer")
    p.add_argument("--no-micro", action="store_true", help="skip the dequantization micro-benchmark")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement child")
    args = p.parse_args(argv)
    args.argv = argv
    args.size = args.size or ("quick" if args.quick else "klein-slice")
    args.iters = args.iters or (2 if args.quick else 5)
    args.threads = args.threads or (1 if args.quick else os.cpu_count() or 1)
    args.dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    args.variants = args.variants or (["uint4_svd"] if args.quick else list(VARIANTS))
    args.impls = args.impls or (["reference", "ours"] if args.quick else list(IMPLS[1:]))
    if args.quick:
        args.warmup = min(args.warmup, 0)
    base = Path(os.environ.get("TMPDIR", "/tmp")) / "diffusers-sdnq-bench"
    args.workdir = args.workdir or base / f"{args.size}-v{FORMAT_VERSION}"
    args.results = args.results or (args.workdir / "RESULTS.md" if args.quick else ROOT / "bench" / "RESULTS.md")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gpu" in argv:  # the GPU check of issue 18: bench/gpu.py
        from .gpu import main as gpu_main

        return gpu_main([a for a in argv if a != "--gpu"])
    args = parse(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # before this process loads torch (--quick micro)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[bench {time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    mach = machine()
    quant = prepare(args.size, args.workdir, tuple(args.variants), args.threads, log)
    results = []
    skipped = []
    for dtype in args.dtypes:
        need, free = dense_memory_estimate(args.workdir / "dense", dtype), available_memory()
        if free is not None and need > 0.9 * free:  # the error reference, unless it cannot fit in memory
            skipped.append(f"dense {dtype} not measured: it needs ~{need / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB were available")
            log(skipped[-1])
        else:
            log(f"dense {dtype}")
            results.append(measure("dense", dtype, args.workdir / "dense", args.workdir, args))
        for variant in args.variants:
            for impl in IMPLS[1:]:
                switched = "-qmm" in impl
                if impl in args.impls and (impl != "ours-exact" or "svd" in variant) and (
                        not switched or variant in QMM_SWITCH_VARIANTS):
                    log(f"{impl} {variant} {dtype}")
                    results.append(measure(impl, dtype, args.workdir / variant, args.workdir, args))
    args.skipped = skipped
    add_errors(results)
    micro, micro_table = None, ""
    if not args.no_micro:
        log("dequantization micro-benchmark")
        from . import micro as mb

        if args.quick:  # in this process: one interpreter start less
            import torch

            torch.set_num_threads(args.threads)
            micro = mb.run(256, 512, repeat=2)
        else:
            code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[1])); from bench import micro; "
                    "print(json.dumps(micro.run()))")
            micro = _last_json(_python(["-c", code, str(args.threads)], args.threads, args.timeout))
        micro_table = mb.table(micro)
    text = report(args, mach, quant, results, micro, micro_table, started)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    (args.workdir / "results.json").write_text(json.dumps({"machine": mach, "results": results, "micro": micro},
                                                          indent=1))
    print(text)
    log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT))
        from bench.run import main as _main

        raise SystemExit(_main())
    raise SystemExit(main())
