#!/usr/bin/env python3
"""Runs the quantized kernels on instruction sets this CPU may lack, in an x86
emulator, and checks that each gives the AVX2 kernels' bits.

    pip install -r scripts/requirements-ci.txt    # bochscpu-python among them
    cargo build -p lw-model --example isa_probe
    python scripts/isa_emulate.py target/debug/examples/libisa_probe.so [--json]

The emulator is Bochs's CPU (PyPI's `bochscpu-python`), set to a Sapphire
Rapids model, which runs both VNNI encodings (AVX-VNNI and AVX-512 VNNI, the
latter on 256- and 512-bit registers). The
probe library (`crates/lw-model/examples/isa_probe.rs`) builds each case
natively; its `lw_probe_run` then runs in the emulator over this process's own
memory: every readable page is mapped at its own virtual address, so the
kernel reads the buffers the native code built and writes its results where
Python reads them.

Per case and seed: the native AVX2 result, each instruction set's emulated
result (AVX2's checks the emulation), and the native result of each set this
CPU has, all compared bit for bit. Then two CPU models without some of the
sets, each in a process of its own (Bochs takes one CPU per process): on
Skylake-X (AVX-512 without VNNI) the three VNNI sets' kernels must stop with
an invalid-opcode fault, and on Arrow Lake (AVX-VNNI without AVX-512) the two
AVX-512 ones must, while AVX-VNNI's gives the AVX2 bits: proof that each
kernel runs its own instructions.

With seed 1, each case also counts the instructions each set executes
(meaningful for a library built with `--release`; the emulator cannot time
anything). LW_ISA_EMULATE_DEBUG=1 prints where a run faulted (Bochs reports the address
after the faulting instruction).

Exit status 0 when everything matches, 1 on a mismatch, 2 when the emulator or
the library cannot be loaded. A small preload library (compiled here with
`cc`) picks the CPU model and lets the wheel, built against a newer glibc,
load on older ones.
"""

import ctypes
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

PAGE = 4096
SHIM_ENV = "LW_ISA_EMULATE_SHIM"
MODEL_ENV = "LW_ISA_EMULATE_MODEL"
# The CPU models: the one every set runs on, and two that lack some, with
# the sets each lacks.
FULL_MODEL = "sapphire_rapids"
PARTIAL_MODELS = {
    "corei7_skylake_x": ["avx-vnni", "avx512-vnni", "avx512-zmm"],
    "arrow_lake": ["avx512-vnni", "avx512-zmm"],
}
INVALID_OPCODE = 6

# The preload library. Bochs creates its CPU model through one of these
# functions (called through the PLT, so a preloaded definition wins); each
# here creates the model LW_ISA_EMULATE_MODEL names (Bochs's name, as in
# `create_<name>_cpuid`) instead, Sapphire Rapids when it names none. The
# two C23 entry points map to their older glibc names.
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

unsigned long long __isoc23_strtoull(const char *s, char **end, int base) {
    return strtoull(s, end, base);
}
int __isoc23_sscanf(const char *s, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsscanf(s, format, args);
    va_end(args);
    return n;
}

static const char *bochs_path;
static int find_bochs(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size; (void)data;
    if (strstr(info->dlpi_name, "_bochscpu")) { bochs_path = info->dlpi_name; return 1; }
    return 0;
}
static void *model(void *cpu) {
    const char *name = getenv("LW_ISA_EMULATE_MODEL");
    if (!name || !*name) name = "sapphire_rapids";
    char symbol[128];
    snprintf(symbol, sizeof symbol, "_Z%zucreate_%s_cpuidP8BX_CPU_C",
             strlen("create__cpuid") + strlen(name), name);
    dl_iterate_phdr(find_bochs, NULL);
    void *lib = bochs_path ? dlopen(bochs_path, RTLD_NOLOAD | RTLD_LAZY) : NULL;
    void *(*create)(void *) = lib ? (void *(*)(void *))dlsym(lib, symbol) : NULL;
    if (!create) { fprintf(stderr, "isa_emulate: no CPU model %s\n", name); abort(); }
    return create(cpu);
}
#define MODEL(sym) void *sym(void *cpu) { return model(cpu); }
MODEL(_Z29create_corei7_skylake_x_cpuidP8BX_CPU_C)
MODEL(_Z38create_corei7_sandy_bridge_2600k_cpuidP8BX_CPU_C)
MODEL(_Z32create_corei7_haswell_4770_cpuidP8BX_CPU_C)
MODEL(_Z26create_broadwell_ult_cpuidP8BX_CPU_C)
MODEL(_Z29create_corei7_icelake_u_cpuidP8BX_CPU_C)
MODEL(_Z22create_tigerlake_cpuidP8BX_CPU_C)
MODEL(_Z23create_corei3_cnl_cpuidP8BX_CPU_C)
MODEL(_Z18create_ryzen_cpuidP8BX_CPU_C)
MODEL(_Z28create_sapphire_rapids_cpuidP8BX_CPU_C)
MODEL(_Z23create_arrow_lake_cpuidP8BX_CPU_C)
"""


def ensure_shim():
    """Re-executes this script with the preload library, compiled once."""
    if os.environ.get(SHIM_ENV):
        return
    digest = hashlib.sha256(SHIM_C.encode()).hexdigest()[:16]
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
        "longwriter",
        "isa-emulate",
    )
    os.makedirs(cache, exist_ok=True)
    shim = os.path.join(cache, f"shim-{digest}.so")
    if not os.path.exists(shim):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "shim.c")
            with open(src, "w") as f:
                f.write(SHIM_C)
            out = os.path.join(tmp, "shim.so")
            cc = os.environ.get("CC", "cc")
            run = subprocess.run(
                [cc, "-shared", "-fPIC", "-O2", "-o", out, src, "-ldl"],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                sys.exit(f"isa_emulate: compiling the preload library with {cc} failed:\n{run.stderr}")
            os.replace(out, shim)
    env = dict(os.environ)
    env[SHIM_ENV] = shim
    env["LD_PRELOAD"] = ":".join(p for p in [shim, env.get("LD_PRELOAD")] if p)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


class Emulator:
    """Bochs's CPU in 64-bit mode over this process's memory."""

    def __init__(self):
        import bochscpu
        import bochscpu.cpu
        import bochscpu.memory

        self.b = bochscpu
        self.session = bochscpu.Session()
        self.session.missing_page_handler = self._missing
        self.tables = bochscpu.memory.PageMapLevel4Table()
        self.next_gpa = 0x100_0000
        self.mapped = set()
        stack = ctypes.create_string_buffer(1 << 20)
        self.stack_top = (ctypes.addressof(stack) + (1 << 20) - 4096) & ~0xFFF
        self.stack = stack
        # The return address: a page of `hlt`, which ends a run (in user
        # mode it faults, and the fault at this address is the end).
        halt = ctypes.create_string_buffer(2 * PAGE)
        self.halt = (ctypes.addressof(halt) + PAGE - 1) & ~(PAGE - 1)
        ctypes.memset(self.halt, 0xF4, 16)
        self.halt_buffer = halt
        self.map_page(self.halt, code=True)
        self.map_process()
        self.pml4 = 0x10_0000
        for hva, gpa in self.tables.commit(self.pml4):
            bochscpu.memory.page_insert(gpa, hva)

    @staticmethod
    def _missing(gpa):
        raise RuntimeError(f"emulated access to unmapped guest-physical {gpa:#x}")

    def map_page(self, va, code):
        if va in self.mapped:
            return
        gpa = self.next_gpa
        self.next_gpa += PAGE
        self.b.memory.page_insert(gpa, va)
        self.tables.insert(va, gpa, 0 if code else 1)
        self.mapped.add(va)

    def map_process(self):
        """Every readable page of this process, at its own address."""
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                perms, name = fields[1], (fields[5] if len(fields) > 5 else "")
                if "r" not in perms or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                    continue
                for va in range(lo, hi, PAGE):
                    self.map_page(va, code="x" in perms)

    def call(self, fn, args, count=False):
        """Runs `fn(*args)` (integer or pointer arguments); returns the
        number of the fault that stopped it early, or None. With `count`,
        `self.executed` is the number of instructions it ran."""
        b = self.b
        state = b.State()
        b.cpu.set_long_mode(state)
        # OSFXSR, OSXMMEXCPT and OSXSAVE; XCR0 enables x87, SSE, AVX and the
        # AVX-512 state.
        state.cr4 = state.cr4 | (1 << 9) | (1 << 10) | (1 << 18)
        state.xcr0 = 0xE7
        state.mxcsr = 0x1F80
        state.cr3 = self.pml4
        # As after a call: the return address pushed on a 16-byte aligned
        # stack.
        rsp = self.stack_top - 64 - 8
        ctypes.c_uint64.from_address(rsp).value = self.halt
        state.rsp = rsp
        state.rip = fn
        for reg, value in zip(["rdi", "rsi", "rdx", "rcx", "r8", "r9"], args):
            setattr(state, reg, value)
        cs = b.Segment()
        cs.present, cs.selector, cs.base, cs.limit, cs.attr = True, 0x33, 0, 0xFFFFFFFF, 0x22FB
        ds = b.Segment()
        ds.present, ds.selector, ds.base, ds.limit, ds.attr = True, 0x2B, 0, 0xFFFFFFFF, 0xCF3
        state.cs = cs
        state.ds = state.ss = state.es = state.fs = state.gs = ds
        self.session.cpu.state = state
        fault = []

        def exception(session, cpu, vector, code):
            if not self.halt <= session.cpu.rip <= self.halt + 16:
                fault.append(vector)
                if os.environ.get("LW_ISA_EMULATE_DEBUG"):
                    print(f"fault {vector} near {session.cpu.rip:#x}", file=sys.stderr)
            session.stop()

        hook = b.Hook()
        hook.exception = exception
        self.executed = 0
        if count:
            def executed(session, cpu, insn):
                self.executed += 1

            hook.after_execution = executed
        self.session.run([hook])
        return fault[0] if fault else None


def native_sets():
    """The instruction sets this CPU runs, by /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return set()
    sets = set()
    if {"avx2", "fma", "f16c"} <= flags:
        sets.add("avx2")
        if "avx_vnni" in flags:
            sets.add("avx-vnni")
        if {"avx512f", "avx512vl", "avx512_vnni"} <= flags:
            sets.add("avx512-vnni")
            if "avx512bw" in flags:
                sets.add("avx512-zmm")
    return sets


def load_probe(path):
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.lw_probe_cases.restype = ctypes.c_size_t
    lib.lw_probe_name.restype = ctypes.c_char_p
    lib.lw_probe_name.argtypes = [ctypes.c_size_t]
    lib.lw_probe_isas.restype = ctypes.c_size_t
    lib.lw_probe_isa_name.restype = ctypes.c_size_t
    lib.lw_probe_isa_name.argtypes = [ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    lib.lw_probe_native.restype = ctypes.c_bool
    lib.lw_probe_new.restype = ctypes.c_void_p
    lib.lw_probe_new.argtypes = [ctypes.c_size_t, ctypes.c_uint64]
    lib.lw_probe_len.restype = ctypes.c_size_t
    lib.lw_probe_len.argtypes = [ctypes.c_void_p]
    lib.lw_probe_run.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.lw_probe_free.argtypes = [ctypes.c_void_p]
    return lib


def floats(n):
    return (ctypes.c_float * n)(*([float("nan")] * n))


def bits(values):
    return struct.pack(f"<{len(values)}f", *values)


def on_partial_model(lib, isas, run_addr):
    """Case 0, seed 1, on the model LW_ISA_EMULATE_MODEL names: per set,
    the fault (or None) and whether the result has the native AVX2 bits."""
    probe = lib.lw_probe_new(0, 1)
    n = lib.lw_probe_len(probe)
    native = floats(n)
    lib.lw_probe_run(probe, 0, native)
    outs = {name: floats(n) for name in isas}
    emu = Emulator()
    report = {}
    for i, name in enumerate(isas):
        fault = emu.call(run_addr, [probe, i, ctypes.addressof(outs[name])])
        report[name] = {"fault": fault, "same_bits": bits(outs[name]) == bits(native)}
    print(json.dumps(report))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    as_json = "--json" in sys.argv
    if len(args) != 1:
        sys.exit(__doc__)
    ensure_shim()
    try:
        lib = load_probe(args[0])
    except (OSError, AttributeError) as e:
        print(f"isa_emulate: cannot load the probe library {args[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    if not lib.lw_probe_native():
        print("isa_emulate: this CPU lacks AVX2, which builds the cases", file=sys.stderr)
        sys.exit(2)
    isas = []
    for i in range(lib.lw_probe_isas()):
        name = ctypes.create_string_buffer(64)
        n = lib.lw_probe_isa_name(i, name, len(name))
        isas.append(name.raw[:n].decode())
    run_addr = ctypes.cast(lib.lw_probe_run, ctypes.c_void_p).value
    if os.environ.get("LW_ISA_EMULATE_DEBUG"):
        print(f"lw_probe_run at {run_addr:#x}", file=sys.stderr)
    if "--partial-model" in sys.argv:
        on_partial_model(lib, isas, run_addr)
        return
    native = native_sets() & set(isas)

    cases = []
    for case in range(lib.lw_probe_cases()):
        for seed in (1, 2, 3):
            probe = lib.lw_probe_new(case, seed)
            n = lib.lw_probe_len(probe)
            # Result buffers are made before the memory is mapped.
            outs = {f"native {name}": floats(n) for name in isas if name in native}
            outs.update({f"emulated {name}": floats(n) for name in isas})
            cases.append((case, seed, probe, n, outs))
    try:
        emu = Emulator()
    except ImportError as e:
        print(f"isa_emulate: the emulator is not installed ({e}): pip install bochscpu-python", file=sys.stderr)
        sys.exit(2)

    report = []
    ok = True
    for case, seed, probe, n, outs in cases:
        for i, name in enumerate(isas):
            if name in native:
                lib.lw_probe_run(probe, i, outs[f"native {name}"])
        faults, executed = {}, {}
        for i, name in enumerate(isas):
            kind = f"emulated {name}"
            faults[kind] = emu.call(run_addr, [probe, i, ctypes.addressof(outs[kind])], count=seed == 1)
            executed[name] = emu.executed
        got = {kind: bits(v) for kind, v in outs.items()}
        same = all(b == got["native avx2"] for b in got.values()) and not any(faults.values())
        finite = all(x == x for x in outs["native avx2"])
        ok &= same and finite
        report.append(
            {
                "case": lib.lw_probe_name(case).decode(),
                "seed": seed,
                "results": n,
                "compared": sorted(got),
                "faults": {k: v for k, v in faults.items() if v is not None},
                "same_bits": same,
                "instructions": executed if seed == 1 else None,
            }
        )

    # The models that lack some sets, each in a process of its own.
    partial = {}
    for model, lacking in PARTIAL_MODELS.items():
        child = subprocess.run(
            [sys.executable, sys.argv[0], args[0], "--partial-model"],
            env=dict(os.environ, **{MODEL_ENV: model}),
            capture_output=True,
            text=True,
        )
        try:
            runs = json.loads(child.stdout)
        except ValueError:
            print(f"isa_emulate: the run on {model} failed:\n{child.stderr}", file=sys.stderr)
            sys.exit(2)
        for name, run in runs.items():
            run["expected"] = "invalid opcode" if name in lacking else "same bits"
            if name in lacking:
                run["ok"] = run["fault"] == INVALID_OPCODE
            else:
                run["ok"] = run["fault"] is None and run["same_bits"]
            ok &= run["ok"]
        partial[model] = runs

    for _, _, probe, _, _ in cases:
        lib.lw_probe_free(probe)
    if as_json:
        print(json.dumps({"ok": ok, "native": sorted(native), "isas": isas,
                          "cases": report, "partial_models": partial}))
    else:
        print(f"sets: {', '.join(isas)}; native here: {', '.join(sorted(native))}")
        for r in report:
            status = "same bits" if r["same_bits"] else "DIFFERENT"
            faults = f" faults {r['faults']}" if r["faults"] else ""
            count = r["instructions"]
            ran = ("; instructions " + ", ".join(f"{k} {v}" for k, v in count.items())
                   if count else "")
            print(f"{r['case']:<28} seed {r['seed']}: {r['results']:>3} results, "
                  f"{len(r['compared'])} runs, {status}{faults}{ran}")
        for model, runs in partial.items():
            for name, run in runs.items():
                fault = "runs" if run["fault"] is None else f"fault {run['fault']}"
                print(f"on {model}: {name} {fault}, expected {run['expected']}: "
                      f"{'ok' if run['ok'] else 'WRONG'}")
        print("all match" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
