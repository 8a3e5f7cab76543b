"""The layers of the library, and of the course, as rules a change cannot break unnoticed.

Library: every module sits on one part of `tests/layers.whiteboard.json` (the layering drawn for `farm-studio draw`),
the parts have an order from low to high, and no module imports (at its top or inside a function) a module of a
higher part, nor crosses a 'never' of the whiteboard. Course: a lesson imports only from modules of its own or
earlier lessons. Shipped files: found through `core.shipped`, never beside the package by hand."""
import ast, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / 'dalle_course'
WHITEBOARD = json.loads((Path(__file__).parent / 'layers.whiteboard.json').read_text())
# low -> high: a module may import its own part and the parts before it
ORDER = ['Base', 'Data', 'Models', 'Loop', 'Inference', 'Judges', 'Training', 'Apps', 'Course', 'Face']
PART = {Path(f).stem: part for part, p in WHITEBOARD['parts'].items() for f in p['is']}
MODULES = sorted(p.stem for p in LIB.glob('*.py') if not p.stem.startswith('_'))


def imports_of(path: Path) -> list[tuple[str, int]]:
    "(module of this package, line) for every import in the file, at its top or inside a function."
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: name = mod.split('.')[0] if mod else None
            elif mod.startswith('dalle_course.'): name = mod.split('.')[1]
            elif mod == 'dalle_course': name = None  # `from dalle_course import x`: checked below as x
            else: continue
            names = [name] if name else [a.name for a in node.names]
            out += [(n, node.lineno) for n in names if n in MODULES]
        elif isinstance(node, ast.Import):
            out += [(a.name.split('.')[1], node.lineno) for a in node.names
                    if a.name.startswith('dalle_course.') and a.name.split('.')[1] in MODULES]
    return out


def test_order_names_every_part_once():
    assert sorted(ORDER) == sorted(WHITEBOARD['parts'])


def test_every_module_is_on_one_part():
    missing = [m for m in MODULES if m not in PART]
    assert not missing, f"modules on no part of tests/layers.whiteboard.json: {missing}"


@pytest.mark.parametrize('module', MODULES)
def test_no_module_imports_a_higher_layer(module):
    me = ORDER.index(PART[module])
    up = [f"{module}.py:{line} imports {target} ({PART[target]})" for target, line in imports_of(LIB / f'{module}.py')
          if ORDER.index(PART[target]) > me]
    assert not up, f"{module} ({PART[module]}) imports a higher layer: {up}"


def test_no_never_of_the_whiteboard_is_crossed():
    broken = [f"{m} -> {t}: {why}" for m in MODULES for t, _ in imports_of(LIB / f'{m}.py')
              for a, b, why in WHITEBOARD['never'] if PART[m] == a and PART[t] == b]
    assert not broken, broken


def test_the_rule_catches_an_upward_import(tmp_path):
    "The checker itself: a model module that imports the training layer is caught."
    f = tmp_path / 'prior.py'
    f.write_text("from .core import InputError\ndef f():\n    from dalle_course.prior_training import train_prior\n")
    found = imports_of(f)
    assert ('core', 1) in found and ('prior_training', 3) in found
    assert ORDER.index(PART['prior_training']) > ORDER.index(PART['prior'])


# ---- the course: lessons import only what earlier lessons (or they themselves) export
def _notebooks():
    exp, nbs = {}, sorted((ROOT / 'nbs').glob('*.ipynb'))
    for nb in nbs:
        for c in json.loads(nb.read_text())['cells']:
            m = re.search(r'#\| default_exp (\w+)', ''.join(c['source']))
            if m: exp[m.group(1)] = nb.name
    return nbs, exp


COURSE_MACHINERY = {'checks', 'exercises'}  # the exercise checks of every lesson live in one module (lesson 91)
TOUR = '000_start_here.ipynb'               # the tour shows the finished product first, on purpose


def lesson_imports(nb: Path) -> set[str]:
    """Modules a lesson's cells import: every import in its own cells, and the top-level imports of what it exports
    (an import inside an exported function runs only when a later lesson calls it)."""
    mods = set()
    for c in json.loads(nb.read_text())['cells']:
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        lines = src.splitlines()
        if src.startswith('#| export'): lines = [l for l in lines if not l.startswith((' ', '\t'))]
        for l in lines:
            for m in re.findall(r'from dalle_course\.(\w+) import|import dalle_course\.(\w+)', l):
                mods.add(next(x for x in m if x))
    return mods


def test_lessons_import_only_earlier_lessons():
    nbs, exported = _notebooks()
    late = {nb.name: sorted(m for m in lesson_imports(nb) if m in exported and exported[m] > nb.name and m not in COURSE_MACHINERY)
            for nb in nbs if nb.name != TOUR}
    late = {k: v for k, v in late.items() if v}
    assert not late, f"lessons importing a later lesson's module: {late}"


def test_no_module_finds_shipped_files_by_hand():
    "Shipped files are found through core.shipped (inside an installed package, or data/ in a clone)."
    bad = [p.name for p in LIB.glob('*.py') if p.name not in ('_modidx.py', 'core.py')
           and re.search(r"parent\s*/\s*'data'", p.read_text())]
    assert not bad, bad


def test_help_answers_without_importing_torch():
    "`dalle-course --help` (and a mistyped command) parse without the library: no torch import, a quick answer."
    import subprocess, sys
    code = ("import sys\nfrom dalle_course.cli import main\n"
            "for argv in (['--help'], ['trian']):\n"
            "    try: main(argv)\n"
            "    except SystemExit as e: print('exit', e.code)\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    out = r.stdout.split()
    assert r.returncode == 0 and out[-1] == 'False', r.stdout + r.stderr
    assert 'exit 0' in r.stdout and 'exit 2' in r.stdout and "invalid choice: 'trian'" in r.stderr
    for cmd in ('data', 'train', 'sample', 'demo', 'bench', 'eval', 'lessons', 'exercises'): assert cmd in r.stdout
