"""The package's import graph, function-local imports counted: no circle, imports go downward only
(data/tokenizer -> model -> train -> stages -> apps, see LAYERS), and no module takes another's
single-underscore names."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llama_jax"


def _graph():
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    g = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    g[m].add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            elif isinstance(node, ast.Import):
                g[m].update(a.name for a in node.names)
        g[m] = {t for t in g[m] if t in mods and t != m and t != "llama_jax"}
    return g


def _cycles(g):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    g = _graph()
    assert "llama_jax.model" in g["llama_jax.hf"]  # the graph is really read
    assert _cycles(g) == []


def test_a_circle_is_detected():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ----------------------------------------------------------------------------- private names, layers
def _modules():
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _resolve(m, p, node):
    """The absolute module an ImportFrom names (relative imports resolved against module m at p)."""
    base = node.module or ""
    if node.level:
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
    return base


def _dotted(node):
    """'a.b.c' for a Name / Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def _is_private(name):
    return name.startswith("_") and not name.startswith("__")


def private_imports(sources):
    """{(importer, 'target.name')} for every single-underscore name one llama_jax module takes from
    another: `from .x import _y`, or `mod._y` where `mod` is a llama_jax module bound by an import.
    sources: module name -> (path, source text)."""
    out = set()
    for m, (p, text) in sources.items():
        tree = ast.parse(text)
        bound = {}  # local name -> llama_jax module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(m, p, node)
                for a in node.names:
                    if f"{base}.{a.name}" in sources:
                        bound[a.asname or a.name] = f"{base}.{a.name}"
                    elif base in sources and base != m and _is_private(a.name):
                        out.add((m, f"{base}.{a.name}"))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "llama_jax":
                        if a.asname:
                            bound[a.asname] = a.name
                        else:
                            bound["llama_jax"] = "llama_jax"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = _dotted(node.value)
                if owner is None or owner.split(".")[0] not in bound:
                    continue
                head, _, rest = owner.partition(".")
                target = bound[head] + ("." + rest if rest else "")
                if target in sources and target != m:
                    out.add((m, f"{target}.{node.attr}"))
    return out


def _sources():
    return {m: (p, p.read_text(encoding="utf-8")) for m, p in _modules().items()}


# Layers: a module may import only from its own layer or lower ones.
LAYERS = [
    ({"data", "tokenizer", "text", "plots", "safetensors_io", "synthetic", "fsutil"}, 0),
    ({"config", "model", "attention", "sharding", "quant", "lora", "hf", "checkpoint", "generate",
      "vocab_resize", "convert", "scoring", "rl"}, 1),
    ({"train"}, 2),
    ({"stages", "export", "lm_eval_adapter"}, 3),
    ({"cli", "demo", "demo_real", "plan", "chat_cli", "serve"}, 4),
]


def layer_of(module):
    """The layer of llama_jax.<top>[...] by its first component; None when unassigned."""
    top = module.split(".")[1] if module.count(".") else None
    for names, layer in LAYERS:
        if top in names:
            return layer
    return None


def layer_violations(g):
    """{(importer, imported)} where the import goes to a higher layer."""
    return {(m, t) for m, ts in g.items() if m != "llama_jax" for t in ts if layer_of(t) > layer_of(m)}


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m != "llama_jax" and layer_of(m) is None] == []


def test_no_private_name_crosses_modules():
    found = private_imports(_sources())
    assert found == set(), "import a public name instead (make it public where it is defined)"


def test_imports_go_downward_only():
    found = layer_violations(_graph())
    assert found == set(), "a module imports from a higher layer (see LAYERS)"


def test_a_private_import_and_an_upward_import_are_detected(tmp_path):
    root = tmp_path / "llama_jax"
    src = {
        "llama_jax.hf": "def _host(x):\n    return x\n",
        "llama_jax.lora": "from .hf import _host\n",
        "llama_jax.resize": "from . import hf\n\n\ndef f(x):\n    return hf._host(x)\n",
        "llama_jax.serve.server": "import llama_jax.hf\n\n\ndef g(x):\n    return llama_jax.hf._host(x)\n",
        "llama_jax.generate": "def _own(x):\n    return _own(x)\n",  # its own private name: fine
    }
    sources = {m: (root / (m.split(".", 1)[1].replace(".", "/") + ".py"), t) for m, t in src.items()}
    assert private_imports(sources) == {("llama_jax.lora", "llama_jax.hf._host"),
                                        ("llama_jax.resize", "llama_jax.hf._host"),
                                        ("llama_jax.serve.server", "llama_jax.hf._host")}
    g = {"llama_jax.model": {"llama_jax.train.loop", "llama_jax.config"}, "llama_jax.stages.sft": {"llama_jax.model"},
         "llama_jax.train.loop": {"llama_jax.train.config"}, "llama_jax.train.config": set(),
         "llama_jax.config": set()}
    assert layer_violations(g) == {("llama_jax.model", "llama_jax.train.loop")}
