"""The documented environment settings of the gateway-intent services (README)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.capture.app import CaptureSettings
from services.refunds.app import RefundsSettings
from services.runtime.intents.service import SharedSettings
from services.runtime.retry import RetryPolicy


def test_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAYSAGA_AUTHORIZATION_HOLD_S", "PAYSAGA_CAPTURE_PORT", "PAYSAGA_REFUNDS_PORT"):
        monkeypatch.delenv(name, raising=False)
    capture, refunds = CaptureSettings(), RefundsSettings()
    assert (capture.port, refunds.port) == (8083, 8084)
    assert capture.policy().hold == timedelta(days=6)
    assert capture.retry_policy() == refunds.retry_policy() == RetryPolicy(10, 1.0, 60.0)
    assert (capture.lease_s, capture.poll_s, capture.concurrency) == (120.0, 0.5, 8)


def test_each_service_reads_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_AUTHORIZATION_HOLD_S", "3600")
    monkeypatch.setenv("PAYSAGA_CAPTURE_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("PAYSAGA_CAPTURE_LEASE_S", "30")
    monkeypatch.setenv("PAYSAGA_REFUNDS_PORT", "9999")
    monkeypatch.setenv("PAYSAGA_REFUNDS_RETRY_MAX_S", "5")
    monkeypatch.setenv("PAYSAGA_GATEWAY_MAX_ATTEMPTS", "2")
    capture, refunds = CaptureSettings(), RefundsSettings()
    assert capture.policy().hold == timedelta(hours=1)
    assert (capture.max_attempts, capture.lease_s) == (3, 30.0)
    assert (refunds.max_attempts, refunds.lease_s, refunds.port) == (10, 120.0, 9999)
    assert refunds.retry_policy().max_s == 5.0
    assert SharedSettings().gateway_max_attempts == 2


def test_each_service_caps_its_stalled_look_ups(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the rounds are spent with the outcome unknown, capture and refunds go on
    looking up, at most PAYSAGA_<SERVICE>_STALLED_RETRY_MAX_S apart (default 900)."""
    for name in ("PAYSAGA_CAPTURE_STALLED_RETRY_MAX_S", "PAYSAGA_REFUNDS_STALLED_RETRY_MAX_S"):
        monkeypatch.delenv(name, raising=False)
    assert CaptureSettings().policy().retry.stalled_max_s == 900.0
    assert RefundsSettings().retry_policy().stalled_max_s == 900.0
    monkeypatch.setenv("PAYSAGA_CAPTURE_STALLED_RETRY_MAX_S", "7")
    monkeypatch.setenv("PAYSAGA_REFUNDS_STALLED_RETRY_MAX_S", "5")
    assert CaptureSettings().policy().retry.stalled_max_s == 7.0
    assert RefundsSettings().retry_policy().stalled_max_s == 5.0
