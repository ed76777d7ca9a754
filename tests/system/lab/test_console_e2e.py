"""The web console in a real browser against a real lab: headless Chromium
(Debian's `chromium` and `chromium-driver`, through selenium) logs in with the
lab control plane's admin token, sees every node and service, watches an
endpoint turn ejected when its process is killed under traffic and healthy again
after it restarts, and sees the graph edge between the two talking services. A
wrong token and a cross-site form post are refused. A screenshot of each page is
written as a test artifact: into $MESHNODE_ARTIFACTS/console (default: the system's
temporary directory), or with MESHNODE_UPDATE_SCREENSHOTS=1 into docs/img/console
(the ones docs/console.md links), so a test run never changes tracked files.

The control plane listens on the lab's fabric (a namespace of its own); the test
relays a loopback port to it, and Chromium accepts exactly the control plane's
server key after the test verified its certificate against the lab's CA.

One lab for the module (`mnui` unless $MESHNODE_TEST_LAB_UI says otherwise)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import TOOLS
from tests.support.labcli import LabCli
from tests.support.skips import requires_lab

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return (
                f"{path} is missing: apt-get install --no-install-recommends chromium "
                f"chromium-driver (Debian package {package})"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not importable: pip install selenium into the venv"
    return None


pytestmark = [
    pytest.mark.root,
    requires_lab,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]

LAB = os.environ.get("MESHNODE_TEST_LAB_UI", "mnui")
PY = sys.executable
DEMO = [PY, "-m", "meshnode.lab.demo"]
SHOTS = (
    Path(__file__).resolve().parents[3] / "docs" / "img" / "console"
    if os.environ.get("MESHNODE_UPDATE_SCREENSHOTS") == "1"
    else Path(os.environ.get("MESHNODE_ARTIFACTS") or tempfile.gettempdir()) / "console"
)
POLICY = """
kind: AuthorizationPolicy
metadata: {name: echo-from-client, namespace: default}
spec:
  selector: {services: [echo]}
  action: ALLOW
  rules:
  - from: {principals: ["spiffe://cluster.local/ns/default/sa/client"]}
"""


LABCLI = LabCli(LAB)
meshnode, status = LABCLI.run, LABCLI.status


class Relay:
    """127.0.0.1:<port> here -> `target` inside network namespace `netns`, byte for
    byte (TLS passes through untouched). Bounded: it lives as long as the module."""

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        self.netns, self.target = netns, target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        from tests.support.bpf import in_netns

        while not self._stop.is_set():
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with in_netns(self.netns):  # the socket stays in the fabric's namespace
                up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                up.settimeout(5)
                up.connect(self.target)
                up.settimeout(None)
            except OSError:
                down.close()
                up.close()
                continue
            self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)
        for s in self._socks:
            s.close()


def server_key_pin(port: int, bundle: Path) -> str:
    """The base64 SHA-256 of the control plane's server key, after verifying its
    certificate against the lab's trust bundle (for Chromium's
    --ignore-certificate-errors-spki-list: that key and no other)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ctx = ssl.create_default_context(cafile=str(bundle))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    from meshnode.lab.lab import Lab

    meshnode("lab", "down", check=False)  # a leftover from an aborted run
    try:
        meshnode("lab", "up", "--nodes", "2")
        add = ["lab", "workload", "add"]
        meshnode(
            *add, "node1", "client", "--service", "client", "--port", "9090", "--", *DEMO, "idle"
        )  # noqa: E501
        for node, name, port in (("node1", "echo-a", 7001), ("node2", "echo-b", 7002)):
            meshnode(
                *add, node, name, "--service", "echo", "--port", str(port),
                "--service-port", "7001",
                "--", *DEMO, "server", "--port", str(port), "--name", name,
            )  # fmt: skip
        meshnode("lab", "apply", "-f", "-", input=POLICY)
        yield {"lab": Lab(LAB), "status": status()}
    finally:
        meshnode("lab", "down", check=False)


@pytest.fixture(scope="module")
def url(lab: dict[str, Any]) -> Iterator[str]:
    from meshnode.lab.lab import CP_IP, CP_PORT

    relay = Relay(lab["lab"].fabric, (CP_IP, CP_PORT))
    try:
        yield f"https://127.0.0.1:{relay.port}"
    finally:
        relay.close()


@pytest.fixture(scope="module")
def driver(lab: dict[str, Any], url: str) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    pin = server_key_pin(int(url.rsplit(":", 1)[1]), lab["lab"].cp_dir / "trust-bundle.pem")
    profile = tempfile.mkdtemp(prefix="meshnode-console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
        f"--ignore-certificate-errors-spki-list={pin}",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------


def open_page(driver: Any, url: str, path: str) -> None:
    driver.get(f"{url}/ui/{path}")
    assert "/ui/login" not in driver.current_url, f"/ui/{path} sent us to the login page"


def login(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/ui/login")
    box = driver.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_for("the login form to be answered", lambda: "/ui/login" not in driver.current_url
             or driver.find_elements(By.ID, "login-error"), 10, 0.2)  # fmt: skip


def shot(driver: Any, page: str) -> None:
    """SHOTS/<page>.png: the whole page, 1400 px wide (overwritten)."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    height = min(int(metrics["cssContentSize"]["height"]) + 16, 4000)
    png = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1},
        },
    )["data"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / f"{page}.png").write_bytes(base64.b64decode(png))


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"no {what} within {timeout:.0f} s (last seen: {last!r})")


def endpoint_state(driver: Any, url: str, address: str) -> str:
    from selenium.webdriver.common.by import By

    open_page(driver, url, "services")
    rows = driver.find_elements(By.CSS_SELECTOR, f'tr.endpoint[data-address="{address}"]')
    return rows[0].get_attribute("data-state") if rows else "absent"


def load(vip: str, seconds: float) -> subprocess.Popen[str]:
    """The client on node1 opens connections to the echo service for `seconds`."""
    return LABCLI.spawn(
        [
            "lab", "exec", "node1", "--workload", "client",
            "--", PY, str(TOOLS / "loadclient.py"), vip, "7001",
            "--count", str(int(seconds * 20)), "--interval", "0.05",
            "--max-seconds", str(seconds), "--timeout", "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


# --- the tests ----------------------------------------------------------------------


def test_wrong_token_is_refused(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/ui/")
    assert driver.current_url.endswith("/ui/login"), "a page without a session must redirect"
    shot(driver, "login")
    login(driver, url, "not-the-admin-token")
    error = driver.find_element(By.ID, "login-error").text
    assert "wrong admin token" in error
    driver.get(f"{url}/ui/nodes")
    assert driver.current_url.endswith("/ui/login")


def test_login_sees_every_node_and_service(driver: Any, url: str, lab: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    token = (lab["lab"].cp_dir / "admin-token").read_text().strip()
    login(driver, url, token)
    assert driver.current_url.endswith("/ui/"), driver.current_url
    cookie = driver.get_cookie("meshnode_console")
    assert cookie and cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    st = lab["status"]
    open_page(driver, url, "nodes")
    for node in st["nodes"]:
        row = driver.find_element(By.ID, f"node-{node['name']}")
        assert node["ip"] in row.text, row.text
    open_page(driver, url, "services")
    for svc in st["services"]:
        section = driver.find_element(By.ID, f"service-{svc['namespace']}-{svc['name']}")
        assert svc["vip"] in section.text
        assert f"{svc['name']}.{svc['namespace']}.mesh" in section.text
    echo = driver.find_elements(By.CSS_SELECTOR, "#service-default-echo tr.endpoint")
    assert len(echo) == 2
    open_page(driver, url, "policies")
    assert "echo-from-client" in driver.page_source
    open_page(driver, url, "identities")
    assert "spiffe://cluster.local/ns/default/sa/echo" in driver.page_source


def test_nodes_report_their_health(driver: Any, url: str, lab: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    def reporting() -> list[str]:
        open_page(driver, url, "nodes")
        rows = driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr.fresh")
        return [r.get_attribute("id") for r in rows] if len(rows) == 2 else []

    print(f"\nreporting nodes: {wait_for('report from both nodes', reporting, 30)}")


def test_killed_endpoint_is_ejected_then_healthy_again(
    driver: Any, url: str, lab: dict[str, Any]
) -> None:
    from meshnode.lab import host

    st = lab["lab"].load()
    wl = st.workloads["echo-a"]
    address = f"{st.nodes['node1'].ip}:7001"
    vip = next(s["vip"] for s in lab["status"]["services"] if s["name"] == "echo")
    client = load(vip, 120)
    revived: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            f"healthy {address}", lambda: endpoint_state(driver, url, address) == "healthy", 30
        )  # noqa: E501
        os.kill(wl.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            f"ejected {address}", lambda: endpoint_state(driver, url, address) == "ejected", 40
        )  # noqa: E501
        print(f"\n{address} shown ejected {time.monotonic() - killed:.1f} s after the kill")
        shot(driver, "services-ejected")
        open_page(driver, url, "")
        assert f"endpoint {address} (echo-a on node1) of default/echo" in driver.page_source
        shot(driver, "overview-ejected")
        revived = host.spawn(
            st.nodes["node1"].netns,
            Path(wl.cgroup),
            [*DEMO, "server", "--port", "7001", "--name", "echo-a"],
        )
        back = time.monotonic()
        wait_for(
            f"healthy {address} again",
            lambda: endpoint_state(driver, url, address) == "healthy",
            120,
        )  # noqa: E501
        print(f"{address} shown healthy {time.monotonic() - back:.1f} s after the restart")
    finally:
        client.terminate()
        client.wait(10)
        if revived is not None:
            revived.terminate()
            revived.wait(5)


def test_graph_shows_the_edge_between_the_talking_services(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    selector = 'tr.edge-row[data-source="default/client"][data-destination="default/echo"]'

    def edge() -> str:
        open_page(driver, url, "graph")
        rows = driver.find_elements(By.CSS_SELECTOR, selector)
        return rows[0].text if rows else ""

    row = wait_for("graph edge client -> echo", edge, 30)
    print(f"\ngraph edge: {row}")
    assert driver.find_elements(By.CSS_SELECTOR, "#graph .edge")  # drawn in the SVG too
    for page in ("overview", "nodes", "services", "identities", "policies", "graph", "zones"):
        open_page(driver, url, "" if page == "overview" else page)
        shot(driver, page)


def test_cross_site_post_is_refused_and_logout_ends_the_session(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    # A page of another origin (here an opaque data: URL) posts the logout form.
    driver.get(
        "data:text/html,<form method=post action='" + url + "/ui/logout'>"
        "<input name=csrf value=forged><button id=go>go</button></form>"
    )
    driver.find_element(By.ID, "go").click()
    time.sleep(1)
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "401" in text or "403" in text, text
    open_page(driver, url, "nodes")  # still logged in
    driver.find_element(By.ID, "logout").click()
    wait_for(
        "the login page after logout", lambda: driver.current_url.endswith("/ui/login"), 10, 0.2
    )  # noqa: E501
    driver.get(f"{url}/ui/nodes")
    assert driver.current_url.endswith("/ui/login")
