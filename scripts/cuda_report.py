"""Static report of the CUDA kernels: for every kernel instantiation in
csrc/cuda/*.cu compiled for one architecture (sm_90 by default), what ptxas
allocates (registers, spill stores and loads, static shared memory, stack) and
what that allows on one SM at each block size the launchers use: resident
blocks, resident threads and the occupancy.

    python scripts/cuda_report.py                     # table on stdout
    python scripts/cuda_report.py --json report.json  # and the rows as JSON

Needs nvcc and a CUDA build of torch (for its headers); no GPU. `make
cuda-report` runs it. The block sizes per kernel come from the launchers
(csrc/cuda/norm.cu, ffn.cu, telemetry.cu): register-row kernels run 32..1024
threads depending on d, the others one fixed size.
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sm_90 (H100 / H200) per-SM limits.
ARCH_LIMITS = {
    "sm_80": dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, reg_unit=256, max_regs_thread=255),
    "sm_90": dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, reg_unit=256, max_regs_thread=255),
}
RESERVED_SMEM_PER_BLOCK = 1024

# Block sizes each kernel family is launched with (see the launchers).
BLOCKS = {
    "norm_forward_kernel": [256],
    "norm_backward_kernel": [256],
    "norm_forward_long_row_kernel": [1024],
    "norm_backward_long_row_kernel": [1024],
    "norm_param_grad_columns_kernel": [256],
    "sum_partials_kernel": [512],
    "activation_forward_kernel": [256],
    "activation_backward_kernel": [256],
    "input_stats_kernel": [256],
    "hidden_stats_kernel": [256],
    "outlier_count_kernel": [256],
    "reduce_partials_kernel": [256],
}


def nvcc_flags(arch):
    import torch.utils.cpp_extension as ce

    includes = [os.path.join(ROOT, "csrc")] + ce.include_paths(device_type="cuda")
    return (["-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-arch={arch}", "-Xptxas", "-v",
             "-D_GLIBCXX_USE_CXX11_ABI=1", "-DFFN_PYTHON_MODULE",
             "-DTORCH_TARGET_VERSION=0x020b000000000000"]
            + [f"-I{i}" for i in includes])


def compile_one(source, arch, workdir):
    obj = os.path.join(workdir, os.path.basename(source) + ".o")
    cmd = ["nvcc", *nvcc_flags(arch), "-c", source, "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-6000:]}")
    return proc.stderr


def demangle(names):
    proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text):
    """(mangled name, registers, spill stores, spill loads, stack, static smem) per entry function."""
    rows, current = [], None
    for line in text.splitlines():
        if m := FUNCTION.search(line):
            current = dict(mangled=m.group(1), stack=0, spill_stores=0, spill_loads=0)
        elif current and (m := STACK.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := USED.search(line)):
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(current)
            current = None
    return rows


def resident_blocks(limits, registers, smem, block):
    """Blocks of `block` threads one SM holds, and what limits it."""
    warps = -(-block // 32)
    regs_per_warp = -(-(max(registers, 1) * 32) // limits["reg_unit"]) * limits["reg_unit"]
    by_regs = limits["regs"] // (regs_per_warp * warps)
    by_threads = limits["threads"] // block
    by_smem = limits["smem"] // (smem + RESERVED_SMEM_PER_BLOCK)
    candidates = {"registers": by_regs, "threads": by_threads, "shared memory": by_smem,
                  "blocks": limits["blocks"]}
    limit = min(candidates, key=candidates.get)
    return candidates[limit], limit


def activation_enum_names(header=os.path.join(ROOT, "csrc", "activation_table.h")):
    """The activation names in the order of C++'s `enum class Activation` (what the demangled
    (ffn::Activation)N template arguments count), read from the C++ activation table itself:
    the enum's enumerators, each named by its row of kActivations. The Python twin,
    ffn.activations, lists the same names in its own order."""
    with open(header) as f:
        text = f.read()
    enumerators = re.search(r"enum class Activation\s*\{([^}]*)\}", text).group(1)
    names = dict(re.findall(r'\{\s*Activation::(\w+),\s*"(\w+)"', text))
    return tuple(names[e.strip()] for e in enumerators.split(",") if e.strip())


ACTIVATIONS = activation_enum_names()  # enum class Activation, in order


def short_name(demangled):
    """The kernel and its template arguments, without namespaces or parameter list."""
    name = demangled.replace("ffn::cuda::(anonymous namespace)::", "").replace("c10::", "")
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # the parameter list: the last top-level (...)
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            name = name[:i]
            break
    name = re.sub(r"ffn::cuda::Act<\(ffn::Activation\)(\d)>", lambda m: ACTIVATIONS[int(m.group(1))], name)
    return re.sub(r"\s+>", ">", name)


def family(demangled):
    base = short_name(demangled)
    return base.split("<")[0]


def report(arch):
    if shutil.which("nvcc") is None:
        sys.exit("cuda_report: nvcc not found")
    sources = sorted(os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                     if f.endswith(".cu"))
    with tempfile.TemporaryDirectory() as workdir, concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        outputs = list(pool.map(lambda s: compile_one(s, arch, workdir), sources))
    rows = []
    for source, text in zip(sources, outputs):
        parsed = parse_ptxas(text)
        for row, name in zip(parsed, demangle([r["mangled"] for r in parsed])):
            row.update(source=os.path.basename(source), kernel=short_name(name), family=family(name))
            rows.append(row)
    limits = ARCH_LIMITS[arch]
    for row in rows:
        row["occupancy"] = []
        for block in BLOCKS.get(row["family"], [256]):
            blocks, limit = resident_blocks(limits, row["registers"], row["smem"], block)
            row["occupancy"].append(dict(block=block, blocks_per_sm=blocks, threads_per_sm=blocks * block,
                                         occupancy=blocks * block / limits["threads"], limited_by=limit))
    return rows


# The register kernels' row plan, as row_plan() in csrc/cuda/norm.cu decides it
# (block 256 threads; keep the two in step). scripts/norm_plan_sweep.py sweeps
# around it on these shapes with the same instantiations.
ROW_BLOCK = 256
MAX_WORDS = {"forward": 8, "backward": {2: 4, 4: 8, 8: 8}}
BENCH_SHAPES = [(16384, d) for d in (1024, 4096, 8192, 16384)]  # scripts/bench.py --device cuda (rows do not matter)


def row_plan(d, words, max_words):
    target = 8 if d <= 64 else 16 if d <= 128 else 64 if d <= 3072 else 128 if d <= 6144 else ROW_BLOCK
    threads = 1
    while threads < target and threads < words:
        threads *= 2
    while -(-words // threads) > max_words and threads < ROW_BLOCK:
        threads *= 2
    needed = -(-words // threads)
    if needed > max_words:
        return threads, 0
    per_thread = 1
    while per_thread < needed:
        per_thread *= 2
    return threads, per_thread


def bench_plans(rows):
    """Threads per row, words per thread, resident blocks and bytes in flight per SM for the benchmark shapes."""
    by_name = {r["kernel"]: r for r in rows}
    plans = []
    for elt, dtype in ((2, "BFloat16"), (4, "float")):
        for _rows, d in BENCH_SHAPES:
            words = -(-d * elt // 16)
            for pass_name, max_words in (("forward", MAX_WORDS["forward"]), ("backward", MAX_WORDS["backward"][elt])):
                threads, per_thread = row_plan(d, words, max_words)
                entry = dict(dtype=dtype, d=d, pass_=pass_name, threads_per_row=threads if per_thread else 1024,
                             words_per_thread=per_thread)
                if per_thread:
                    kernel = by_name.get(f"norm_{pass_name}_kernel<{dtype}, {dtype}, {per_thread}, true>")
                    blocks = kernel["occupancy"][0]["blocks_per_sm"] if kernel else None
                    # Loads in flight per SM: each thread's words of x (and dy), and the forward's prefetched next row.
                    tensors = 2  # forward: the row and the prefetched next one; backward: x and dy
                    entry.update(kernel="register rows", blocks_per_sm=blocks,
                                 bytes_in_flight_per_sm=None if blocks is None else
                                 blocks * ROW_BLOCK * per_thread * 16 * tensors)
                else:
                    entry.update(kernel="long rows (1024 threads per row)")
                plans.append(entry)
    return plans


def print_plans(plans):
    print("\nBenchmark shapes (scripts/bench.py --device cuda), vectorized rows, weights in the input dtype:")
    print(f"{'dtype':<9} {'d':>6} {'pass':<9} {'kernel':<34} {'threads/row':>11} {'words/thread':>12} "
          f"{'blocks/SM':>9} {'KiB in flight/SM':>16}")
    for p in plans:
        kib = p.get("bytes_in_flight_per_sm")
        print(f"{p['dtype']:<9} {p['d']:>6} {p['pass_']:<9} {p['kernel']:<34} {p['threads_per_row']:>11} "
              f"{p['words_per_thread'] or '-':>12} {p.get('blocks_per_sm') or '-':>9} "
              f"{'-' if kib is None else kib // 1024:>16}")


def print_table(rows, arch):
    print(f"CUDA kernels on {arch}: ptxas resource usage and residency per SM (dynamic shared memory excluded)")
    print(f"{'kernel':<88} {'regs':>4} {'spill st/ld':>11} {'smem':>6}  residency at block size")
    for row in sorted(rows, key=lambda r: (r["source"], r["kernel"])):
        spills = f"{row['spill_stores']}/{row['spill_loads']}"
        occ = ", ".join(f"{o['block']}: {o['blocks_per_sm']}x ({o['occupancy']:.0%}, {o['limited_by']})"
                        for o in row["occupancy"])
        print(f"{row['kernel'][:88]:<88} {row['registers']:>4} {spills:>11} {row['smem']:>6}  {occ}")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} instantiations, {len(spilling)} with spills")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90", choices=sorted(ARCH_LIMITS))
    p.add_argument("--json", help="write the rows here as JSON")
    args = p.parse_args()
    rows = report(args.arch)
    print_table(rows, args.arch)
    plans = bench_plans(rows)
    print_plans(plans)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, kernels=rows, benchmark_plans=plans), f, indent=1)


if __name__ == "__main__":
    main()
