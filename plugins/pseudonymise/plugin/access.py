"""Who may read the audit and who may use a token: Airflow's own auth, as the API server applies it.

Plugin apps get no authentication from Airflow, so every route depends on one of these:

* reading (pages, ``GET`` API): ``requires_access_dag("GET", DagAccessEntity.AUDIT_LOG)``, the
  permission Airflow's own audit log asks for, checked for the filtered DAG when the request
  names one (the task view); the rows shown are then limited to the DAGs the user may read
  (:class:`DagScope`), as Airflow limits asset events;
* using a token (``POST`` API): ``requires_access_connection("GET")`` on the connection that holds
  it: whoever may read a connection may use the token in it, nobody else.

The user comes from the ``Authorization: Bearer`` JWT (API clients) or the ``_token`` cookie the
Airflow UI sets at login (pages), through the API server's ``get_user``. A token use (every
``POST``) takes its user from the Bearer JWT only (:func:`token_user`): a browser adds the cookie to
requests that any page of the same site makes (``SameSite=Lax`` does not separate two ports of one
host), but no other page can read the cookie or add an ``Authorization`` header, so a cookie never
authorises a token use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import (
    GetUserDep,
    bearer_scheme,
    requires_access_connection,
    requires_access_dag,
    resolve_user_from_token,
)
from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials

ReadAudit = Depends(requires_access_dag("GET", DagAccessEntity.AUDIT_LOG))
UseConnection = Depends(requires_access_connection("GET"))

BEARER_NEEDED = ("this request uses a token, so it must carry an Airflow JWT in an 'Authorization: Bearer <jwt>' "
                 "header: get one from the API server's POST /auth/token (JSON {\"username\": ..., \"password\": "
                 "...}) and send it with each call; the Airflow UI's session cookie is not enough here, so that no "
                 "other web page open in your browser can use a token in your name")
BEARER_NOT_THE_USER = ("this request was authenticated by something other than its 'Authorization: Bearer' JWT "
                       "(a session cookie of another user?); send the call with the Bearer header only, using a "
                       "JWT from the API server's POST /auth/token")


async def token_user(user: GetUserDep,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> BaseUser:
    """The caller of a token use: the user of the request's ``Authorization: Bearer`` JWT, never a cookie's.

    403 when the request has no Bearer header (the UI cookie alone, or another scheme); anonymous
    requests have already had Airflow's 401 from ``get_user``. The Bearer JWT is verified again here
    and must name the very user ``get_user`` authenticated (and the connection permission was checked
    for), so the rule holds even if Airflow ever preferred the cookie over the header.
    """
    if credentials is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, BEARER_NEEDED)
    caller = await resolve_user_from_token(credentials.credentials)
    manager = get_auth_manager()
    if manager.serialize_user(caller) != manager.serialize_user(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, BEARER_NOT_THE_USER)
    return caller


#: Every route that uses a token (every ``POST``) depends on this, before the connection permission.
UseToken = Depends(token_user)
TokenUserDep = Annotated[BaseUser, Depends(token_user)]


@dataclass(frozen=True)
class DagScope:
    """The audit rows a user may see: rows of DAGs they may read, rows of no DAG (CLI and API uses),
    and rows of DAGs this Airflow does not know (deleted, or run elsewhere), which cannot be
    authorised per DAG and fall under the audit-log permission the page already required.

    ``readable`` is ``None`` when the user may read every DAG (no filter at all).
    """

    readable: frozenset[str] | None = None
    known: frozenset[str] = frozenset()

    def clause(self, dag_id: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        if self.readable is None:
            return sa.true()
        return sa.or_(dag_id.is_(None), dag_id.in_(self.readable), dag_id.not_in(self.known))


def dag_scope(user: GetUserDep) -> DagScope:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        known = set(session.scalars(sa.select(DagModel.dag_id)))
        readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET", session=session)
    if known <= readable:
        return DagScope()
    return DagScope(frozenset(readable), frozenset(known))


DagScopeDep = Annotated[DagScope, Depends(dag_scope)]


def user_name(user: Any) -> str:
    """The name the audit records as ``triggered_by`` for an API call."""
    return str(user.get_name() or user.get_id())
