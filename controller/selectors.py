"""Kubernetes label selectors: the string form a scale subresource reports, and the structured form.

A scale subresource gives its pods' selector as a string (``status.selector``, e.g.
``app=vllm,tier in (a,b),!canary``); ``spec.podSelector`` is the structured ``LabelSelector``. Both become
one immutable ``Selector`` that is cheap to match against a pod's labels, so pod events can be mapped to
autoscalers without calling the API server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_OPS = ("In", "NotIn", "Exists", "DoesNotExist", "Equals", "NotEquals")


class SelectorError(ValueError):
    """A selector that cannot be parsed; the message quotes the offending text."""


@dataclass(frozen=True)
class Requirement:
    """One term of a selector: ``key op values``."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op in ("In", "Equals"):
            return present and labels[self.key] in self.values
        if self.op in ("NotIn", "NotEquals"):
            return not present or labels[self.key] not in self.values
        if self.op == "Exists":
            return present
        return not present  # DoesNotExist


@dataclass(frozen=True)
class Selector:
    """A conjunction of requirements; the empty selector matches everything (as in Kubernetes)."""

    requirements: tuple[Requirement, ...] = ()
    matches_nothing: bool = False

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.matches_nothing:
            return False
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def and_(self, other: Selector) -> Selector:
        """Both selectors at once (the target's selector narrowed by ``spec.podSelector``)."""
        return Selector(self.requirements + other.requirements, self.matches_nothing or other.matches_nothing)

    def equal_labels(self) -> dict[str, str]:
        """The ``key=value`` terms, usable as an index key to pre-filter pods."""
        return {r.key: next(iter(r.values)) for r in self.requirements
                if r.op in ("In", "Equals") and len(r.values) == 1}

    def __str__(self) -> str:
        if self.matches_nothing:
            return "<nothing>"
        parts = []
        for r in self.requirements:
            values = ",".join(sorted(r.values))
            parts.append({
                "Equals": f"{r.key}={values}", "NotEquals": f"{r.key}!={values}", "In": f"{r.key} in ({values})",
                "NotIn": f"{r.key} notin ({values})", "Exists": r.key, "DoesNotExist": f"!{r.key}",
            }[r.op])
        return ",".join(parts)


EVERYTHING = Selector()
NOTHING = Selector((), True)

_TOKEN = re.compile(r"\s*(!=|==|=|\(|\)|,|!|[^\s!=(),]+)")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SelectorError(f"cannot parse selector {text!r} at position {pos}")
        out.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse(text: str | None) -> Selector:
    """Parse Kubernetes' selector string syntax; an empty string selects everything."""
    if text is None or not text.strip():
        return EVERYTHING
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def expect_word(j: int) -> str:
        if j >= len(toks) or toks[j] in ("!=", "==", "=", "(", ")", ",", "!"):
            raise SelectorError(f"selector {text!r}: expected a label key or value")
        return toks[j]

    while i < len(toks):
        if toks[i] == "!":
            reqs.append(Requirement(expect_word(i + 1), "DoesNotExist"))
            i += 2
        else:
            key = expect_word(i)
            i += 1
            nxt = toks[i] if i < len(toks) else ","
            if nxt in ("=", "=="):
                # an empty value is legal: `key=` selects the empty label value
                value = toks[i + 1] if i + 1 < len(toks) and toks[i + 1] not in (",",) else ""
                reqs.append(Requirement(key, "Equals", frozenset({value})))
                i += 2 if value else 1
            elif nxt == "!=":
                value = toks[i + 1] if i + 1 < len(toks) and toks[i + 1] not in (",",) else ""
                reqs.append(Requirement(key, "NotEquals", frozenset({value})))
                i += 2 if value else 1
            elif nxt in ("in", "notin"):
                if i + 1 >= len(toks) or toks[i + 1] != "(":
                    raise SelectorError(f"selector {text!r}: expected '(' after {nxt}")
                j = i + 2
                values: set[str] = set()
                while j < len(toks) and toks[j] != ")":
                    if toks[j] != ",":
                        values.add(toks[j])
                    j += 1
                if j >= len(toks):
                    raise SelectorError(f"selector {text!r}: missing ')'")
                reqs.append(Requirement(key, "In" if nxt == "in" else "NotIn", frozenset(values)))
                i = j + 1
            else:
                reqs.append(Requirement(key, "Exists"))
        if i < len(toks):
            if toks[i] != ",":
                raise SelectorError(f"selector {text!r}: expected ',' before {toks[i]!r}")
            i += 1
    return Selector(tuple(reqs))


_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name) or (
            "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
        raise SelectorError(f"{key!r} is not a valid label key (an optional DNS prefix and '/', then at most 63 "
                            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
    return key


def _check_value(key: str, value: str) -> str:
    if len(value) > 63 or not _LABEL_NAME.match(value):
        raise SelectorError(f"{value!r} (for {key!r}) is not a valid label value (at most 63 letters, digits, '-', "
                            "'_' or '.', starting and ending with a letter or digit): no pod can carry it")
    return value


def from_label_selector(sel: Mapping[str, Any] | None) -> Selector:
    """A structured ``LabelSelector`` (``matchLabels``/``matchExpressions``); None selects everything.

    Keys and values are checked as the API server checks a pod's labels: a value no pod can carry would
    otherwise select nothing, silently.
    """
    if not sel:
        return EVERYTHING
    reqs: list[Requirement] = []
    for key, value in sorted((sel.get("matchLabels") or {}).items()):
        reqs.append(Requirement(_check_key(str(key)), "Equals", frozenset({_check_value(str(key), str(value))})))
    for expr in sel.get("matchExpressions") or []:
        op = expr.get("operator")
        if op not in _OPS[:4]:
            raise SelectorError(f"unknown selector operator {op!r} (expected In, NotIn, Exists, DoesNotExist)")
        key = _check_key(str(expr.get("key")))
        values = frozenset(_check_value(key, str(v)) for v in expr.get("values") or [])
        if op in ("In", "NotIn") and not values:
            raise SelectorError(f"selector operator {op} on {expr.get('key')!r} needs values")
        reqs.append(Requirement(key, op, values))
    return Selector(tuple(reqs))
