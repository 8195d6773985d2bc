"""What one connection may still do: frames per second, fresh identities, failed
resumes. Pure: the router asks, and turns a refusal into an error frame."""

from __future__ import annotations

from collections.abc import Callable

from . import protocol as p
from .config import HubConfig

__all__ = ["ConnectionLimits"]


class _Allowance:
    """One connection's budget: a token bucket, and counts of identity attempts."""

    __slots__ = ("failed_resumes", "fresh", "refilled", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.refilled = now
        self.fresh = 0  # identities it created
        self.failed_resumes = 0


class ConnectionLimits:
    """The limits of `config`, per connection (any hashable key), on `clock`."""

    def __init__(self, config: HubConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._of: dict[object, _Allowance] = {}

    def __len__(self) -> int:
        """Connections with an allowance in use."""
        return len(self._of)

    def _allowance(self, peer: object) -> _Allowance:
        allowance = self._of.get(peer)
        if allowance is None:
            allowance = self._of[peer] = _Allowance(float(self.config.rate_burst), self._clock())
        return allowance

    def frame(self, peer: object) -> bool:
        """Spend one frame from `peer`'s rate budget: a token bucket of `rate_limit`
        frames per second, bursts up to `rate_burst`. False if it is spent (always True
        when there is no rate limit)."""
        rate = self.config.rate_limit
        if rate is None:
            return True
        allowance, now = self._allowance(peer), self._clock()
        tokens = min(
            float(self.config.rate_burst), allowance.tokens + (now - allowance.refilled) * rate
        )
        allowance.refilled = now
        if tokens < 1:
            allowance.tokens = tokens
            return False
        allowance.tokens = tokens - 1
        return True

    def rate_error(self) -> str:
        return f"more than {self.config.rate_limit:g} frames per second; slow down"

    def may_resume(self, peer: object) -> None:
        """Raise `limit_exceeded` if `peer` failed `max_failed_resumes` resumes: past it,
        every resume on that connection is refused, so guessing tokens gets nowhere."""
        if self._allowance(peer).failed_resumes >= self.config.max_failed_resumes:
            raise p.ProtocolError(
                p.ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.config.max_failed_resumes} failed resumes per connection",
            )

    def resume_failed(self, peer: object) -> None:
        self._allowance(peer).failed_resumes += 1

    def may_create(self, peer: object) -> None:
        """Raise `limit_exceeded` if `peer` made `max_registrations_per_connection`
        identities already."""
        limit = self.config.max_registrations_per_connection
        if self._allowance(peer).fresh >= limit:
            raise p.ProtocolError(
                p.ErrorCode.LIMIT_EXCEEDED, f"at most {limit} new identities per connection"
            )

    def created(self, peer: object) -> None:
        self._allowance(peer).fresh += 1

    def forget(self, peer: object) -> None:
        """`peer` is gone."""
        self._of.pop(peer, None)
