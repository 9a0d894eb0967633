"""Messages the workers send each other: shards of big audiences and parked retries.

Internal to pushfan (no JSON Schema is published for them), but versioned and strict
like every wire contract: a worker of the next version must read what this one wrote
while a rollout is half done.
"""

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import MAX_TOKEN_LENGTH, AwareDatetime, Platform, UserId
from schemas.events import token_fingerprint
from schemas.job import NotificationJob

__all__ = ["ParkedToken", "RetryBatch", "ShardTask"]


class ShardTask(BaseModel):
    """One user_id range of a job's audience, for any worker of the group to send.

    The range is ``(after, until]`` in user_id order (``None``: unbounded). For a
    ``users`` audience, ``job`` carries only the shard's own ids, so a shard message
    stays small whatever the list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    job: NotificationJob
    shard_no: int = Field(ge=0)
    after: UserId | None = None
    until: UserId | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Strictly parse :meth:`to_bytes` output; raises :class:`pydantic.ValidationError`."""
        return cls.model_validate_json(raw, strict=True)


class ParkedToken(BaseModel):
    """A token whose send is still failing after the retry budget."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    id: int
    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)

    def __repr_args__(self) -> Any:
        yield "id", self.id
        yield "token", token_fingerprint(self.token)


class RetryBatch(BaseModel):
    """Tokens of one page and platform parked on the retry topic until ``not_before``.

    ``batch_id`` is unique per batch: the ledger records the batches it has applied, so
    a batch redelivered after a crash is neither sent nor counted twice. ``attempt``
    counts how many times the batch was parked (the delay grows with it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    schema_version: Literal[1] = 1
    batch_id: str = Field(min_length=1, max_length=64)
    job: NotificationJob
    shard_no: int | None = None
    platform: Platform
    tokens: tuple[ParkedToken, ...] = Field(min_length=1)
    attempt: int = Field(ge=1)
    not_before: AwareDatetime
    reason: str = Field(min_length=1, max_length=64)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Strictly parse :meth:`to_bytes` output; raises :class:`pydantic.ValidationError`."""
        return cls.model_validate_json(raw, strict=True)
