"""The README's screenshot of the web UI: the demo index served on a loopback port, a query typed
in headless Chromium, the page saved as a PNG once every thumbnail has loaded.

    make demo && make browser
    .venv/bin/python docs/screenshot.py "a red car" docs/web-ui.png
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]

LOADED = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("query")
    parser.add_argument("out", type=Path)
    parser.add_argument("--index", type=Path, default=ROOT / "indexes" / "demo")
    parser.add_argument("-k", type=int, default=12)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    script = Path(sys.executable).parent / "retrieval"
    server = subprocess.Popen(
        [str(script), "serve", "--index", str(args.index), "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,860"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url + "/")
            k = driver.find_element(By.ID, "k")
            k.clear()
            k.send_keys(str(args.k))
            driver.find_element(By.ID, "query").send_keys(args.query, Keys.ENTER)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == args.k)
            wait.until(lambda d: d.execute_script(LOADED))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
