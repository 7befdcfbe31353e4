"""Webhook notification of a run: JSON POST with a timeout and retries. A notification
that cannot be delivered is logged, never a reason for the run itself to fail."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .steps import StepLog

TIMEOUT_S = (5.0, 15.0)  # connect, read
RETRIES = 3
BACKOFF_S = 1.0  # 1, 2, 4 s between attempts, unless the server's Retry-After says otherwise


def session() -> requests.Session:
    # urllib3 logs each retry with the request's path and query, where webhook tokens live.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    retry = Retry(
        total=RETRIES,
        backoff_factor=BACKOFF_S,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"POST"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    http = requests.Session()
    http.mount("http://", HTTPAdapter(max_retries=retry))
    http.mount("https://", HTTPAdapter(max_retries=retry))
    return http


def public_part(url: str) -> str:
    """Scheme, host and port only: safe to log. Credentials, path and query are where
    webhook secrets live (Slack's and Discord's are the path itself)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def post_report(url: str, report: dict[str, Any], log: StepLog) -> bool:
    """POST the report; True if the endpoint accepted it (2xx)."""
    where = public_part(url)
    try:
        with session() as http:
            response = http.post(url, json=report, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        log.say(f"warning: webhook {where} not notified: {type(exc).__name__}")
        return False
    if not response.ok:
        log.say(f"warning: webhook {where} answered HTTP {response.status_code}")
        return False
    log.say(f"webhook {where} notified")
    return True
