"""Which statements may run on a replica.

Rule of this module: a statement is read-only, and so may go to a replica, only when it is one
plain `SELECT` (or `SHOW`, `EXPLAIN`, `DESCRIBE`, a `WITH ... SELECT`) that takes no locks and
changes no session state: no `FOR UPDATE` / `FOR SHARE` / `LOCK IN SHARE MODE`, no `INTO`, no
locking or sequence functions, no second statement. Anything else belongs to the primary.
Comments and quoted text are skipped, so a keyword inside a string does not count.
"""

from __future__ import annotations

import re

__all__ = ["is_read_only"]

# quoted strings, quoted identifiers and comments, which we blank out before looking at words
_NOISE = re.compile(
    r"""'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`]|``)*`|--[^\n]*|\#[^\n]*|/\*.*?\*/""",
    re.DOTALL,
)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_READ_FIRST = {"SELECT", "SHOW", "EXPLAIN", "DESCRIBE", "DESC", "WITH", "VALUES"}
_WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE", "INTO", "CREATE", "DROP",
                "ALTER", "TRUNCATE", "GRANT", "REVOKE", "CALL", "DO", "HANDLER", "LOAD", "SET",
                "LOCK", "UNLOCK"}
_LOCKING_FUNCTIONS = {"GET_LOCK", "RELEASE_LOCK", "RELEASE_ALL_LOCKS", "IS_FREE_LOCK",
                      "IS_USED_LOCK", "MASTER_POS_WAIT", "MASTER_GTID_WAIT", "LAST_INSERT_ID",
                      "NEXTVAL", "SETVAL", "LASTVAL", "NEXT", "SLEEP", "FOUND_ROWS", "ROW_COUNT"}


def is_read_only(sql: str) -> bool:
    """True when `sql` is a single statement that may safely run on a replica."""
    text = _NOISE.sub(" ", sql).strip().rstrip(";").strip()
    if not text or ";" in text:
        return False
    words = [w.upper() for w in _WORD.findall(text)]
    if not words or words[0] not in _READ_FIRST:
        return False
    upper = set(words)
    if upper & _WRITE_WORDS:
        # "FOR UPDATE" contains UPDATE; "LOCK IN SHARE MODE" contains LOCK; INTO in SELECT INTO
        return False
    if "FOR" in upper and ("SHARE" in upper or "UPDATE" in upper):
        return False
    return not any(re.search(rf"\b{fn}\s*\(", text, re.IGNORECASE)
                   for fn in _LOCKING_FUNCTIONS & upper)
