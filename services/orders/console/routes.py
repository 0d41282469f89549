"""The console's pages and forms.

Reading is open (the local stack has no login); every action is a confirmation page
(GET) and a form (POST) that needs ``PAYSAGA_CONSOLE_TOKEN`` set — refused with 403
otherwise — the operator's secret typed into the form, and the page's CSRF token: an
HMAC, keyed with the operator secret, of a random value in a ``SameSite=Strict``
cookie, carried in a hidden field. Templates autoescape everything they show.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from schemas.contract import OrderStatus
from services.monitor.domain import OPEN
from services.orders.console.actions import Actions, OperatorToken
from services.orders.console.order_list import OrderFilter
from services.orders.console.order_page import compare_ledger
from services.orders.console.reads import ConsoleReads, utcnow
from services.runtime.cli_dlq import Filters

HERE = Path(__file__).parent
CSRF_COOKIE = "paysaga_console_csrf"
DISABLED = (
    "Console actions are disabled: set PAYSAGA_CONSOLE_TOKEN (name:secret) for the orders"
    " service to allow them. Reading needs no token."
)


def install(
    app: FastAPI, reads: ConsoleReads, actions: Actions, token: OperatorToken | None
) -> None:
    """Add the console's routes and its static files to the status API's app."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    templates = Jinja2Templates(env=env)
    router = APIRouter(prefix="/console")

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        nonce = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        context.update(
            actions_enabled=token is not None,
            operator=token.name if token else None,
            csrf=_csrf(token, nonce),
            statuses=[s.value for s in OrderStatus],
        )
        response = templates.TemplateResponse(request, name, context, status_code=status_code)
        if CSRF_COOKIE not in request.cookies:
            response.set_cookie(
                CSRF_COOKIE, nonce, httponly=True, samesite="strict", path="/console"
            )
        return response

    def refused(request: Request, csrf: str, offered: str) -> Response | None:
        """The 403 page of a POST that may not act, or None."""
        if token is None:
            return page(request, "message.html", 403, title="Refused", message=DISABLED)
        nonce = request.cookies.get(CSRF_COOKIE, "")
        if not nonce or not hmac.compare_digest(csrf, _csrf(token, nonce)):
            message = "CSRF check failed: open the confirmation page again and resubmit."
            return page(request, "message.html", 403, title="Refused", message=message)
        if not token.admits(offered):
            message = "Wrong operator token: nothing was done."
            return page(request, "message.html", 403, title="Refused", message=message)
        return None

    @router.get("/", include_in_schema=False)
    async def home() -> Response:
        return RedirectResponse("/console/orders")

    @router.get("/orders", response_class=HTMLResponse, include_in_schema=False)
    async def orders(
        request: Request,
        status: str = "",
        age: str = "",  # minutes; a form sends an empty field as ""
        customer: str = "",
        conference: str = "",
        q: str = "",
        page_no: int = Query(1, alias="page", ge=1),
    ) -> Response:
        minutes = int(age) if age.strip().isdigit() else None
        f = OrderFilter(
            status or None,
            minutes,
            customer.strip() or None,
            q.strip() or None,
            page_no,
            conference=conference.strip() or None,
        )
        rows, more = await reads.orders(f, utcnow())
        return page(
            request,
            "orders.html",
            rows=rows,
            more=more,
            f=f,
            counts=await reads.status_counts(),
        )

    @router.get("/orders/{order_id}", response_class=HTMLResponse, include_in_schema=False)
    async def order(request: Request, order_id: str) -> Response:
        t = await reads.timeline(order_id)
        if t is None:
            message = f"No order {order_id}."
            return page(request, "message.html", 404, title="Not found", message=message)
        txns = sorted(
            {c["transaction_id"] for c in t["confirmations"]}
            | ({t["order"]["transaction_id"]} if t["order"]["transaction_id"] else set())
        )
        ledger, disagreements, gateway_error = await reads.ledger(t["order"], txns)
        return page(
            request,
            "order.html",
            t=t,
            ledger=compare_ledger(t, ledger),
            disagreements=disagreements,
            gateway_error=gateway_error,
        )

    @router.get("/stalled", response_class=HTMLResponse, include_in_schema=False)
    async def stalled(request: Request) -> Response:
        rows = await reads.stalled(utcnow())
        deadlines = [(s.value, reads.deadlines.for_status(s)) for s in OPEN]
        return page(request, "stalled.html", rows=rows, deadlines=deadlines)

    @router.get("/reconciliation", response_class=HTMLResponse, include_in_schema=False)
    async def reconciliation(request: Request) -> Response:
        rows, violations, command = await reads.needs_reconciliation()
        return page(
            request, "reconciliation.html", rows=rows, violations=violations, command=command
        )

    @router.get("/unmatched", response_class=HTMLResponse, include_in_schema=False)
    async def unmatched(request: Request) -> Response:
        return page(request, "unmatched.html", rows=await reads.unmatched())

    @router.get("/unmatched/{unmatched_id}/resolve", include_in_schema=False)
    async def resolve_confirm(
        request: Request, unmatched_id: int, order: str = "", refund: bool = False
    ) -> Response:
        row = await reads.unmatched_one(unmatched_id)
        if row is None or (not order) == (not refund):
            message = f"No open unmatched payment {unmatched_id}, or not one of order/refund."
            return page(request, "message.html", 404, title="Not found", message=message)
        return page(request, "confirm_resolve.html", row=row, order=order or None)

    @router.post("/unmatched/{unmatched_id}/resolve", include_in_schema=False)
    async def resolve(
        request: Request,
        unmatched_id: int,
        csrf: str = Form(""),
        operator_token: str = Form(""),
        order: str = Form(""),
    ) -> Response:
        if (no := refused(request, csrf, operator_token)) is not None:
            return no
        assert token is not None
        row = await reads.unmatched_one(unmatched_id)
        if row is None:
            message = f"No open unmatched payment {unmatched_id}."
            return page(request, "message.html", 404, title="Not found", message=message)
        ok, message = await actions.resolve(
            unmatched_id, row["transaction_id"], order or None, token.name
        )
        title = "Resolved" if ok else "Not resolved"
        return page(request, "message.html", 200 if ok else 409, title=title, message=message)

    @router.get("/dead-letters", response_class=HTMLResponse, include_in_schema=False)
    async def dead_letters(request: Request, group: str = "", error_class: str = "") -> Response:
        rows = await reads.dead_letters(
            Filters(group=group or None, error_class=error_class or None)
        )
        groups: dict[tuple[str, str], list[Any]] = {}
        for d in rows:
            groups.setdefault((d.group, d.error_class), []).append(d)
        return page(
            request, "dead_letters.html", groups=groups, group=group, error_class=error_class
        )

    @router.get("/dead-letters/{ref}/{action}", include_in_schema=False)
    async def dead_letter_confirm(request: Request, ref: str, action: str) -> Response:
        found = await reads.dead_letters(Filters(ref=ref))
        if action not in ("replay", "purge") or not found:
            message = f"No dead letter {ref} (or no action {action})."
            return page(request, "message.html", 404, title="Not found", message=message)
        return page(request, "confirm_dead_letter.html", d=found[0], action=action)

    @router.post("/dead-letters/{ref}/{action}", include_in_schema=False)
    async def dead_letter_act(
        request: Request,
        ref: str,
        action: str,
        csrf: str = Form(""),
        operator_token: str = Form(""),
    ) -> Response:
        if (no := refused(request, csrf, operator_token)) is not None:
            return no
        assert token is not None
        found = await reads.dead_letters(Filters(ref=ref))
        if action not in ("replay", "purge") or not found:
            message = f"No dead letter {ref} (or no action {action})."
            return page(request, "message.html", 404, title="Not found", message=message)
        kind: Literal["replay", "purge"] = "replay" if action == "replay" else "purge"
        message = await actions.dead_letter(kind, ref, found[0].key or None, token.name)
        return page(request, "message.html", title="Done", message=message)

    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")


def _csrf(token: OperatorToken | None, nonce: str) -> str:
    if token is None:
        return ""
    return hmac.new(token.secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()
