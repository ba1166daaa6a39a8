"""A protocol-level Streamlit client: the websocket messages and HTTP uploads a browser sends, without a browser.

Helper for the benchmarks, not a benchmark. It speaks Streamlit 1.67's protocol as its frontend does (read from
``streamlit/web/server/starlette/starlette_websocket.py``, ``starlette_routes.py`` and ``runtime/app_session.py``):

1. ``GET /_stcore/health`` sets the XSRF cookie ``_streamlit_xsrf``.
2. A websocket to ``/_stcore/stream`` with the subprotocol header ``streamlit, <xsrf token>`` and the cookie.
3. A ``rerun_script`` BackMsg naming the page by its URL path (``page_name``); the server answers with ForwardMsgs:
   ``new_session`` (the session id), ``navigation`` (the pages' hashes), deltas, ``script_finished``.
4. An upload: a ``file_urls_request`` BackMsg, answered by a ``file_urls_response`` (one file id and upload URL per
   name); the file goes as multipart ``PUT`` to ``/_stcore/upload_file/<session id>/<file id>`` with the XSRF
   token in ``X-Xsrftoken``; then a ``rerun_script`` whose ``widget_states`` set the ``file_uploader`` widget
   (id from the delta that drew it) to the uploaded files' ``uploaded_file_info``.

Every delta is kept as a flat list of (kind, text) for the script run it came from, so a caller can wait for an
element (a metric's label, a heading) to appear in the run its rerun started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.cookies import SimpleCookie

XSRF_COOKIE = "_streamlit_xsrf"


@dataclass
class Element:
    kind: str  # the Element oneof: "metric", "heading", "alert", "exception", "file_uploader", ...
    text: str  # its label or body (a metric's label and value, an alert's body)
    widget_id: str = ""
    at: float = field(default_factory=time.perf_counter)


def _element(delta) -> Element | None:
    if delta.WhichOneof("type") != "new_element":
        return None
    el = delta.new_element
    kind = el.WhichOneof("type")
    if kind is None:
        return None
    value = getattr(el, kind)
    if kind == "metric":
        return Element(kind, f"{value.label}\n{value.body}")
    if kind == "file_uploader":
        return Element(kind, value.label, widget_id=value.id)
    if kind == "exception":
        return Element(kind, f"{value.type}: {value.message}")
    if kind == "progress":
        return Element(kind, value.text)
    return Element(kind, getattr(value, "body", "") if hasattr(value, "body") else "")


class StreamlitSession:
    """One browser tab's worth of protocol: connect, run a page, upload files, read what the server draws."""

    def __init__(self, base: str, page: str = "", *, headers: dict[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.page = page
        self.headers = dict(headers or {})  # more headers on the websocket (e.g. a proxy's X-Forwarded-For)
        self.session_id = ""
        self.page_hash = ""
        self.elements: list[Element] = []  # this script run's elements, in arrival order
        self.runs_finished = 0
        self.uploader_id = ""
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._xsrf = ""
        self._changed = asyncio.Event()
        self._file_urls: dict[str, object] = {}
        self.closed_reason = ""

    # -- connection ------------------------------------------------------------------------------------------------
    async def connect(self) -> None:
        import websockets

        def health() -> str:
            with urllib.request.urlopen(f"{self.base}/_stcore/health", timeout=30) as response:
                cookies = SimpleCookie()
                for header in response.headers.get_all("Set-Cookie") or []:
                    cookies.load(header)
                return cookies[XSRF_COOKIE].value if XSRF_COOKIE in cookies else ""

        self._xsrf = await asyncio.to_thread(health)
        ws_url = "ws" + self.base[len("http") :] + "/_stcore/stream"
        headers = {**self.headers, **({"Cookie": f"{XSRF_COOKIE}={self._xsrf}"} if self._xsrf else {})}
        self._ws = await websockets.connect(
            ws_url,
            subprotocols=["streamlit", self._xsrf] if self._xsrf else ["streamlit"],
            additional_headers=headers,
            max_size=None,
            ping_interval=None,
            open_timeout=60,
        )
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def _read(self) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        try:
            async for data in self._ws:
                msg = ForwardMsg()
                msg.ParseFromString(data)
                kind = msg.WhichOneof("type")
                if kind == "new_session":
                    self.session_id = msg.new_session.initialize.session_id
                    self.page_hash = msg.new_session.page_script_hash or self.page_hash
                    self.elements = []
                elif kind == "navigation":
                    self.page_hash = msg.navigation.page_script_hash or self.page_hash
                elif kind == "delta":
                    element = _element(msg.delta)
                    if element is not None:
                        if element.kind == "file_uploader":
                            self.uploader_id = element.widget_id
                        self.elements.append(element)
                elif kind == "script_finished":
                    self.runs_finished += 1
                elif kind == "file_urls_response":
                    self._file_urls[msg.file_urls_response.response_id] = msg.file_urls_response
                self._changed.set()
        except Exception as exc:  # noqa: BLE001 - a closed socket ends the reader; the waiters see it
            self.closed_reason = repr(exc)
        finally:
            self.closed_reason = self.closed_reason or "closed"
            self._changed.set()

    async def wait_for(self, predicate, timeout: float) -> None:
        """Until ``predicate(self)`` holds (checked after each ForwardMsg), else TimeoutError."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.closed_reason:
                raise ConnectionError(f"websocket closed: {self.closed_reason}")
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:.0f} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    # -- BackMsgs --------------------------------------------------------------------------------------------------
    async def _send(self, back) -> None:
        await self._ws.send(back.SerializeToString())

    async def rerun(self, widget_states=None) -> int:
        """Send a ``rerun_script`` for this page; the number of script runs finished before it (for waiting)."""
        from streamlit.proto.BackMsg_pb2 import BackMsg

        back = BackMsg()
        state = back.rerun_script
        state.query_string = ""
        state.page_name = self.page
        state.page_script_hash = self.page_hash
        if widget_states:
            state.widget_states.widgets.extend(widget_states)
        finished = self.runs_finished
        self.elements = []
        await self._send(back)
        return finished

    async def run_page(self, timeout: float = 120) -> None:
        """Open the page (the first rerun a tab sends) and wait until its script has finished."""
        finished = await self.rerun()
        await self.wait_for(lambda s: s.session_id and s.runs_finished > finished and s.uploader_id, timeout)

    async def upload(self, files: list[tuple[str, bytes, str]], timeout: float = 120) -> float:
        """Upload ``files`` ((name, bytes, MIME type)) as the page's file_uploader would, then rerun with them.

        Returns the perf_counter time the upload began (the browser's ``set_input_files``)."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        back = BackMsg()
        back.file_urls_request.request_id = request_id
        back.file_urls_request.session_id = self.session_id
        back.file_urls_request.file_names.extend(name for name, _, _ in files)
        await self._send(back)
        await self.wait_for(lambda s: request_id in s._file_urls, timeout)
        response = self._file_urls.pop(request_id)
        if response.error_msg:
            raise RuntimeError(f"file_urls_request refused: {response.error_msg}")
        await asyncio.gather(
            *(
                asyncio.to_thread(self._put, urls.upload_url, name, data, mime)
                for urls, (name, data, mime) in zip(response.file_urls, files)
            )
        )
        widget = WidgetState(id=self.uploader_id)
        for urls, (name, data, _) in zip(response.file_urls, files):
            info = widget.file_uploader_state_value.uploaded_file_info.add()
            info.file_id, info.name, info.size = urls.file_id, name, len(data)
            info.file_urls.CopyFrom(urls)
        await self.rerun([widget])
        return started

    def _put(self, url: str, name: str, data: bytes, mime: str) -> None:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f"Content-Type: {mime}\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self._xsrf:
            headers.update({"X-Xsrftoken": self._xsrf, "Cookie": f"{XSRF_COOKIE}={self._xsrf}"})
        target = url if url.startswith("http") else self.base + url
        request = urllib.request.Request(target, data=body, headers=headers, method="PUT")
        with urllib.request.urlopen(request, timeout=300) as response:
            if response.status not in (200, 204):
                raise RuntimeError(f"upload of {name} answered {response.status}")

    # -- reading the page ------------------------------------------------------------------------------------------
    def texts(self, kind: str) -> list[str]:
        return [e.text for e in self.elements if e.kind == kind]

    def first(self, kind: str, contains: str) -> Element | None:
        return next((e for e in self.elements if e.kind == kind and contains in e.text), None)
