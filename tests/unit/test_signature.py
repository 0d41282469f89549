import hashlib
import hmac

import pytest

from services.runtime.signature import SignatureError, parse_signature_header, sign, verify

BODY = b'{"id":"evt_1","type":"payment.authorized","created":1763805600,"data":{"amount":100}}'
T = 1_763_805_600
SECRET = "whsec_current"
OLD = "whsec_previous"


def _v1(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def _reason(excinfo: pytest.ExceptionInfo[SignatureError]) -> str:
    return excinfo.value.reason


def test_sign_is_hmac_sha256_over_timestamp_dot_raw_body() -> None:
    assert sign(SECRET, T, BODY) == f"t={T},v1={_v1(SECRET, T, BODY)}"


def test_valid_signature_returns_the_signed_timestamp() -> None:
    assert (
        verify([SECRET], sign(SECRET, T, BODY), BODY, reference_time=T + 10, tolerance_s=300) == T
    )


def test_wrong_secret_is_invalid() -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], sign("whsec_attacker", T, BODY), BODY, T, 300)
    assert _reason(excinfo) == "signature_invalid"


def test_rotation_header_with_two_v1_entries_verifies_with_either_secret() -> None:
    header = f"t={T},v1={_v1(OLD, T, BODY)},v1={_v1(SECRET, T, BODY)}"
    assert verify([SECRET], header, BODY, T, 300) == T
    assert verify([OLD], header, BODY, T, 300) == T


def test_rotation_two_configured_secrets_accept_either_signer() -> None:
    for signer in (SECRET, OLD):
        assert verify([SECRET, OLD], sign(signer, T, BODY), BODY, T, 300) == T


def test_empty_secrets_never_verify() -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify(["", SECRET + "x"], sign("", T, BODY), BODY, T, 300)
    assert _reason(excinfo) == "signature_invalid"


@pytest.mark.parametrize(
    "tampered",
    [BODY.replace(b"100", b"1000"), BODY + b" ", BODY.replace(b'"amount"', b'"amount" ')],
)
def test_any_change_to_the_raw_body_is_invalid(tampered: bytes) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], sign(SECRET, T, BODY), tampered, T, 300)
    assert _reason(excinfo) == "signature_invalid"


def test_changing_the_timestamp_breaks_the_signature() -> None:
    header = sign(SECRET, T, BODY).replace(f"t={T}", f"t={T + 1}")
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], header, BODY, T, 300)
    assert _reason(excinfo) == "signature_invalid"


@pytest.mark.parametrize("reference", [T + 301, T - 301])
def test_too_old_and_too_far_in_the_future_are_rejected(reference: int) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], sign(SECRET, T, BODY), BODY, reference, 300)
    assert _reason(excinfo) == "timestamp_outside_tolerance"


@pytest.mark.parametrize("reference", [T + 300, T - 300])
def test_tolerance_boundary_is_inclusive(reference: int) -> None:
    assert verify([SECRET], sign(SECRET, T, BODY), BODY, reference, 300) == T


def test_invalid_signature_is_reported_before_tolerance() -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], sign("nope", T, BODY), BODY, T + 10_000, 300)
    assert _reason(excinfo) == "signature_invalid"


def test_parse_ignores_other_schemes_and_lowercases() -> None:
    v1 = _v1(SECRET, T, BODY)
    assert parse_signature_header(f" t={T}, v0=abc , v1={v1.upper()}") == (T, [v1])


@pytest.mark.parametrize("header", [None, "", "   "])
def test_absent_header_is_missing(header: str | None) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], header, BODY, T, 300)
    assert _reason(excinfo) == "signature_missing"


def test_header_without_v1_is_missing() -> None:
    with pytest.raises(SignatureError) as excinfo:
        parse_signature_header(f"t={T},v0=abc")
    assert _reason(excinfo) == "signature_missing"


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        f"v1={'a' * 64}",
        f"t=,v1={'a' * 64}",
        f"t=abc,v1={'a' * 64}",
        f"t=-5,v1={'a' * 64}",
        f"t=+5,v1={'a' * 64}",
        f"t=1,t=2,v1={'a' * 64}",
        f"t={T},v1=abc",
        f"t={T},v1={'g' * 64}",
        f"t={T},v1={'a' * 65}",
        f"t={T},,v1={'a' * 64}",
        f"t={T},=x,v1={'a' * 64}",
        f"t={T}," + ",".join([f"v1={'a' * 64}"] * 17),
    ],
)
def test_malformed_headers(header: str) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify([SECRET], header, BODY, T, 300)
    assert _reason(excinfo) == "signature_malformed"


def test_negative_tolerance_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        verify([SECRET], sign(SECRET, T, BODY), BODY, T, -1)
