"""The rule that keeps a chain of programmatic dependent launches exact (hogwild_kernels/pdl.py),
checked in the kernels' source: before its wait a chained kernel reads only what no kernel of
the chain writes, and writes nothing.

A kernel's programs may start while the kernel before it still runs, so an activation read
before the wait could be the previous pass's or layer's; the GPU tests would catch it only
when the timing happens to expose it. Here every pointer a chained kernel names before its
wait must be one of PASS_CONSTANTS (weights, the pass's plan and rotations), or be only
prefetched into the L2 cache (which puts nothing in registers). Memory is named *_ptr, or
*_desc for a tensor descriptor (read by its `.load`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels" / "hogwild_kernels"
MODULES = ("fused.py", "skinny.py", "triton_attention.py")
# pointers to memory no kernel of a chain writes: weights, the pass's plan (copied in before the
# pass), the rotations and slots computed or copied at the pass's start
PASS_CONSTANTS = {"w_ptr", "w2_ptr", "tables_ptr", "slot_ptr", "cos_ptr", "sin_ptr", "tok_start_ptr",
                  "unit_item_ptr", "unit_kstart_ptr", "unit_kend_ptr", "unit_pair_ptr", "unit_npairs_ptr",
                  "pair_tok_ptr", "pair_cos_ptr", "pair_sin_ptr", "pair_limit_ptr", "pair_part_ptr"}
WAITS = {"chain_start", "gdc_wait"}
WRITES = {"store", "atomic_add", "atomic_xchg", "atomic_cas", "atomic_max", "atomic_min"}
MEMORY = ("_ptr", "_desc")  # the names of memory: pointers and tensor descriptors


def _called(node: ast.AST) -> set[str]:
    """Names of the functions called anywhere in node (the last part of a dotted name)."""
    return {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
            for c in ast.walk(node) if isinstance(c, ast.Call)}


def _before_wait(body: list[ast.stmt]) -> tuple[list[ast.stmt], bool]:
    """The statements a kernel runs before the first one that waits, and whether one waits."""
    out = []
    for stmt in body:
        if _called(stmt) & WAITS:
            return out, True
        out.append(stmt)
    return out, False


def _names(expr: ast.AST, aliases: dict[str, set[str]]) -> set[str]:
    """The names of memory (MEMORY) an expression's value comes from, through earlier assignments
    (aliases); a pointer's `.dtype` is not its memory."""
    dtype_of = {id(n.value) for n in ast.walk(expr) if isinstance(n, ast.Attribute) and n.attr == "dtype"}
    out: set[str] = set()
    for n in ast.walk(expr):
        if isinstance(n, ast.Name) and id(n) not in dtype_of:
            out |= aliases.get(n.id, {n.id} if n.id.endswith(MEMORY) else set())
    return out


def _prefetch_only(fn: ast.FunctionDef, helpers: dict[str, ast.FunctionDef]) -> set[int]:
    """Positions of a helper's memory parameters that its body only prefetches (hands to
    prefetch_l2, or to such a parameter of another helper), never loads."""
    params = [a.arg for a in fn.args.args]
    loaded = _pointers_read(fn.body, helpers)
    return {i for i, name in enumerate(params) if name.endswith(MEMORY) and name not in loaded}


def _pointers_read(stmts: list[ast.stmt], helpers: dict[str, ast.FunctionDef] | None = None) -> set[str]:
    """Names of memory the statements pass to a call (a load, a helper that loads) or call a
    method of (a descriptor's load), directly or through names assigned from them, except to
    prefetch_l2 (which puts nothing in registers) and to the parameters of a module's helper
    (helpers) that the helper only prefetches."""
    helpers = helpers or {}
    aliases: dict[str, set[str]] = {}
    for s in stmts:
        for n in ast.walk(s):
            if isinstance(n, ast.Assign):
                for target in n.targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Name):
                            aliases[t.id] = aliases.get(t.id, set()) | _names(n.value, aliases)
    calls = [c for s in stmts for c in ast.walk(s) if isinstance(c, ast.Call)]
    prefetched = {id(n) for c in calls if getattr(c.func, "id", "") == "prefetch_l2" for n in ast.walk(c)}
    for c in calls:
        helper = helpers.get(getattr(c.func, "id", ""))
        if helper is not None:
            only = _prefetch_only(helper, helpers)
            prefetched |= {id(n) for i, arg in enumerate(c.args) if i in only for n in ast.walk(arg)}
    methods_of = [c.func.value for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr != "dtype"]
    return {name for c in calls if id(c) not in prefetched
            for arg in [*c.args, *(k.value for k in c.keywords)] if id(arg) not in prefetched
            for name in _names(arg, aliases)} | {name for obj in methods_of for name in _names(obj, aliases)}


def module_functions(module: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((KERNELS / module).read_text())
    return {fn.name: fn for fn in tree.body if isinstance(fn, ast.FunctionDef)}


def chained_kernels() -> list[tuple[str, ast.FunctionDef]]:
    return [(f"{module}:{name}", fn) for module in MODULES for name, fn in module_functions(module).items()
            if any(a.arg == "CHAINED" for a in fn.args.args)]


def test_the_kernels_of_the_chain_are_found():
    names = {name.split(":")[1] for name, _ in chained_kernels()}
    assert {"_add_rms_norm_kernel", "_silu_mul_kernel", "_skinny_kernel", "_rope_shift_partial_kernel",
            "_merge_partials_kernel", "_kv_append_kernel", "_qk_norm_kv_append_kernel"} <= names


@pytest.mark.parametrize("name,fn", chained_kernels(), ids=[name for name, _ in chained_kernels()])
def test_a_chained_kernel_reads_only_pass_constants_before_its_wait(name, fn):
    before, waits = _before_wait(fn.body)
    assert waits, f"{name} never waits for the kernel before it"
    written = {c for s in before for c in _called(s)} & WRITES
    assert not written, f"{name} writes ({sorted(written)}) before its wait"
    read = _pointers_read(before, module_functions(name.split(":")[0])) - PASS_CONSTANTS
    assert not read, f"{name} reads {sorted(read)} before its wait: a kernel still running may write them"


def test_the_check_sees_an_activation_read_early():
    """The same check on a kernel that loads its input before the wait, through a name: refused;
    taking its address and prefetching it are not reads."""
    fn = ast.parse("def k(x_ptr, w_ptr, CHAINED):\n"
                   "    w = tl.load(w_ptr)\n"
                   "    row = x_ptr + 4\n"
                   "    prefetch_l2(x_ptr)\n"
                   "    x = tl.load(row, mask=None)\n"
                   "    chain_start(CHAINED)\n").body[0]
    before, waits = _before_wait(fn.body)
    assert waits and _pointers_read(before) - PASS_CONSTANTS == {"x_ptr"}
    assert _pointers_read(before[:3]) - PASS_CONSTANTS == set()  # its address taken and prefetched only


def test_the_check_sees_a_descriptor_loaded_early():
    """A tensor descriptor's load before the wait is a read (directly, through a name, or in a
    helper handed the descriptor); its dtype is not."""
    helpers = {fn.name: fn for fn in ast.parse("def tile(row, k_desc):\n    return k_desc.load([row, 0])\n").body}
    fn = ast.parse("def k(k_desc, v_desc, CHAINED):\n"
                   "    x = p.to(v_desc.dtype)\n"
                   "    d = k_desc\n"
                   "    a = d.load([0, 0])\n"
                   "    b = tile(0, v_desc)\n"
                   "    chain_start(CHAINED)\n").body[0]
    before, waits = _before_wait(fn.body)
    assert waits and _pointers_read(before[:1], helpers) == set()
    assert _pointers_read(before[:3], helpers) == {"k_desc"}
    assert _pointers_read(before[3:], helpers) == {"v_desc"}


def test_a_helper_that_only_prefetches_passes_and_one_that_loads_does_not():
    """A pointer handed to a module's helper counts as read unless the helper only prefetches it:
    the helper's own loads (its page table here) still count."""
    helpers = {fn.name: fn for fn in ast.parse(
        "def ask(first, tables_ptr, k_ptr):\n"
        "    page = tl.load(tables_ptr + first)\n"
        "    prefetch_l2(k_ptr + page)\n"
        "def grab(k_ptr):\n"
        "    return tl.load(k_ptr)\n").body}
    fn = ast.parse("def k(x_ptr, y_ptr, tables_ptr, CHAINED):\n"
                   "    ask(0, tables_ptr, x_ptr)\n"
                   "    grab(y_ptr)\n"
                   "    ask(0, x_ptr, y_ptr)\n"
                   "    chain_start(CHAINED)\n").body[0]
    before, _ = _before_wait(fn.body)
    assert _pointers_read(before[:1], helpers) == {"tables_ptr"}
    assert _pointers_read(before[1:2], helpers) == {"y_ptr"}
    assert _pointers_read(before[2:], helpers) == {"x_ptr"}
