#!/usr/bin/env python3
"""Import circles between the modules of Rust source folders.

A module is a `NAME.rs` file or a `NAME/` folder with a `mod.rs` in the
given folder. It depends on another when its code (comment lines and
everything from its first `#[cfg(test)]` on left out) names `crate::OTHER`
or `super::OTHER`, or lists OTHER in a `crate::{...}` group. Every strongly
connected group of more than one module is printed, with its edges; the
exit status is 1 if there is one.

Usage: scripts/import_cycles.py crates/*/src crates/lw-model/src/kernels
"""

import os
import re
import sys


def modules(folder):
    names = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs", "mod.rs"):
            names[entry[:-3]] = [path]
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "mod.rs")):
            names[entry] = [
                os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".rs")
            ]
    return names


def code_of(paths):
    text = []
    for path in paths:
        src = open(path, encoding="utf-8").read()
        lines = [line for line in src.split("\n") if not line.strip().startswith("//")]
        src = "\n".join(lines)
        cut = src.find("#[cfg(test)]")
        text.append(src if cut < 0 else src[:cut])
    return "\n".join(text)


def graph(folder):
    mods = modules(folder)
    edges = {}
    for name, paths in mods.items():
        src = code_of(paths)
        found = set(re.findall(r"\b(?:crate|super)::(\w+)", src))
        for group in re.findall(r"\bcrate::\{([^}]*)\}", src, re.S):
            found.update(re.findall(r"(?:^|[,{\s])(\w+)", group))
        edges[name] = sorted(m for m in found if m in mods and m != name)
    return edges


def cycles(edges):
    """Tarjan's strongly connected components with more than one member."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main(folders):
    found = False
    for folder in folders:
        edges = graph(folder)
        for comp in cycles(edges):
            found = True
            print(f"{folder}: import circle {' '.join(comp)}")
            for m in comp:
                print(f"  {m} -> {' '.join(x for x in edges[m] if x in comp)}")
        if not any(True for _ in cycles(edges)):
            print(f"{folder}: {len(edges)} modules, no import circle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["."]))
