"""What Chrome sends with an EventSource request: the load generators send it too, since the
service reads (and, until a stream is live, keeps) every header of it."""

from __future__ import annotations


def eventsource_headers(*, referer: str, site: str, origin: str | None = None) -> str:
    """Chrome 131's headers for `new EventSource(url)` from the page `referer`, with
    Sec-Fetch-Site `site` (`same-origin`, or `same-site` with the page's `origin` for a
    page of a sibling origin: `{withCredentials: true}`, the token in a cookie)."""
    return (
        "Connection: keep-alive\r\n"
        'sec-ch-ua-platform: "Linux"\r\n'
        "Cache-Control: no-cache\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36\r\n"
        "Accept: text/event-stream\r\n"
        'sec-ch-ua: "Google Chrome";v="131", "Chromium";v="131", "Not_A Brand";v="24"\r\n'
        "sec-ch-ua-mobile: ?0\r\n"
        + (f"Origin: {origin}\r\n" if origin else "")
        + f"Sec-Fetch-Site: {site}\r\n"
        "Sec-Fetch-Mode: cors\r\n"
        "Sec-Fetch-Dest: empty\r\n"
        f"Referer: {referer}\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-GB,en;q=0.9\r\n"
    )
