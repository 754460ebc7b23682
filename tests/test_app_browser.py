"""The app in a real browser: Debian chromium driven by Playwright against `make run` on 127.0.0.1,
with the embedded default parent (loaded when the app opens). Goes through every page, asks the neuron
inspector what outsized dimensions and one FFN neuron fire on, clicks a point of the shape explorer, generates
a child, trains it 10 steps next to its random twin (the settings survive a page switch), and saves a
screenshot of each page under test-artifacts/screenshots/."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.default_parent]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
SLOW = 420_000  # ms: one step on the default parent, the app sharing 2 cores with the other test worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app started exactly as the README says, `make run` (with a free PORT), writing under a temporary
    output folder. Yields the URL, the output folder and the server's process id."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (`make setup` installs it)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    port = _free_port()
    out = tmp_path_factory.mktemp("browser-outputs")
    env = {**os.environ, "SUBCLONE_OUTPUT_DIR": str(out), "SUBCLONE_MAX_JOBS": "1"}
    log = (out / "streamlit.log").open("w")
    # a session of its own, so that the whole group (make and the server it execs) is stopped at the end
    process = subprocess.Popen(["make", "--no-print-directory", "run", f"PORT={port}"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process)
        yield url, out, _server_pid(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        # make execs streamlit, so SIGTERM reaches the server, which exits cleanly (make used to abort: 134)
        assert process.returncode in (0, -signal.SIGTERM), f"make run exited with {process.returncode}"


def _server_pid(make_pid: int) -> int:
    """The streamlit server: the process that `make run` started (its recipe execs streamlit)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == make_pid:  # fields[1] is the parent's pid
            return int(stat.parent.name)
    raise RuntimeError(f"no child process of make (pid {make_pid})")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (and its waited-for children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _assert_server_idle(pid: int) -> None:
    """The idle server watches no files and leaves the cores free. Streamlit's default watcher put inotify
    watches on the project folder, 2.2 GB .venv included, and kept a core 93-100% busy doing nothing."""
    links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.is_symlink()]
    assert "anon_inode:inotify" not in links, "the server watches files (server.fileWatcherType is not none)"
    before, start = _cpu_seconds(pid), time.monotonic()
    time.sleep(5)
    busy = (_cpu_seconds(pid) - before) / (time.monotonic() - start)
    assert busy < 0.3, f"the idle server used {busy:.0%} of a core"


@pytest.fixture(scope="module")
def page(app_url, request):
    """A Chromium tab; when a test using it failed, what the tab showed and the server's log are kept under
    test-artifacts/ (CI keeps no temporary folder)."""
    from playwright.sync_api import sync_playwright

    failed_before = request.session.testsfailed
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT)
        tab = context.new_page()
        tab.set_default_timeout(SLOW)
        yield tab
        if request.session.testsfailed > failed_before:
            _keep_failure(tab, app_url[1] / "streamlit.log")
        context.close()
        browser.close()


def _keep_failure(page, log: Path) -> None:
    """The failed page's screenshot and text, and the server log, under test-artifacts/."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "failed.png"), full_page=True)
    (SHOTS.parent / "failed-page.txt").write_text(page.inner_text("body"))
    if log.exists():
        (SHOTS.parent / "failed-streamlit.log").write_text(log.read_text())
    print(f"the failed page and the server log are in {SHOTS.parent}")


def _idle(page) -> None:
    """Wait until Streamlit has finished the current script run (the app root's script-state attribute)."""
    page.wait_for_timeout(300)
    page.wait_for_function("""() => {
        const state = document.querySelector('[data-testid="stApp"]')?.getAttribute('data-test-script-state');
        return state && !['running', 'rerunRequested', 'initial'].includes(state);
    }""", timeout=SLOW)


def _wait_quietly(page, predicate: str) -> None:
    """Wait until the JavaScript ``predicate`` holds, up to 30 s; on timeout return and let the asserts say what
    the page shows instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.wait_for_function(predicate, timeout=30_000)
    except PlaywrightTimeoutError:
        pass


def _number_box(page, label: str):
    """A number input by the start of its label (the app appends the valid range, e.g. "Steps (1 to ...)")."""
    return page.get_by_role("spinbutton", name=re.compile("^" + re.escape(label) + r" \("))


def _set_number(page, label: str, value: int) -> None:
    """Type a number and commit it with Enter; check that the rerun kept it."""
    from playwright.sync_api import expect

    box = _number_box(page, label)
    box.fill(str(value))
    box.press("Enter")
    _idle(page)
    expect(box).to_have_value(str(value))


def _step_done(page) -> None:
    """Wait for a background page step to finish: its Cancel button goes away."""
    page.get_by_role("button", name="Cancel").first.wait_for(state="detached")
    _idle(page)


def _goto(page, title: str) -> None:
    page.get_by_role("link", name=title).click()
    _idle(page)


def _shot(page, name: str) -> None:
    """A screenshot of the whole page: the viewport grows to the height of Streamlit's scrolling main area."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("""() => Math.max(...Array.from(document.querySelectorAll(
        '[data-testid="stMain"], [data-testid="stMainBlockContainer"], '
        + '[data-testid="stAppViewContainer"], body'
    )).map(e => e.scrollHeight + e.getBoundingClientRect().top))""")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(max(height, VIEWPORT["height"]), 8000)})
    page.wait_for_timeout(800)  # charts re-layout to the new size
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(VIEWPORT)


def _no_errors(page) -> None:
    errors = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
    assert errors.count() == 0, errors.all_inner_texts()


def _upload_text_then_go_back(page, folder: Path) -> None:
    """Upload a text file as the data (the parent is evaluated on it), then return to the default text."""
    corpus = folder / "corpus.txt"
    sentence = "The river runs past the old mill and the town square where people meet on market days."
    corpus.write_text("\n\n".join(f"{sentence} Paragraph {i} adds a little more text." * 3 for i in range(300)))
    data = page.get_by_test_id("stRadio").nth(1)
    data.get_by_text("Upload a text file").click()
    _idle(page)
    page.locator('input[type="file"]').set_input_files(str(corpus))
    page.get_by_role("button", name="Use this file").click()
    page.get_by_text("Using: upload corpus.txt").wait_for()
    _idle(page)
    _no_errors(page)
    data.get_by_text("Embedded Wikipedia text").click()
    page.get_by_text("Using: Embedded Wikipedia text").wait_for()
    _idle(page)


def _inspect_neurons(page) -> None:
    """Inspector tab: the outsized residual dimensions, then FFN neuron 7 of block 3; their tables appear."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Inspector").click()
    page.get_by_role("button", name="What do they fire on?").click()
    outsized = page.get_by_text(re.compile(r"^Residual dimension \(block output\) \d+, block \d+$"))
    outsized.first.wait_for()
    _step_done(page)
    assert outsized.count() >= 1
    expect(page.get_by_test_id("stDataFrame")).to_have_count(outsized.count())  # a table per dimension
    page.get_by_test_id("stSelectbox").filter(has_text="Unit").click()
    page.get_by_role("option", name="FFN neuron").click()
    _idle(page)
    _set_number(page, "Block", 3)
    _set_number(page, "Index", 7)
    page.get_by_role("button", name="Show top activations").click()
    page.get_by_text("FFN neuron 7, block 3", exact=True).wait_for()
    _step_done(page)
    expect(page.get_by_test_id("stDataFrame")).to_have_count(1)  # this neuron's table replaced the others
    _no_errors(page)
    _shot(page, "2c-inspector")


def _explore_and_click_a_point(page) -> None:
    """Shape explorer: score the shapes near the default budget, click a Pareto point; the shape inputs
    take that point's blocks and width."""
    from playwright.sync_api import expect

    page.get_by_text("Explore shapes near a parameter budget").click()
    _number_box(page, "Parameter budget (millions)").wait_for()
    # a small budget (the default is the starting shape's, 50 M on SmolLM2): 4 shapes of 2-12 blocks, one of them
    # (6 x 128: 7.9 against random init's 10.9) on the front; at 12 M, 6 shapes of 2-30 blocks took 3.4 min
    budget = _number_box(page, "Parameter budget (millions)")
    budget.fill("8")
    budget.press("Enter")
    _idle(page)
    expect(budget).to_have_value("8.000")  # the box shows three decimals
    page.get_by_role("button", name="Explore shapes", exact=True).click()
    page.get_by_text("Explored shape").wait_for(timeout=600_000)  # each shape is refit
    _step_done(page)
    chart = page.locator(".js-plotly-plot").filter(has_text="Pareto front").first
    point = chart.evaluate("""gd => {
        const i = gd.data.findIndex(t => t.name === 'Pareto front');
        const t = gd.data[i], n = t.x.length - 1, L = gd._fullLayout, s = L._size;
        return {label: t.text[n], x: s.l + L.xaxis.l2p(t.x[n]), y: s.t + L.yaxis.l2p(t.y[n])};
    }""")
    box = chart.bounding_box()
    page.mouse.click(box["x"] + point["x"], box["y"] + point["y"])
    _idle(page)
    layers, hidden = point["label"].split("x")
    expect(_number_box(page, "Blocks")).to_have_value(layers)
    expect(_number_box(page, "Hidden")).to_have_value(hidden)
    _no_errors(page)
    _shot(page, "4b-explorer")


def test_every_page_in_a_real_browser(app_url, page):
    from playwright.sync_api import expect

    url, out, server = app_url
    page.goto(url)
    page.get_by_text("Perplexity").first.wait_for()  # the default parent is loaded on open, no click
    _idle(page)
    _assert_server_idle(server)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("blockquote").first.wait_for()
    _no_errors(page)
    _upload_text_then_go_back(page, out)
    _shot(page, "1-parent")

    _goto(page, "2. Importance")
    _set_number(page, "Calibration token budget (for images: patches)", 1024)
    page.get_by_role("button", name="Run calibration").click()
    page.get_by_text("Mean rank correlation").first.wait_for(state="attached")
    _step_done(page)
    page.locator(".js-plotly-plot").nth(1).wait_for()  # the score curve and the residual heatmap
    _no_errors(page)
    _shot(page, "2-importance")
    page.get_by_role("tab", name="Consistency").click()
    page.get_by_text("Mean rank correlation").first.wait_for()
    _shot(page, "2b-consistency")
    _inspect_neurons(page)

    _goto(page, "3. Blocks")
    page.get_by_text("The child keeps").wait_for()
    _set_number(page, "Validation tokens per evaluation", 128)
    page.get_by_role("button", name="Compute").click()  # one evaluation of 128 tokens per block
    page.locator(".js-plotly-plot").nth(1).wait_for()
    _step_done(page)
    page.locator(".js-plotly-plot").nth(1).wait_for()
    _no_errors(page)
    _shot(page, "3-blocks")

    _goto(page, "4. Child")
    _explore_and_click_a_point(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("subclone: validation loss").wait_for()
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved to").wait_for()
    _idle(page)
    _no_errors(page)
    _shot(page, "4-child")
    saved = list((out / "children").glob("*/model.safetensors"))
    assert saved, "the child was not saved under the output folder"

    _goto(page, "5. Train")
    settings = (("Steps", 10), ("Batch size", 4), ("Sequence length", 32), ("Validate every (steps)", 5))
    for label, value in settings:
        _set_number(page, label, value)
    page.get_by_role("button", name="Start training").click()
    page.get_by_text("Training running").or_(page.get_by_text("Training done")).first.wait_for()
    _goto(page, "1. Parent")  # the job goes on while the user looks at another page
    _goto(page, "5. Train")
    expect(_number_box(page, "Steps")).to_have_value("10")  # the settings survived the page switch
    page.get_by_text("Training done").wait_for()
    _idle(page)
    _no_errors(page)
    read_traces = """() => Object.fromEntries(
        document.querySelector('.js-plotly-plot').data.map(t => [t.name, Array.from(t.x)])
    )"""
    # the status line and the chart arrive as separate deltas and Plotly redraws asynchronously: wait for the
    # chart to catch up with "Training done" (its last validation point) before reading it
    _wait_quietly(page, f"() => ({read_traces})()['random validation']?.at(-1) === 10")
    traces = page.evaluate(read_traces)
    assert {"subclone validation", "random validation"} <= set(traces), traces  # two models, two curves
    assert traces["subclone validation"] == traces["random validation"] == [0, 5, 10]
    assert traces["subclone train"][-1] == 10
    _shot(page, "5-train")
