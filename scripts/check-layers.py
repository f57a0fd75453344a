#!/usr/bin/env python3
"""The layering rules, checked: every crate depends only on crates below it (the order
below, from ARCHITECTURE.md), dev-dependencies included, and no crate has a circle of
module imports (`crate::a` in a.rs's importers reaching back to a), and no crate that turns
its unit tests off (`test = false`) has tests in src/. Exits 1 naming each
breach; run by scripts/test.sh."""
import pathlib
import re
import sys

# Lowest first. A crate may depend on any crate before it in this list, never after.
ORDER = ["formats", "kernels", "model", "text", "hub", "convert", "engine", "eval", "openai", "server",
         "python", "cli"]

root = pathlib.Path(__file__).resolve().parent.parent
problems = []

def entries(manifest: pathlib.Path):
    """(section header, stripped line) for each line of a manifest below a header."""
    section = None
    for line in manifest.read_text().splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s
        elif section:
            yield section, s

def deps(manifest: pathlib.Path):
    out = []
    for section, s in entries(manifest):
        m = re.match(r'gemma3-([a-z]+)\b', s)
        if m and section in ("[dependencies]", "[dev-dependencies]", "[build-dependencies]"):
            out.append((m.group(1), section))
    return out

def untested(manifest: pathlib.Path):
    """Whether a [lib] or [[bin]] target of the manifest turns its unit tests off."""
    return any(section in ("[lib]", "[[bin]]") and re.fullmatch(r"test\s*=\s*false", s)
               for section, s in entries(manifest))

for crate_dir in sorted((root / "crates").iterdir()):
    manifest = crate_dir / "Cargo.toml"
    if not manifest.is_file():
        continue
    name = crate_dir.name
    if name not in ORDER:
        problems.append(f"crates/{name}: not in the layer order of scripts/check-layers.py")
        continue
    if untested(manifest) and any(re.search(r"#\[(test|cfg\(test\))\]", f.read_text())
                                  for f in (crate_dir / "src").rglob("*.rs")):
        problems.append(f"crates/{name}: sets test = false, yet src/ has tests that would never run")
    for dep, section in deps(manifest):
        if dep not in ORDER or ORDER.index(dep) >= ORDER.index(name):
            problems.append(f"crates/{name} {section} names gemma3-{dep}, which is not below it")

    # Module graph of the crate's top-level modules.
    src = crate_dir / "src"
    modules = {p.stem: p for p in src.glob("*.rs") if p.stem not in ("lib", "main")}
    for sub in src.iterdir():
        if sub.is_dir() and (sub / "mod.rs").is_file():
            modules[sub.name] = sub
    graph = {}
    for mod, path in modules.items():
        files = [path] if path.is_file() else list(path.rglob("*.rs"))
        text = "\n".join(f.read_text() for f in files)
        # Comments (docs linking to a module) are no imports.
        text = re.sub(r"//[^\n]*", "", text)
        # Leave out test modules: they may use anything in the crate.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        used = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            used |= set(re.findall(r"\b([a-z_][a-z0-9_]*)\b", group))
        graph[mod] = sorted(u for u in used if u in modules and u != mod)

    state = {}
    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                problems.append(f"crates/{name}: module circle " + " -> ".join(cycle))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("layers: every crate depends only on crates below it; no module circles")
