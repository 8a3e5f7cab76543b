"""JupyterLab in a real browser: start JupyterLab headless on localhost, drive Debian's Chromium through Playwright,
run lessons as a learner would, move their widgets and check that the pictures change.

The notebooks are learner copies with the solutions kept, written into a temporary folder (JupyterLab autosaves;
the repository's notebooks are never opened). Screenshots go to $DALLE_COURSE_SCREENSHOTS if set (the committed ones
in nbs/images/browser/ were made so), else into the temporary folder.

Without Chromium or Playwright the test is skipped, unless DALLE_COURSE_REQUIRE_BROWSER=1 (set by .ci/run), where it
fails instead."""
import json, os, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from dalle_course.exercises import write_learner_copies

CHROMIUM = os.environ.get('DALLE_COURSE_CHROMIUM', '/usr/bin/chromium')
REQUIRED = os.environ.get('DALLE_COURSE_REQUIRE_BROWSER') == '1'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']
TOKEN = 'dalle-course-browser-test'


def _missing() -> str | None:
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return 'playwright is not installed (pip install -e ".[dev]")'
    if not Path(CHROMIUM).exists(): return f'no Chromium at {CHROMIUM} (apt-get install chromium)'
    return None


if _missing():
    if REQUIRED: raise RuntimeError(f'DALLE_COURSE_REQUIRE_BROWSER=1 but {_missing()}')
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "A JupyterLab server on localhost over learner copies (solutions kept); yields (base url, folder, shots folder)."
    root = tmp_path_factory.mktemp('lab')
    course = root / 'course'
    write_learner_copies(out_dir=course, solutions=True)
    shots = Path(os.environ.get('DALLE_COURSE_SCREENSHOTS') or root / 'screenshots'); shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    settings = root / 'settings' / '@jupyterlab' / 'apputils-extension'          # no news or update pop-ups
    settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(root / 'config'), 'JUPYTER_RUNTIME_DIR': str(root / 'runtime'),
           'IPYTHONDIR': str(root / 'ipython'), 'JUPYTERLAB_SETTINGS_DIR': str(root / 'settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(root / 'workspaces'), 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    log = open(root / 'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                             f'--ServerApp.root_dir={course}', f'--IdentityProvider.token={TOKEN}',
                             '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=',
                             '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
                             '--ServerApp.disable_check_xsrf=True', '--ServerApp.allow_root=True',
                             '--LabApp.extension_manager=readonly'],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=course)
    base = f'http://127.0.0.1:{port}'
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f'{base}/api/status?token={TOKEN}', timeout=2); break
            except OSError:
                if proc.poll() is not None: break
                time.sleep(0.5)
        else: pytest.fail('JupyterLab did not start within 2 minutes: ' + (root / 'lab.log').read_text()[-2000:])
        if proc.poll() is not None: pytest.fail('JupyterLab exited: ' + (root / 'lab.log').read_text()[-2000:])
        yield base, course, shots
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


@pytest.fixture(scope='module')
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


PANEL = "(name) => Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.context && w.context.path === name)"


def _open(browser, base, name):
    "A fresh page (its own workspace) with the notebook open and its kernel idle."
    page = browser.new_page(viewport={'width': 1400, 'height': 1000})
    page.set_default_timeout(120_000)
    page.goto(f'{base}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={TOKEN}')
    page.wait_for_function(f"""(name) => {{ if (!window.jupyterapp || !window.jupyterapp.shell) return false;  // still loading
        const p = ({PANEL})(name);
        return p && p.sessionContext.session && p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }}""",
                           arg=name)
    return page


def _run_all(page, course, name, timeout_s=300):
    "Run → Run All Cells, wait until every code cell has run and the kernel is idle, save; return the saved notebook."
    page.evaluate(f"""(name) => {{ const p = ({PANEL})(name); window.jupyterapp.shell.activateById(p.id);
        return window.jupyterapp.commands.execute('notebook:run-all-cells'); }}""", name)
    try:
        page.wait_for_function(f"""(name) => {{ const p = ({PANEL})(name);
            const code = p.content.widgets.filter(c => c.model.type === 'code' && c.model.sharedModel.source.trim() !== '');
            return code.every(c => c.model.executionCount !== null && !c.promptNode.textContent.includes('*'))
                   && p.sessionContext.session.kernel.status === 'idle'; }}""", arg=name, timeout=timeout_s * 1000)
    except Exception:
        page.screenshot(path=str(course / f'{Path(name).stem}_stuck.png'))
        raise
    page.evaluate(f"(name) => window.jupyterapp.commands.execute('docmanager:save')", name)
    page.wait_for_function(f"(name) => !({PANEL})(name).context.model.dirty", arg=name)
    return json.loads((course / name).read_text())


def _errors(nb):
    return [(i, o.get('ename'), o.get('evalue')) for i, c in enumerate(nb['cells']) if c['cell_type'] == 'code'
            for o in c.get('outputs', []) if o.get('output_type') == 'error']


def _plot_src(page, interact):
    "The data URL of the picture an interact widget shows now (waits for it)."
    img = interact.locator('img').first
    img.wait_for(state='visible')
    return img.get_attribute('src')


def _wait_new_plot(page, interact, before):
    for _ in range(200):
        src = _plot_src(page, interact)
        if src != before: return src
        time.sleep(0.1)
    return before


def test_gumbel_temperature_slider(lab, browser):
    base, course, shots = lab
    page = _open(browser, base, '10_gumbel.ipynb')
    nb = _run_all(page, course, '10_gumbel.ipynb')
    assert not _errors(nb), _errors(nb)
    assert all(c.get('execution_count') for c in nb['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).strip())
    interact = page.locator('.widget-interact').first
    interact.scroll_into_view_if_needed()
    before = _plot_src(page, interact)
    interact.screenshot(path=str(shots / 'gumbel_tau_1.png'))
    readout = interact.locator('.widget-readout').first          # the slider's value box: type a new τ
    assert readout.inner_text().strip() in ('1.00', '1.0', '1')
    handle = interact.locator('.noUi-handle').first
    handle.focus()
    for _ in range(30): page.keyboard.press('ArrowLeft')       # 30 steps of 0.05 in log10 τ: τ 1 → 0.03
    after = _wait_new_plot(page, interact, before)
    assert after != before, 'moving the τ slider did not redraw the plot'
    assert float(readout.inner_text()) < 0.1, readout.inner_text()
    interact.screenshot(path=str(shots / 'gumbel_tau_small.png'))
    page.screenshot(path=str(shots / 'gumbel_lab.png'))
    page.close()


def test_mask_explorer(lab, browser):
    base, course, shots = lab
    page = _open(browser, base, '21_masks.ipynb')
    nb = _run_all(page, course, '21_masks.ipynb')
    assert not _errors(nb), _errors(nb)
    interact = page.locator('.widget-interact').first
    interact.scroll_into_view_if_needed()
    before = _plot_src(page, interact)
    interact.screenshot(path=str(shots / 'masks_row.png'))
    interact.locator('select').first.select_option('conv')       # the kind: row → conv
    mid = _wait_new_plot(page, interact, before)
    assert mid != before, 'choosing another mask kind did not redraw the mask'
    handle = interact.locator('.noUi-handle').first              # text_len: 4 → 7
    handle.focus()
    for _ in range(3): page.keyboard.press('ArrowRight')
    after = _wait_new_plot(page, interact, mid)
    assert after != mid, 'moving the caption-length slider did not redraw the mask'
    interact.screenshot(path=str(shots / 'masks_conv_text7.png'))
    page.screenshot(path=str(shots / 'masks_lab.png'))
    page.close()


def test_prompt_box(lab, browser):
    "The opening lesson's prompt box: type a description, press Draw, see new images and the ruler's verdict; a bad one is refused."
    base, course, shots = lab
    page = _open(browser, base, '000_start_here.ipynb')
    nb = _run_all(page, course, '000_start_here.ipynb')
    assert not _errors(nb), _errors(nb)
    box = page.locator('.widget-vbox').filter(has=page.locator('button', has_text='Draw')).first
    box.scroll_into_view_if_needed()
    box.locator('.widget-html').filter(has_text='ruler:').first.wait_for()          # the first drawing's verdict
    before = box.locator('img').first.get_attribute('src')
    field = box.locator('input[type="text"]').first
    field.fill('0 40 b up 5 40 r middle 6 40 w down')
    box.locator('button', has_text='Draw').click()
    after = _wait_new_plot(page, box, before)
    assert after != before, 'Draw did not show new images'
    verdict = box.locator('.widget-html').filter(has_text='ruler:').first.inner_text()
    assert 'binding' in verdict and 'exact' in verdict, verdict
    box.screenshot(path=str(shots / 'prompt_box.png'))
    field.fill('0 40 b up 5 40 purple middle 6 40 w down')                           # not a colour
    box.locator('button', has_text='Draw').click()
    err = box.locator('.widget-html').filter(has_text='purple').first
    err.wait_for()
    assert 'not a colour' in err.inner_text(), err.inner_text()
    page.close()
