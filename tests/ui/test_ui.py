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
    # The audit trail: who saved (the admin key over TCP, from its address), and the diff.
    change = page.locator('table.changes tr[data-action="save"]').first
    assert "key " in change.inner_text() and "127.0.0.1" in change.inner_text(), change.inner_text()
    page.locator('tr[data-number="1"] button.rollback').click()
    page.wait_for_selector("text=Rolled back to version 1")
    assert server.config.read_text() == server.original
    _, _, raw = server.call("GET", "/ui/api/history")
    changes = json.loads(raw)["changes"]
    assert [c["action"] for c in changes][-2:] == ["save", "rollback to version 1"], changes
    diff = changes[-1]["diff"]
    assert any(l.startswith("-lo = 0.1") for l in diff) and any(l.startswith("+lo = 0.2") for l in diff), diff
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


def test_add_a_tier_check_it_save_it_and_use_it(servers, page):
    server = servers("moderation.toml", editable=True)
    open_graph(page, server)
    form = page.locator('section.task[data-task="moderation"] form.add-tier')
    # Before the last tier by default (the last always answers).
    assert form.locator('select[name="at"] option:checked').inner_text() == "before llm"
    form.locator('input[name="tier-name"]').fill("second-opinion")
    form.locator('input[name="provider"]').fill("openai")
    form.locator('input[name="model"]').fill("gpt-4o-mini")
    # No band before the last tier: the validator's message is beside the form
    # (the new tier is not drawn yet), not beside the tier drawn in its place.
    form.locator("button.check").click()
    page.wait_for_selector("form.add-tier.invalid")
    own = form.locator(".problems").inner_text()
    assert "tasks.moderation.tiers[2]" in own and "band" in own, own
    drawn_llm = page.locator('.node[data-key="tasks.moderation.tiers[2]"]')
    assert drawn_llm.locator(".problems").inner_text() == ""
    form.locator("button.save").click()
    page.wait_for_selector("form.add-tier .status.error")
    assert server.config.read_text() == server.original
    page.screenshot(path=str(artifacts() / "designer-add-tier-invalid.png"), full_page=True)
    # With a band it is saved before llm, comments kept, and the engine runs it.
    form.locator('input[name="lo"]').fill("0.3")
    form.locator('input[name="hi"]').fill("0.7")
    form.locator("button.save").click()
    page.wait_for_selector("text=Saved as version")
    saved = server.config.read_text()
    assert saved.index('name = "second-opinion"') < saved.index('name = "llm"'), saved
    assert saved.index('name = "hosted-moderation"') < saved.index('name = "second-opinion"'), saved
    assert "# On tweeteval-offensive validation" in saved
    page.wait_for_selector('.node[data-key="tasks.moderation.tiers[2]"] .name:text-is("second-opinion")')
    page.wait_for_selector('.node[data-key="tasks.moderation.tiers[3]"] .name:text-is("llm")')
    assert "band 0.3 – 0.7" in page.locator('.node[data-key="tasks.moderation.tiers[2]"]').inner_text()
    _, _, raw = server.call("GET", "/ui/api/config")
    tiers = [n["name"] for t in json.loads(raw)["tasks"] if t["name"] == "moderation" for n in t["nodes"] if n["kind"] == "tier"]
    assert tiers == ["local", "hosted-moderation", "second-opinion", "llm"], tiers
    page.screenshot(path=str(artifacts() / "designer-add-tier-saved.png"), full_page=True)
    # Back to the example for the other tests: roll back to the first version.
    _, _, raw = server.call("GET", "/ui/api/history")
    status, _, body = server.call(
        "POST", "/ui/api/config/rollback", {"version": json.loads(raw)["version"], "number": 1}
    )
    assert status == 200, body
    assert server.config.read_text() == server.original


# A second task beside the example's cascade: a router that answers from
# templates, and a route whose provider is down (its requests fail).
FAQ = """
[providers.unreachable]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"

[tasks.faq]
strategy = "router"

[tasks.faq.intent]
kind = "rules"
default = "hours"
rules = [{ route = "greeting", any = ["hello"] }, { route = "human", any = ["agent"] }]

[tasks.faq.routes.hours]
handler = "template"
template = "We are open 9 to 5."

[tasks.faq.routes.greeting]
handler = "template"
template = "Hello there."

[tasks.faq.routes.human]
handler = "model"
provider = "unreachable"
model = "m"
"""


def shown_requests(page):
    """(task, answered by, outcome) of each row of the explorer's table."""
    # Read in one go: the view re-renders while a filter applies.
    rows = page.eval_on_selector_all(
        "table.requests tr[data-request]",
        """rows => rows.map(r => ["task", "answered_by", "outcome"].map(
            c => r.querySelector(`td[data-col="${c}"]`).textContent))""",
    )
    return [tuple(r) for r in rows]


def wait_rows(page, want, timeout=15):
    """Poll until the table shows exactly `want` rows (sorted), for re-renders."""
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        try:
            got = sorted(shown_requests(page))
        except Exception as e:  # the table was replaced while read
            got = e
        if got == sorted(want):
            return got
        time.sleep(0.1)
    page.screenshot(path=str(artifacts() / "explorer-failed.png"), full_page=True)
    raise AssertionError(f"explorer shows {got}, want {sorted(want)}")


def test_the_explorer_filters_a_known_set_of_requests(servers, page):
    server = servers("moderation.toml", extra=FAQ, name="explorer")
    made = []
    for i in range(3):
        status, _, body = server.call("POST", "/v1/execute", {"task": "faq", "input": f"hello {i}"})
        assert status == 200, body
        made.append(("faq", "route:greeting", "answered"))
    for i in range(2):
        status, _, body = server.call("POST", "/v1/execute", {"task": "faq", "input": f"when are you open {i}"})
        assert status == 200, body
        made.append(("faq", "route:hours", "answered"))
    for i in range(2):
        status, _, body = server.call("POST", "/v1/execute", {"task": "faq", "input": f"an agent please {i}"})
        assert status >= 500, body
    status, mod = execute(server)
    assert status in (200, 503), mod
    page.goto(f"{server.base}/ui/#key={ADMIN_KEY}")
    page.wait_for_selector("section.task")
    page.goto(f"{server.base}/ui/#view=requests")
    page.wait_for_selector("table.requests")
    # The failed ones and the moderation request: read what the ledger kept
    # for them, then check every filter against the whole known set.
    deadline = time.time() + 15
    while len(shown_requests(page)) < 8 and time.time() < deadline:
        page.reload()
        page.wait_for_selector("table.requests")
    everything = shown_requests(page)
    assert len(everything) == 8, everything
    failed = [r for r in everything if r[0] == "faq" and r[2] == "failed"]
    assert len(failed) == 2, everything
    moderation = [r for r in everything if r[0] == "moderation"]
    assert len(moderation) == 1 and moderation[0][1] in ("local", "hosted-moderation", "llm", "–"), everything
    assert sorted(r for r in everything if r[0] == "faq" and r[2] == "answered") == sorted(made)

    page.select_option('select[name="task"]', "faq")
    wait_rows(page, [r for r in everything if r[0] == "faq"])
    tier = page.locator('input[name="tier"]')
    tier.fill("route:greeting")
    tier.press("Enter")
    wait_rows(page, [r for r in made if r[1] == "route:greeting"])
    # The trace of one: its tier, decision and cost.
    row = page.locator("table.requests tr[data-request]").first
    row.locator("details summary").click()
    trace = row.locator("table.trace")
    trace.wait_for()
    assert "route:greeting" in trace.inner_text() and "accepted" in trace.inner_text(), trace.inner_text()
    page.screenshot(path=str(artifacts() / "explorer-trace.png"), full_page=True)
    tier.fill("")
    tier.press("Enter")
    page.select_option('select[name="outcome"]', "failed")
    wait_rows(page, failed)
    page.select_option('select[name="task"]', "moderation")
    wait_rows(page, [r for r in moderation if r[2] == "failed"])
    page.select_option('select[name="outcome"]', "")
    wait_rows(page, moderation)
    page.screenshot(path=str(artifacts() / "explorer.png"), full_page=True)


# Short labelled texts for a small offline audit (1 = offensive).
AUDIT_DATA = [
    ("you are a worthless idiot and everyone hates you", 1),
    ("shut up you stupid moron", 1),
    ("what a pathetic loser, go away", 1),
    ("I will find you and hurt you", 1),
    ("this is garbage written by an imbecile", 1),
    ("you disgusting pig", 1),
    ("nobody cares about your dumb opinion, idiot", 1),
    ("get lost, you useless fool", 1),
    ("thank you so much for your help today", 0),
    ("the meeting is moved to three o'clock", 0),
    ("I love this song, it makes my day", 0),
    ("can you send me the report by friday", 0),
    ("what a beautiful sunset over the lake", 0),
    ("congratulations on the new job!", 0),
    ("the train was late again this morning", 0),
    ("I disagree, but I see your point", 0),
    ("this movie was so bad it was almost funny", 0),
    ("damn, I missed the bus", 0),
    ("he is not the smartest player on the team", 0),
    ("that referee was terrible tonight", 0),
]


def test_the_audit_view_follows_the_frontier_with_the_band_slider(servers, page, tmp_path):
    import os
    import shutil
    import subprocess

    server = servers("moderation.toml")
    for f in ("prices.toml", "moderation.toml"):
        shutil.copy(EXAMPLES / f, tmp_path / f)
    config = tmp_path / "moderation.toml"
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in AUDIT_DATA))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(HF_HUB_OFFLINE="1", TRIAGE_DATA_DIR=str(tmp_path / "data"))
    out = subprocess.run(
        [os.environ["TRIAGE_BIN"], "audit", "--config", str(config), "--task", "moderation",
         "--data", str(data), "--offline", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    path = tmp_path / "report.json"
    path.write_text(out.stdout)
    points = sorted(report["frontier"], key=lambda p: p["cost_per_100k_usd"])
    assert len(points) > 10 and report["band"], report.keys()
    configured = next(i for i, p in enumerate(points) if (p["lo"], p["hi"]) == (report["band"]["lo"], report["band"]["hi"]))

    page.goto(f"{server.base}/ui/#key={ADMIN_KEY}")
    page.wait_for_selector("section.task")
    page.goto(f"{server.base}/ui/#view=audit")
    page.set_input_files('input[type="file"]', str(path))
    slider = page.locator("input.band-slider")
    slider.wait_for()
    assert int(slider.get_attribute("max")) == len(points) - 1

    def shown():
        stat = lambda name: page.locator(f'[data-stat="{name}"]')
        acc = stat("local_accuracy").get_attribute("data-value")
        return (
            float(stat("band").get_attribute("data-lo")),
            float(stat("band").get_attribute("data-hi")),
            float(stat("cost_per_100k_usd").get_attribute("data-value")),
            None if acc == "" else float(acc),
            float(stat("local_share").get_attribute("data-value")),
        )

    def want(i):
        p = points[i]
        return (p["lo"], p["hi"], p["cost_per_100k_usd"], p["local_accuracy"], p["local_share"])

    # It opens at the configured band, whose cost is the report's own.
    assert slider.input_value() == str(configured)
    assert shown() == want(configured)
    assert abs(shown()[2] - report["cost_per_100k_usd"]) < 1e-9
    cx = {}
    for i in (0, len(points) // 2, len(points) - 1):
        slider.fill(str(i))
        assert shown() == want(i), (i, shown(), want(i))
        circle = page.locator("svg.frontier circle.chosen")
        if points[i]["local_accuracy"] is not None:
            cx[i] = float(circle.get_attribute("cx"))
    # The keyboard moves it one point at a time.
    slider.focus()
    page.keyboard.press("ArrowLeft")
    assert shown() == want(len(points) - 2)
    page.screenshot(path=str(artifacts() / "audit.png"), full_page=True)
    # The chosen point moves right as the cost grows.
    xs = [cx[i] for i in sorted(cx)]
    assert xs == sorted(xs) and len(set(xs)) > 1, cx
