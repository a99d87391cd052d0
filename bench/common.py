"""Helpers the benchmark scripts share."""
import time
import urllib.error
import urllib.request


def wait_http(url, timeout=20, poll=0.1):
    """Returns once `url` answers at all (any HTTP status); exits after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=max(1, poll * 10))
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(poll)
    raise SystemExit(f"not reachable: {url}")
