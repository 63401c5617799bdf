"""``GET /api/usage?from=&to=&group_by=day|model|user``: the caller's token usage.

A user sees their own; members of ``[auth] admin_groups`` see everyone's. Without an identity it
is refused (403), except when no access control is configured at all: then the install has one
user, who sees everything. Dates are UTC days (ISO 8601, a date or a date-time); the default is
this month so far.
"""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from ..appkeys import USAGE
from ..clients import auth_off, is_admin, who
from ..validation import ChatError

GROUP_BY = ("day", "model", "user")
MAX_DAYS = 731


def _date(value: str, name: str) -> dt.date:
    try:
        if len(value) <= 10:
            return dt.date.fromisoformat(value)
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is not None:
            moment = moment.astimezone(dt.timezone.utc)
        return moment.date()
    except ValueError:
        raise ChatError("bad_request", f"{name} must be an ISO 8601 date (YYYY-MM-DD), got {value[:40]!r}") from None


def period(query, today: dt.date | None = None) -> tuple[dt.date, dt.date, str]:
    """(from, to, group_by) of the query string, or ``ChatError`` 400."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    frm = _date(query["from"], "from") if query.get("from") else today.replace(day=1)
    to = _date(query["to"], "to") if query.get("to") else today
    group_by = query.get("group_by", "day")
    if group_by not in GROUP_BY:
        raise ChatError("bad_request", f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by[:40]!r}")
    if frm > to:
        raise ChatError("bad_request", "from must not be after to")
    if (to - frm).days >= MAX_DAYS:
        raise ChatError("bad_request", f"a query spans at most {MAX_DAYS} days")
    return frm, to, group_by


async def usage(request: web.Request) -> web.Response:
    person = who(request)
    if person.name is None and not auth_off(request):
        raise ChatError("forbidden", "Usage needs an identity (a token, a signed-in user).", 403)
    frm, to, group_by = period(request.query)
    everyone = person.name is None or is_admin(request, person)  # no identity here: auth is off
    body = await request.app[USAGE].query(None if everyone else person.name, frm, to, group_by)
    body.update({"from": frm.isoformat(), "to": to.isoformat(), "group_by": group_by,
                 "user": person.name, "everyone": everyone})
    return web.json_response(body, headers={"Cache-Control": "no-store"})
