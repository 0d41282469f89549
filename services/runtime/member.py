"""What the parts of a consumer (``positions``, ``batches``) need of the group member
that runs them (``consumer.ConsumerRuntime``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

T = TypeVar("T")


class Member(Protocol):
    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The Kafka consumer while the member runs."""

    def owns(self, tp: TopicPartition, fetched: int) -> bool:
        """Whether ``tp`` is still this member's as when its records were fetched."""

    async def backoff(self, attempt: int) -> None:
        """Wait before retry ``attempt``, staying a live member of the group."""

    async def until_done(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``step`` until it succeeds, with ``backoff`` between attempts."""
