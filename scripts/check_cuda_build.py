#!/usr/bin/env python3
"""Static checks of the built CUDA kernels, no GPU needed.

Reads the compiled extension with `cuobjdump` (the one shipped in triton's package, or on PATH)
and checks every kernel against the budget declared beside it in cuda/*.cu, in comments of the
form

    // @kernel-budget quantize_4bit_kernel: regs<=64 stack<=0 sass=LDG.E.128 (why ...)

It fails, with a readable table, when
- a kernel family (one .cu file) lacks native code for an arch of the build's list, or PTX for
  the newest arch;
- a kernel uses a stack frame or local memory (spills) beyond its budget;
- a kernel is above its register budget;
- the SASS lacks an instruction the design relies on (e.g. 128-bit global loads in memory-bound
  kernels, HMMA tensor-core instructions in the GEMM);
- a kernel in the binary has no declared budget.

    python scripts/check_cuda_build.py [--so PATH] [--results]   # --results: into RESULTS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_RE = re.compile(r"//\s*@kernel-budget\s+(\w+):\s*(.*)$")


def find_cuobjdump() -> str:
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cand = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    found = shutil.which("cuobjdump")
    if not found:
        sys.exit("check_cuda_build: no cuobjdump (install triton, or put the CUDA toolkit on PATH)")
    return found


def find_so() -> tuple[str, dict]:
    import qlora_ext

    return qlora_ext._C.__file__, qlora_ext.build_info()


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def parse_budgets() -> dict[str, dict]:
    budgets = {}
    for cu in sorted((ROOT / "cuda").glob("*.cu")):
        for line in cu.read_text().splitlines():
            m = BUDGET_RE.search(line)
            if not m:
                continue
            name, spec = m.group(1), m.group(2)
            b = {"file": cu.name, "regs": None, "stack": 0, "sass": []}
            for tok in spec.split("(")[0].split():
                if tok.startswith("regs<="):
                    b["regs"] = int(tok[6:])
                elif tok.startswith("stack<="):
                    b["stack"] = int(tok[7:])
                elif tok.startswith("sass="):
                    b["sass"] = [s for s in tok[5:].split(",") if s]
            budgets[name] = b
    return budgets


def kernel_name(mangled: str, budgets: dict) -> str | None:
    # Itanium mangling prefixes each name with its length, so "20quantize_4bit_kernel" never
    # matches inside "22dequantize_4bit_kernel".
    for name in budgets:
        if f"{len(name)}{name}" in mangled:
            return name
    return None


def parse_resources(text: str) -> list[dict]:
    rows, arch, fn = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif line.startswith("Function "):
            fn = line[len("Function ") :].rstrip(":")
        elif line.startswith("REG:") and fn:
            vals = dict(kv.split(":", 1) for kv in line.split())
            rows.append(
                dict(
                    arch=arch,
                    fn=fn,
                    regs=int(vals["REG"]),
                    stack=int(vals["STACK"]),
                    smem=int(vals["SHARED"]),
                    local=int(vals["LOCAL"]),
                )
            )
            fn = None
    return rows


def sass_by_function(cuobjdump: str, so: str, arch: str) -> dict[str, str]:
    out, cur, buf = {}, None, []
    for line in run(cuobjdump, "--dump-sass", "-arch", arch, so).splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            if cur:
                out[cur] = out.get(cur, "") + "\n".join(buf)
            cur, buf = m.group(1), []
        elif cur:
            buf.append(line)
    if cur:
        out[cur] = out.get(cur, "") + "\n".join(buf)
    return out


def sass_has(sass: str, want: str) -> bool:
    # "LDG.E.128" also matches LDG.E.128.CONSTANT / LDG.E.EF.128 forms; "HMMA" matches HGMMA too.
    if want == "HMMA":
        return bool(re.search(r"\bH(G)?MMA\b", sass))
    parts = want.split(".")
    pattern = (
        r"\b"
        + parts[0]
        + r"(\.[A-Z0-9_]+)*"
        + "".join(rf"(\.[A-Z0-9_]+)*\.{re.escape(p)}" for p in parts[1:])
    )
    return bool(re.search(pattern, sass))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", help="the built _C library (default: the installed qlora_ext._C)")
    ap.add_argument("--results", action="store_true", help="write the table into RESULTS.md")
    args = ap.parse_args()
    if args.so:
        so, info = args.so, None
    else:
        so, info = find_so()
        if not info["cuda"]:
            print("check_cuda_build: qlora_ext was built without CUDA; nothing to check")
            return 0
    cuobjdump = find_cuobjdump()
    budgets = parse_budgets()
    problems: list[str] = []

    # Arch coverage per kernel family (one .cu file = one family).
    want_archs = sorted(
        {
            f"sm_{a.split('-')[0]}"
            for a in (info or {}).get("cuda_archs", "").split()
            if a.endswith("-real")
        }
    ) or ["sm_80", "sm_86", "sm_89", "sm_90"]
    ptx_arch = max(want_archs, key=lambda a: int(a[3:]))
    elf, ptx = defaultdict(set), defaultdict(set)
    for line in run(cuobjdump, "--list-elf", so).splitlines():
        m = re.search(r"(\w+)\.(sm_\d+)\.cubin", line)
        if m:
            elf[m.group(1)].add(m.group(2))
    for line in run(cuobjdump, "--list-ptx", so).splitlines():
        m = re.search(r"(\w+)\.(sm_\d+)\.ptx", line)
        if m:
            ptx[m.group(1)].add(m.group(2))
    for fam in sorted(elf):
        missing = [a for a in want_archs if a not in elf[fam]]
        if missing:
            problems.append(f"{fam}.cu: no native code for {', '.join(missing)}")
        if ptx_arch not in ptx[fam]:
            problems.append(f"{fam}.cu: no PTX for {ptx_arch}")

    rows = parse_resources(run(cuobjdump, "--dump-resource-usage", so))
    sass = {a: sass_by_function(cuobjdump, so, a) for a in sorted({r["arch"] for r in rows})}
    table, seen = [], set()
    for r in rows:
        name = kernel_name(r["fn"], budgets)
        if name is None:
            short = re.search(r"\d+(\w+?)I", r["fn"].split("_cu_")[-1])
            msg = f"{short.group(1) if short else r['fn']}: no @kernel-budget declared"
            if msg not in problems:
                problems.append(msg)
            continue
        b = budgets[name]
        seen.add(name)
        issues = []
        if b["regs"] is not None and r["regs"] > b["regs"]:
            issues.append(f"regs {r['regs']} > {b['regs']}")
        if r["stack"] > b["stack"]:
            issues.append(f"stack {r['stack']} B > {b['stack']}")
        if r["local"] > b["stack"]:
            issues.append(f"local memory {r['local']} B (spills)")
        code = sass.get(r["arch"], {}).get(r["fn"], "")
        found = [w for w in b["sass"] if sass_has(code, w)]
        for w in b["sass"]:
            if w not in found:
                issues.append(f"no {w} in SASS")
        tmpl = re.search(r"I(13__nv_bfloat16|6__half|f)", r["fn"])
        dt = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}.get(
            tmpl.group(1) if tmpl else "", ""
        )
        table.append(
            [
                name + (f"<{dt}>" if dt else ""),
                r["arch"],
                f"{r['regs']} / {b['regs'] or '-'}",
                r["smem"],
                r["stack"],
                r["local"],
                ",".join(found) or "-",
                "ok" if not issues else "; ".join(issues),
            ]
        )
        problems += [f"{name} ({r['arch']}, {dt or 'n/a'}): {i}" for i in issues]
    for name in sorted(set(budgets) - seen):
        problems.append(f"{name}: budget declared but the kernel is not in the binary")

    # Collapse identical template instances for a readable table.
    uniq, out_rows = set(), []
    for row in table:
        key = tuple(row)
        if key not in uniq:
            uniq.add(key)
            out_rows.append(row)
    headers = [
        "kernel",
        "arch",
        "regs / budget",
        "smem B",
        "stack B",
        "local B",
        "key SASS",
        "status",
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *out_rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers))
    for row in out_rows:
        print(fmt.format(*[str(x) for x in row]))
    print(
        f"\n{len(rows)} kernel instances in {len(elf)} families; archs {', '.join(want_archs)} "
        f"+ PTX {ptx_arch}"
    )
    if args.results:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _common import markdown_table, write_section

        write_section(
            "check_cuda_build",
            "Static CUDA checks (registers, spills, key SASS)",
            markdown_table(headers, out_rows),
            "cpu",
            "Read from the built library with cuobjdump; budgets are declared beside each "
            "kernel (`@kernel-budget`). No GPU is needed for these numbers.",
        )
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    print("all kernels within budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
