"""The dashboard at `/`, in a real headless browser: Debian's chromium,
driven through chromedriver by Selenium (installed by scripts/setup).

Records are registered the way a house's services do it (paho over MQTT,
and the HTTP API), and the page must show them live: a registration
appears, an expiry disappears, an unhealthy service shows its reason, a
rejected publish shows why, and the page finds a restarted `serve` by
itself. Screenshots are saved (set HOMICRO_SCREENSHOTS=DIR to keep them;
`docs/dashboard*.png` come from `test_screenshots_of_a_house`).
"""

import json
import os
import shutil
import socket
import time

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import harness
import mqtt_raw as R
from harness import TIMEOUT, V311, V5, free_port, start_homicro

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def screenshots(tmp_path):
    d = os.environ.get("HOMICRO_SCREENSHOTS") or str(tmp_path / "screenshots")
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--hide-scrollbars"]:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def wait(driver, cond, timeout=TIMEOUT):
    # each snapshot redraws the table: an element found may go stale
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=[StaleElementReferenceException]).until(cond)


def text(driver, css):
    """The first match's text, read in one step (the table is redrawn live)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null", css)


def attr(driver, css, name):
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? e.getAttribute(arguments[1]) : null", css, name)


def row(driver, name):
    return f'#records tr[data-name="{name}"]'


def open_page(driver, b):
    driver.get(f"http://127.0.0.1:{b.port}/")
    wait(driver, lambda d: text(d, "#registry-state") == "registry online")
    wait(driver, lambda d: text(d, "#conn") == "live")


def publish(b, name, record, version=V5):
    c = b.client(f"pub-{name}-{time.monotonic_ns()}", version=version)
    payload = record if isinstance(record, (bytes, str)) else json.dumps(record)
    c.publish(f"homicro/services/{name}", payload, qos=1, retain=True)
    c.stop()


def dead_port():
    """A port on loopback where nothing listens."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_registration_over_mqtt_appears_within_a_second(homicro, browser, tmp_path):
    open_page(browser, homicro)
    assert browser.title == "homicro"
    assert text(browser, "#version") == "v0.1.0"
    c = homicro.client("pub-web")
    started = time.monotonic()
    c.publish("homicro/services/web", json.dumps({
        "host": "127.0.0.1", "port": 8080, "scheme": "http", "role": "frontend",
        "version": "1.2.0", "ttl": "30s"}), qos=1, retain=True)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row(d, "web")))
    took = time.monotonic() - started
    print(f"publish to row in the browser: {took * 1000:.0f} ms")
    c.stop()
    assert took < 1.0, f"the record took {took:.2f} s to appear"

    web = row(browser, "web")
    assert attr(browser, web + " .c-endpoint a", "href") == "http://127.0.0.1:8080/"
    assert attr(browser, web + " .c-endpoint a", "rel") == "noopener noreferrer"
    assert text(browser, web + " .c-role") == "frontend"
    assert text(browser, web + " .c-version") == "1.2.0"
    assert text(browser, web + " .c-owner") == "127.0.0.1"
    ttl = text(browser, web + " .c-ttl")
    assert ttl.endswith(" s") and 25 <= int(ttl.split()[0]) <= 30, ttl
    # the countdown runs in the page
    wait(browser, lambda d: text(d, web + " .c-ttl") != ttl, timeout=3)
    assert text(browser, '#events li[data-event="registered"][data-name="web"] .why') \
        == "127.0.0.1:8080"
    assert text(browser, "#count") == "(1)"

    # an update (a 3.1.1 client) changes the row in place
    publish(homicro, "web", {"host": "127.0.0.1", "port": 8080, "scheme": "http",
                             "role": "frontend", "version": "1.3.0"}, version=V311)
    wait(browser, lambda d: text(d, row(d, "web") + " .c-version") == "1.3.0")
    assert text(browser, row(browser, "web") + " .c-ttl") == "—"
    assert browser.find_elements(By.CSS_SELECTOR, '#events li[data-event="updated"]')
    browser.save_screenshot(os.path.join(screenshots(tmp_path), "registered.png"))


def test_an_expiry_disappears_and_a_deregistration_too(homicro, browser):
    open_page(browser, homicro)
    publish(homicro, "brief", {"host": "127.0.0.1", "port": 9, "ttl": "2s"})
    publish(homicro, "kept", {"host": "127.0.0.1", "port": 10})
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row(d, "brief")))
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row(d, "brief")), timeout=6)
    assert text(browser, '#events li[data-event="expired"][data-name="brief"] .kind') == "expired"
    assert browser.find_elements(By.CSS_SELECTOR, row(browser, "kept"))

    publish(homicro, "kept", b"")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row(d, "kept")))
    kept = '#events li[data-event="deregistered"][data-name="kept"]'
    assert text(browser, kept + " .why") == "127.0.0.1:10"
    assert not browser.find_element(By.ID, "empty").get_attribute("hidden")

    # A client lost (closed without DISCONNECT): its will clears its record,
    # and the feed says so.
    lamp = homicro.raw()
    clear = {"topic": "homicro/services/lamp", "payload": b"", "qos": 1, "retain": True}
    assert lamp.connect("lamp", will=clear).fields["reason"] == 0
    lamp.send(R.publish("homicro/services/lamp", b'{"host":"10.0.0.8","port":80}',
                        qos=1, retain=True))
    lamp.expect(R.PUBACK)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row(d, "lamp")))
    lamp.close()
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row(d, "lamp")))
    why = text(browser, '#events li[data-event="deregistered"][data-name="lamp"] .why')
    assert why == "by its will: 10.0.0.8:80 was lost", why


def test_an_unhealthy_service_shows_its_reason(homicro, browser, tmp_path):
    open_page(browser, homicro)
    port = dead_port()
    publish(homicro, "nas", {"host": "127.0.0.1", "port": port,
                             "health": {"tcp": True, "interval": "1s", "failures": 3}})
    cell = row(browser, "nas") + " .c-health"
    wait(browser, lambda d: (text(d, cell) or "").startswith("failing 1/3"))
    detail = text(browser, cell + " .detail")
    assert "refused" in detail, detail
    assert attr(browser, cell, "title") == f"tcp 127.0.0.1:{port}"
    browser.save_screenshot(os.path.join(screenshots(tmp_path), "failing.png"))
    # three failures in a row: cleared, and the feed says why
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row(d, "nas")), timeout=8)
    why = text(browser, '#events li[data-event="unhealthy"][data-name="nas"] .why')
    assert f"tcp 127.0.0.1:{port}" in why and "3 times in a row" in why, why


def test_a_rejected_publish_shows_why(homicro, browser):
    open_page(browser, homicro)
    publish(homicro, "broken", {"host": "127.0.0.1", "port": "eighty"})
    wait(browser, lambda d: d.find_elements(
        By.CSS_SELECTOR, '#events li[data-event="rejected"][data-name="broken"]'))
    assert text(browser, '#events li[data-event="rejected"] .why').startswith("invalid")
    assert not browser.find_elements(By.CSS_SELECTOR, row(browser, "broken"))


def test_search_role_filter_and_grouping(homicro, browser):
    for name, role, version in [("api-1", "api", "1.2.0"), ("api-2", "api", "2.0.0"),
                                ("db", "postgres", "15.4.0")]:
        r = requests.put(f"http://127.0.0.1:{homicro.port}/register", timeout=TIMEOUT,
                         json={"name": name, "host": "10.0.0.5", "port": 5000, "role": role,
                               "version": version})
        assert r.status_code == 201, r.text
    open_page(browser, homicro)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#records tbody tr")) == 3)
    # a record without a scheme has no link
    assert text(browser, row(browser, "db") + " .c-endpoint") == "10.0.0.5:5000"
    assert not browser.find_elements(By.CSS_SELECTOR, row(browser, "db") + " a")

    names = lambda d: d.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#records tbody tr[data-name]')]"
        ".map(e => e.dataset.name)")
    browser.find_element(By.ID, "search").send_keys("2.0.0")
    wait(browser, lambda d: names(d) == ["api-2"])
    assert text(browser, "#count") == "(1 of 3)"
    browser.find_element(By.ID, "search").clear()
    browser.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
    Select(browser.find_element(By.ID, "role")).select_by_value("postgres")
    wait(browser, lambda d: names(d) == ["db"])
    Select(browser.find_element(By.ID, "role")).select_by_value("")
    browser.find_element(By.ID, "group").click()
    wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#records tr.group')].map(e => e.dataset.role)")
        == ["api", "postgres"])
    assert names(browser) == ["api-1", "api-2", "db"]
    # the choice stays through live updates (and /#NAME, Home Assistant's
    # link to a service, starts the search as NAME: below)
    requests.put(f"http://127.0.0.1:{homicro.port}/register", timeout=TIMEOUT,
                 json={"name": "api-3", "host": "10.0.0.6", "port": 5000, "role": "api"})
    wait(browser, lambda d: names(d) == ["api-1", "api-2", "api-3", "db"])
    assert browser.find_element(By.ID, "group").is_selected()

    browser.get(f"http://127.0.0.1:{homicro.port}/#db")
    wait(browser, lambda d: names(d) == ["db"])
    assert browser.find_element(By.ID, "search").get_attribute("value") == "db"


def test_the_page_reconnects_after_serve_restarts(browser, tmp_path):
    port = free_port()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    b = start_homicro(str(tmp_path / "one"), listen=f"127.0.0.1:{port}")
    try:
        open_page(browser, b)
    finally:
        b.stop()
    wait(browser, lambda d: text(d, "#conn") != "live")
    b = start_homicro(str(tmp_path / "two"), listen=f"127.0.0.1:{port}")
    try:
        wait(browser, lambda d: text(d, "#conn") == "live")
        publish(b, "after", {"host": "127.0.0.1", "port": 1})
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row(d, "after")))
    finally:
        b.stop()


def test_a_record_cannot_put_code_or_odd_links_in_the_page(homicro, browser):
    open_page(browser, homicro)
    # a topic level is any text: the rejected event's name is shown as text
    c = homicro.client("pub-evil")
    c.publish("homicro/services/<img src=x onerror=window.pwned=1>", b"{}", qos=1)
    for name, scheme in [("js", "javascript"), ("msdt", "ms-msdt"), ("ftp", "ftp")]:
        c.publish(f"homicro/services/{name}", json.dumps({
            "host": "127.0.0.1", "port": 80, "scheme": scheme}), qos=1, retain=True)
    c.stop()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row(d, "msdt")))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#events li[data-event="rejected"]'))
    assert text(browser, '#events li[data-event="rejected"] strong') \
        == "<img src=x onerror=window.pwned=1>"
    assert browser.execute_script("return window.pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#events img, #records img")
    # only http and https become links; another scheme is text
    assert not browser.find_elements(By.CSS_SELECTOR, "#records a")
    assert text(browser, row(browser, "msdt") + " .c-endpoint") == "ms-msdt://127.0.0.1:80"
    # a fragment that is not percent-encoding does not stop the page
    browser.get(f"http://127.0.0.1:{homicro.port}/#%")
    wait(browser, lambda d: text(d, "#conn") == "live")
    assert browser.find_element(By.ID, "search").get_attribute("value") == "%"


def test_readable_on_a_phone_and_dark_when_the_system_is(homicro, browser, tmp_path):
    publish(homicro, "a-service-with-a-rather-long-name", {
        "host": "fd00:1234:5678:9abc:def0:1234:5678:9abc", "port": 65535, "scheme": "https",
        "version": "10.20.30-beta.1+build.1234567890", "ttl": "1h"})
    browser.set_window_size(390, 844)
    open_page(browser, homicro)
    wait(browser, lambda d: d.find_elements(
        By.CSS_SELECTOR, row(d, "a-service-with-a-rather-long-name")))
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone"
    # a card per record: the table's head is hidden, each cell labelled
    assert not browser.find_element(By.CSS_SELECTOR, "#records thead").is_displayed()
    browser.save_screenshot(os.path.join(screenshots(tmp_path), "phone.png"))

    background = "return getComputedStyle(document.body).backgroundColor"
    light = browser.execute_script(background)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    dark = browser.execute_script(background)
    assert light == "rgb(247, 248, 250)" and dark == "rgb(18, 22, 28)", (light, dark)


def test_the_stream_leaves_out_what_the_acl_hides(tmp_path):
    """No browser needed: the server-sent events themselves, read with requests."""
    acl = tmp_path / "acl"
    acl.write_text("topic read homicro/services/public-web\ntopic read homicro/registry\n"
                   "topic read homicro/events/public-web\ntopic write homicro/services/#\n")
    b = start_homicro(str(tmp_path), config=f'[auth]\nacl_file = "{acl}"\n'
                                            'allow_anonymous = true\n')
    try:
        for name in ["public-web", "secret-db"]:
            r = requests.put(f"http://127.0.0.1:{b.port}/register", timeout=TIMEOUT,
                             json={"name": name, "host": "10.0.0.5"})
            assert r.status_code == 201, r.text
        with requests.get(f"http://127.0.0.1:{b.port}/ui/stream", stream=True,
                          timeout=TIMEOUT) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = sse(s)
            kind, snapshot = next(events)
            assert kind == "snapshot"
            assert [r["name"] for r in snapshot["records"]] == ["public-web"]
            assert snapshot["registry"]["total"] == 1
            # events follow the ACL of their own topic: secret-db's are hidden
            for name in ["secret-db", "public-web"]:
                requests.delete(f"http://127.0.0.1:{b.port}/register/{name}", timeout=TIMEOUT)
            seen = []
            for kind, data in events:
                if kind == "event":
                    seen.append((data["event"], data["name"]))
                    if data["name"] == "public-web":
                        break
        assert seen == [("deregistered", "public-web")]
    finally:
        b.stop()


def sse(stream):
    """A /ui/stream response's events as (kind, parsed data), as they come."""
    kind = None
    for line in stream.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: "):])


def test_a_heartbeat_moves_the_countdown_at_once(homicro):
    publish(homicro, "beat", {"host": "127.0.0.1", "port": 7, "ttl": "20s"})
    with requests.get(f"http://127.0.0.1:{homicro.port}/ui/stream", stream=True,
                      timeout=TIMEOUT) as s:
        events = sse(s)
        kind, first = next(events)
        assert kind == "snapshot"
        before = first["records"][0]["ttl_left_ms"]
        assert 15_000 < before <= 20_000
        time.sleep(1.5)  # the countdown runs: what is measured, not a wait for readiness
        c = homicro.client("beat-heartbeat", version=V311)
        c.publish("homicro/heartbeat/beat", json.dumps({"host": "127.0.0.1", "port": 7}), qos=1)
        # a small `ttl` event, not a snapshot of every record: 20 s again,
        # where the countdown had run to about 18.5
        assert next(events) == ("ttl", {"name": "beat", "ttl_left_ms": pytest.approx(20_000,
                                                                                    abs=700)})


def test_the_files_are_built_in_and_other_paths_are_not_found(homicro):
    base = f"http://127.0.0.1:{homicro.port}"
    page = requests.get(base + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path, kind in [("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css"),
                       ("/ui/icon.svg", "image/svg+xml")]:
        r = requests.get(base + path, timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    # nothing from elsewhere: no CDN
    assert "http" not in page.text.replace("http://www.w3.org", "")
    missing = requests.get(base + "/ui/nope.js", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert requests.post(base + "/", timeout=TIMEOUT).status_code == 405


HOUSE = [
    ("home-assistant", {"port": 8123, "scheme": "http", "role": "home-assistant",
                        "version": "2026.11.2", "health": {"tcp": True, "interval": "30s"}}),
    ("node-red", {"port": 1880, "scheme": "http", "role": "flows", "version": "4.1.0",
                  "ttl": "45s"}),
    ("nas", {"host": "192.168.1.20", "port": 5000, "scheme": "https", "role": "storage",
             "version": "7.2.1"}),
    ("esphome-porch", {"host": "192.168.1.41", "port": 6053, "role": "esphome",
                       "version": "2026.10.0", "ttl": "2m"}),
    ("esphome-garage", {"host": "192.168.1.42", "port": 6053, "role": "esphome",
                        "version": "2026.10.0", "ttl": "2m"}),
    ("tasmota-plug-1", {"host": "192.168.1.51", "port": 80, "scheme": "http",
                        "role": "tasmota", "version": "14.3.0", "ttl": "5m"}),
]


def test_screenshots_of_a_house(homicro, browser, tmp_path):
    """The pictures in docs/ (HOMICRO_SCREENSHOTS=docs to refresh them)."""
    open_page(browser, homicro)
    for name, record in HOUSE:
        requests.put(f"http://127.0.0.1:{homicro.port}/register", timeout=TIMEOUT,
                     json={"name": name, "host": "127.0.0.1", **record})
    publish(homicro, "printer", {"host": "127.0.0.1", "port": dead_port(), "role": "printer",
                                 "health": {"tcp": True, "interval": "1s", "failures": 5}})
    publish(homicro, "Bad Name", {"host": "127.0.0.1"})
    wait(browser, lambda d: (text(d, row(d, "printer") + " .c-health") or "")
         .startswith("failing 2/5"), timeout=8)
    out = screenshots(tmp_path)
    browser.save_screenshot(os.path.join(out, "dashboard.png"))
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    browser.set_window_size(390, 844)
    browser.save_screenshot(os.path.join(out, "dashboard-phone-dark.png"))
    for f in ["dashboard.png", "dashboard-phone-dark.png"]:
        assert os.path.getsize(os.path.join(out, f)) > 10_000
