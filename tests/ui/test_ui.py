"""The web UI in a real browser (Debian's Chromium through Playwright),
against `triage serve` on copies of the shipped examples over TCP."""

import json
import re
import time

import pytest

from conftest import ADMIN_KEY, EXAMPLES, USER_KEY, artifacts, names_in

EXAMPLES_SHOWN = ["moderation.toml", "support-router.toml"]


def open_graph(page, server, key=ADMIN_KEY):
    page.goto(f"{server.base}/ui/#key={key}")
    page.wait_for_selector("section.task")
    return page.inner_text("body")


@pytest.mark.parametrize("example", EXAMPLES_SHOWN)
def test_every_task_tier_and_route_is_drawn_with_an_admin_key(servers, page, example):
    server = servers(example)
    text = open_graph(page, server)
    names = names_in(EXAMPLES / example)
    assert names, example
    missing = [n for n in names if n not in text]
    assert not missing, f"not drawn: {missing}"
    # Each name is a node (or a task heading) of its own task's graph.
    for task, t in __import__("tomllib").loads((EXAMPLES / example).read_text())["tasks"].items():
        section = page.locator(f'section.task[data-task="{task}"]')
        assert section.locator(".task-name").inner_text() == task
        drawn = set(section.locator(".node .name").all_inner_texts())
        want = {x["name"] for x in t.get("tiers", [])} | set(t.get("routes", {})) | {
            x["name"] for x in t.get("stages", [])
        }
        assert want <= drawn, (want, drawn)
    # Provider and model are on the nodes.
    if example == "moderation.toml":
        assert "gpt-4o-mini" in text and "omni-moderation-latest" in text
        assert "band 0.2 – 0.8" in text
    else:
        assert "smollm2" in text and "gpt-4o" in text
    # Signed in: no login box over the graph.
    assert not page.is_visible("#login")
    # The key left the address bar (it stays in this tab's sessionStorage).
    assert "key=" not in page.url
    page.screenshot(path=str(artifacts() / f"graph-{example}.png"), full_page=True)


@pytest.mark.parametrize("example", EXAMPLES_SHOWN)
def test_without_a_key_the_page_shows_a_login_box_and_no_names(servers, page, example):
    server = servers(example)
    response = page.goto(f"{server.base}/ui/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    page.wait_for_selector("#login:not([hidden])")
    text = page.inner_text("body")
    html = page.content()
    for name in names_in(EXAMPLES / example):
        assert name not in text, name
    assert "gpt-4o" not in html and "toxicity" not in html
    # The data itself needs the key.
    status, _, _ = server.call("GET", "/ui/api/config", key=None)
    assert status == 401
    page.screenshot(path=str(artifacts() / f"login-{example}.png"), full_page=True)


def test_a_key_that_is_not_admin_gets_the_login_box_with_the_reason(servers, page):
    server = servers("moderation.toml")
    status, _, _ = server.call("GET", "/ui/api/config", key=USER_KEY)
    assert status == 403
    page.goto(f"{server.base}/ui/#key={USER_KEY}")
    page.wait_for_selector("#login:not([hidden])")
    assert "admin key" in page.inner_text("#login-error")
    assert "hosted-moderation" not in page.inner_text("body")
    # Signing in with the admin key in the box shows the graph.
    page.fill("#login-key", ADMIN_KEY)
    page.click("#login button[type=submit]")
    page.wait_for_selector('section.task[data-task="moderation"]')


def test_the_page_has_no_inline_script(servers):
    server = servers("moderation.toml")
    status, headers, body = server.call("GET", "/ui/", key=None)
    assert status == 200
    html = body.decode()
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    assert scripts and all(s.strip() == "" for s in scripts), scripts
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))


def execute(server, text="have a nice day"):
    status, _, body = server.call("POST", "/v1/execute", {"task": "moderation", "input": text})
    return status, json.loads(body)


def test_edit_a_band_save_use_it_see_the_diff_and_roll_back(servers, page):
    server = servers("moderation.toml", editable=True)
    open_graph(page, server)
    node = page.locator('section.task[data-task="moderation"] .node[data-key="tasks.moderation.tiers[0]"]')
    node.locator("details.edit summary").click()
    # An invalid band: the validator's message is shown beside the node, nothing is written.
    node.locator('input[name="lo"]').fill("0.9")
    node.locator('input[name="hi"]').fill("0.1")
    node.locator("button.check").click()
    page.wait_for_function(
        "el => el.textContent.includes('tasks.moderation.tiers[0]')",
        arg=node.locator(".problems").element_handle(),
    )
    assert "lo ≤ hi" in node.locator(".problems").inner_text()
    page.screenshot(path=str(artifacts() / "designer-invalid.png"), full_page=True)
    node.locator("button.save").click()
    page.wait_for_selector(".node.invalid")
    assert server.config.read_text() == server.original
    # A valid band is saved (comments kept) and the next request uses it.
    node.locator('input[name="lo"]').fill("0.1")
    node.locator('input[name="hi"]').fill("0.9")
    node.locator("button.save").click()
    page.wait_for_selector("text=Saved as version 2")
    saved = server.config.read_text()
    assert "lo = 0.1" in saved and "hi = 0.9" in saved
    assert "# On tweeteval-offensive validation" in saved
    status, body = execute(server)
    assert status == 200, body
    assert "(0.1, 0.9)" in body["trace"]["tiers"][0]["reason"], body
    # The graph shows the new band after the reload.
    page.wait_for_selector("text=band 0.1 – 0.9")
    # History: the diff, then rollback to version 1.
    page.goto(f"{server.base}/ui/#view=history")
    page.wait_for_selector("table.history")
    page.locator('tr[data-number="2"] button.show-diff').click()
    diff = page.locator("pre.diff")
    diff.wait_for()
    assert "- lo = 0.2" in diff.inner_text() and "+ lo = 0.1" in diff.inner_text()
    page.screenshot(path=str(artifacts() / "history-diff.png"), full_page=True)
    page.locator('tr[data-number="1"] button.rollback').click()
    page.wait_for_selector("text=Rolled back to version 1")
    assert server.config.read_text() == server.original
    status, body = execute(server)
    assert "(0.2, 0.8)" in body["trace"]["tiers"][0]["reason"], body


def test_a_file_changed_by_hand_while_the_page_is_open_is_not_overwritten(servers, page):
    server = servers("moderation.toml", editable=True)
    open_graph(page, server)
    hand = server.config.read_text() + "\n# edited by hand\n"
    server.config.write_text(hand)
    node = page.locator('section.task[data-task="moderation"] .node[data-key="tasks.moderation.tiers[1]"]')
    node.locator("details.edit summary").click()
    node.locator('input[name="lo"]').fill("0.3")
    node.locator("button.save").click()
    page.wait_for_selector("text=changed since this page read it")
    assert server.config.read_text() == hand
    server.config.write_text(server.original)


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_dashboard_shows_the_numbers_of_metrics(servers, page):
    server = servers("moderation.toml")
    n = 6
    for i in range(n):
        status, body = execute(server, f"have a nice day number {i}")
        assert status in (200, 503), body
    _, _, raw = server.call("GET", "/metrics")
    metrics = raw.decode()
    ok = metric(metrics, "triage_task_requests_total", task="moderation", outcome="ok")
    err = metric(metrics, "triage_task_requests_total", task="moderation", outcome="error")
    answered_local = metric(metrics, "triage_answers_total", task="moderation", tier="local")
    assert ok + err >= n
    page.goto(f"{server.base}/ui/#key={ADMIN_KEY}")
    page.wait_for_selector("section.task")
    page.goto(f"{server.base}/ui/#view=dashboard")
    row = page.locator('table.since-start tr[data-task="moderation"][data-tier="local"]')
    row.wait_for()
    assert float(row.locator('td[data-col="ok"]').inner_text()) == ok
    assert float(row.locator('td[data-col="error"]').inner_text()) == err
    assert float(row.locator('td[data-col="answered"]').inner_text()) == answered_local
    uncertain = metric(metrics, "triage_escalations_total", task="moderation", tier="local", reason="uncertain")
    assert float(row.locator('td[data-col="uncertain"]').inner_text()) == uncertain
    # The ledger's window (per-minute totals) counts the same requests.
    deadline = time.time() + 15
    while True:
        got = page.locator('[data-window="hour"] [data-stat="requests"] .v').inner_text()
        if float(got) == ok + err or time.time() > deadline:
            break
        page.reload()
        page.wait_for_selector('[data-window="hour"]')
    assert float(got) == ok + err
    page.screenshot(path=str(artifacts() / "dashboard.png"), full_page=True)
