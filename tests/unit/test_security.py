"""Settings that choose the transport, and the token file, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import GatewaySettings
from refiner_service.config import RefinerSettings
from trellisbox._runtime.config import load_settings
from trellisbox._runtime.security import FileWatch, TokenFile, bearer_token, is_loopback


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("TRELLISBOX_")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize(("argv", "problem"), [
    (["--host", "0.0.0.0"], "host 0.0.0.0 is reachable from other machines: choose the transport with tls"),
    (["--host", "10.1.2.3", "--tls", "on"], "tls=on needs tls_cert_file and tls_key_file"),
    (["--tls", "mutual", "--tls-cert-file", "c", "--tls-key-file", "k"], "tls=mutual needs tls_client_ca_file"),
])
def test_a_reachable_port_must_choose_its_transport(argv: list[str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        load_settings(RefinerSettings, argv)


def test_plaintext_is_the_default_on_loopback_and_a_choice_elsewhere() -> None:
    assert load_settings(RefinerSettings, []).tls_mode == "off"
    assert load_settings(RefinerSettings, ["--host", "0.0.0.0", "--tls", "off"]).tls_mode == "off"


@pytest.mark.parametrize(("argv", "problem"), [
    (["--refiner-target", "dns:///refiner:50052"], "dns:///refiner:50052 is not on this machine: choose"),
    (["--trellis-target", "ipv4:127.0.0.1:1,10.0.0.2:2"], "is not on this machine"),
    (["--stage-tls", "on"], "stage_tls=on needs stage_ca_file"),
    (["--stage-tls", "mutual", "--stage-ca-file", "ca"], "stage_tls=mutual needs stage_cert_file and stage_key_file"),
])
def test_the_gateway_must_choose_the_transport_to_remote_stages(argv: list[str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        load_settings(GatewaySettings, argv)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("10.0.0.1", False), ("refiner", False), ("::", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("metadata", "token"), [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("x-other", "1"), ("authorization", "bearer  abc ")), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((), None),
])
def test_bearer_token_from_metadata(metadata: tuple[tuple[str, str], ...], token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_token_file_skips_comments_and_keeps_its_tokens_when_emptied(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\nfirst-secret\n\n  second-secret  \n")
    tokens = TokenFile(path)
    assert tokens.accepts("first-secret") and tokens.accepts("second-secret")
    assert not tokens.accepts("first") and not tokens.accepts("") and not tokens.accepts("# comment")
    path.write_text("\n")
    path.touch()
    assert tokens.accepts("second-secret")  # an empty file does not lock everyone out (nor let everyone in)
    assert "keeping the previous tokens" in caplog.text and "second-secret" not in caplog.text


def test_a_token_file_must_hold_a_token(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("# none yet\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenFile(tmp_path / "tokens")


def test_file_watch_sees_a_replaced_file_once(tmp_path: Path) -> None:
    path = tmp_path / "cert"
    path.write_text("one")
    watch = FileWatch([path])
    assert not watch.changed()
    replacement = tmp_path / "next"
    replacement.write_text("two!")
    replacement.replace(path)
    assert watch.changed() and not watch.changed()
    path.unlink()
    assert not watch.changed()  # missing for a moment: keep what is loaded
